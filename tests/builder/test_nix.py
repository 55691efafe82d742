"""The nix wrapper and the internal-json log parser, against the real nix client."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nixboot_builder import demo, nixlog
from nixboot_builder.nix import (
    InvalidAttr,
    Nix,
    NixError,
    path_flake_dir,
    read_boot_files,
    toplevel_installable,
)


def test_log_parser_counts_derivations_and_names_current() -> None:
    log = nixlog.BuildLog()
    lines = [
        '@nix {"action":"start","id":2,"level":0,"text":"","type":104}',
        '@nix {"action":"start","id":3,"level":0,"text":"","type":103}',
        '@nix {"action":"result","fields":[0,3,0,0],"id":2,"type":105}',
        '@nix {"action":"result","fields":[0,7,0,0],"id":3,"type":105}',
        '@nix {"action":"start","fields":["/nix/store/'
        + "a" * 32
        + '-etc.drv","",1,1],"id":5,"level":3,"text":"building etc","type":105}',
        '@nix {"action":"result","fields":["hello from builder"],"id":5,"type":101}',
        '@nix {"action":"result","fields":[1,3,1,0],"id":2,"type":105}',
        '@nix {"action":"msg","level":0,"msg":"\\u001b[31;1merror:\\u001b[0m boom"}',
        "not json at all",
    ]
    updates = [u for line in lines for u in log.feed(line)]
    assert log.done == 1 and log.expected == 3 and log.current == "etc"
    assert nixlog.LogLine("hello from builder", "etc") in updates
    assert nixlog.ErrorMessage("error: boom") in updates
    assert nixlog.LogLine("not json at all") in updates
    # The copy-paths activity (id 3) never counts as derivations.
    assert all(u.expected != 7 for u in updates if isinstance(u, nixlog.Progress))


def test_attr_validation() -> None:
    with pytest.raises(InvalidAttr):
        toplevel_installable("path:/x", "a.b")
    with pytest.raises(InvalidAttr):
        toplevel_installable("path:/x", "")


async def test_build_reads_nixos_layout_and_reports_progress(flake_dir: Path) -> None:
    nix = Nix({"max-jobs": "2"})
    seen: list[nixlog.Update] = []

    async def on_update(updates: list[nixlog.Update]) -> None:
        seen.extend(updates)

    flake = f"path:{flake_dir}"
    toplevel, log, _lines = await nix.build(flake, "demo", on_update)
    boot = read_boot_files(toplevel)
    assert boot.kernel.endswith("-linux-6.1.0-demo/bzImage")
    assert boot.initrd.endswith("-initrd-6.1.0-demo/initrd")
    assert boot.kernel_params == "loglevel=4" and boot.init == f"{toplevel}/init"
    assert log.done == log.expected > 0
    assert any(
        isinstance(u, nixlog.Progress) and u.current and "demo-app" in u.current for u in seen
    )
    closure = subprocess.run(["nix-store", "-qR", toplevel], capture_output=True, text=True)
    assert len(closure.stdout.split()) == 10  # busybox, 4 packages, kernel, initrd, sw, etc, top
    assert await nix.closure_size(toplevel) > 6 * 64 * 1024
    # Deterministic: the same flake content gives the same fingerprint and toplevel again.
    fp = await nix.flake_fingerprint(flake)
    assert fp.startswith("sha256-")
    assert await nix.flake_fingerprint(flake) == fp
    demo.set_knob(flake_dir, "kernelParams", "quiet")
    assert await nix.flake_fingerprint(flake) != fp


async def test_path_flake_fingerprint_is_nix_narhash(flake_dir: Path) -> None:
    """The in-process NAR hash of a path: flake equals what `nix flake metadata` reports, for
    every kind of node a flake holds (executables, symlinks, empty and nested directories, file
    lengths that need NAR padding)."""
    nix = Nix()
    flake = f"path:{flake_dir}"
    assert path_flake_dir(flake) == flake_dir
    assert await nix.flake_fingerprint(flake) == await nix.nix_flake_fingerprint(flake)
    extra = flake_dir / "extra" / "deeper"
    extra.mkdir(parents=True)
    (flake_dir / "extra" / "empty").mkdir()
    (extra / "odd").write_bytes(b"abc")
    (extra / "eight").write_bytes(b"12345678")
    (extra / "nothing").write_bytes(b"")
    (extra / "run").write_text("#!/bin/sh\n")
    (extra / "run").chmod(0o755)
    (extra / "link").symlink_to("../../knobs.nix")
    (extra / "dangling").symlink_to("/nonexistent/x")
    (extra / "B-upper").write_text("sorted before a-lower in byte order")
    (extra / "a-lower").write_text("x")
    fast = await nix.flake_fingerprint(flake)
    assert fast == await nix.nix_flake_fingerprint(flake)
    (extra / "odd").write_bytes(b"abd")
    assert await nix.flake_fingerprint(flake) != fast
    # Not a plain path: flake (query, git, missing flake.nix): left to nix.
    assert path_flake_dir(f"{flake}?dir=x") is None
    assert path_flake_dir(f"git+file://{flake_dir}") is None
    assert path_flake_dir(f"path:{flake_dir / 'extra'}") is None


async def test_build_failure_and_missing_attr(flake_dir: Path) -> None:
    nix = Nix()
    with pytest.raises(NixError, match="does not provide attribute"):
        await nix.build(f"path:{flake_dir}", "nope")
    system = flake_dir / "system.nix"
    system.write_text(system.read_text().replace("chmod +x $out/init", "echo boom-line; exit 3"))
    with pytest.raises(NixError, match="failed with exit code 3") as info:
        await nix.build(f"path:{flake_dir}", "demo")
    assert "boom-line" in info.value.log_tail
