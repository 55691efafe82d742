"""The builder's CLI commands against a running builder (real NATS, real nix)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner

from nixboot_builder.cli import app
from tests.builder.harness import BuilderProcess


async def test_cli_machines_build_follow_generations_pin(
    tmp_path: Path, nats_url: str, flake_dir: Path
) -> None:
    b = BuilderProcess(tmp_path, nats_url, f"path:{flake_dir}", [])
    b.start()
    runner = CliRunner()
    env = {"NIXBOOT_CONFIG": str(b.config)}

    async def cli(*args: str) -> tuple[int, str]:
        result = await asyncio.to_thread(runner.invoke, app, list(args), env=env)
        return result.exit_code, result.output

    try:
        code, out = await cli(
            "machines", "add", "52-54-00-AA-00-01", "lab-1", "demo", "-l", "room=A"
        )
        assert code == 0 and "52:54:00:aa:00:01" in out, out
        code, out = await cli("machines", "add", "52:54:00:aa:00:02", "lab-2", "demo")
        assert code == 0, out
        code, out = await cli("machines", "list")
        assert "lab-1" in out and "room=A" in out and "lab-2" in out
        code, out = await cli("build", "--all", "--follow")
        assert code == 0, out
        assert (
            out.count("build ") >= 1 and "built /nix/store/" in out and "nixos-system-demo" in out
        )
        code, out = await cli("generations", "lab-2")
        assert code == 0 and "*" in out and "MiB" in out, out
        code, out = await cli("pin", "lab-2", "1", "--once")
        assert code == 0 and "default generation 1" in out
        code, out = await cli("machines", "show", "lab-2")
        assert '"next_boot": 1' in out
        # Bad input: clear errors, non-zero exits.
        code, out = await cli("machines", "add", "not-a-mac", "x", "demo")
        assert code == 1 and "invalid MAC" in out
        code, out = await cli("pin", "lab-2", "7")
        assert code == 1 and "no generation 7" in out
        code, out = await cli("generations", "ghost")
        assert code == 1 and "unknown machine" in out
        code, out = await cli("build")
        assert code == 2
        code, out = await cli("machines", "remove", "lab-1")
        assert code == 0
        code, out = await cli("machines", "list")
        assert "lab-1" not in out and "lab-2" in out
    finally:
        b.stop()
