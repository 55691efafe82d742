"""The nixboot stack of tests/harness/stack.py with the handles a fault test needs: SIGKILL a
service and start it again, restart nats-server (or one node of a cluster), run the cache inside a
private mount namespace whose state/cache is a small tmpfs, point clients at a relay."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec

from nixboot_shared import records, subjects
from tests.harness.stack import (
    NIX_ENV_CONFIG,
    REPO,
    SERVICES,
    Stack,
    connect,
    free_port,
    wait_generations,
)

__all__ = ["SERVICES", "FaultStack", "free_port", "mac_of", "prepare_flake", "wait_generations"]


def mac_of(i: int) -> str:
    return f"52:54:00:fa:{(i >> 8) & 255:02x}:{i & 255:02x}"


def prepare_flake(root: Path, payload_kib: int, delay: int = 0, version: str = "1.0") -> Path:
    flake = root / "flake"
    subprocess.run(["sh", str(REPO / "deploy/demo-flake/prepare.sh"), str(flake)], check=True)
    write_knobs(flake, payload_kib, delay, version)
    return flake


def write_knobs(flake: Path, payload_kib: int, delay: int, version: str) -> None:
    (flake / "knobs.nix").write_text(
        f'{{ appVersion = "{version}"; payloadKiB = {payload_kib}; '
        f'kernelParams = "loglevel=4"; buildDelaySeconds = {delay}; }}\n'
    )


@dataclass
class FaultStack(Stack):
    machines: list[str]  # MACs, all on nixosConfigurations.demo
    relay: bool = False  # clients reach TFTP and the cache through relay ports
    tmpfs_bytes: int = 0  # >0: the cache runs with state/cache on a tmpfs of this size
    service_env: ClassVar[dict[str, str]] = {"NIX_CONFIG": NIX_ENV_CONFIG}

    def machine_attrs(self) -> list[tuple[str, str]]:
        return [(mac, "demo") for mac in self.machines]

    def allocate_ports(self) -> None:
        super().allocate_ports()
        self.ports["cache-public"] = free_port() if self.relay else self.ports["cache"]
        self.ports["tftp-public"] = free_port() if self.relay else self.ports["tftp-udp"]

    @property
    def public_cache_url(self) -> str:
        """What menus tell machines: the relay's port when there is one."""
        return f"http://127.0.0.1:{self.ports['cache-public']}"

    def start_service(self, name: str, argv_prefix: tuple[str, ...] = ()) -> None:
        if name == "cache" and self.tmpfs_bytes:
            # A private mount namespace: the tmpfs is visible to this process only and vanishes
            # with it; the host's mounts are never touched.
            cache_dir = self.state / "cache"
            cache_dir.mkdir(parents=True, exist_ok=True)
            script = (
                f'mount -t tmpfs -o size={self.tmpfs_bytes} nixboot-faults {cache_dir} && exec "$@"'
            )
            argv_prefix = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
        super().start_service(name, argv_prefix)

    def start_relay(self, loss: float, delay: float) -> subprocess.Popen[str]:
        """Put tests/faults/relay.py between clients and TFTP + the cache: clients use the
        relay's ports, and the services restart with menus naming the relay's HTTP port."""
        self.ports["cache-public"] = free_port()
        self.ports["tftp-public"] = free_port()
        relay = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("relay.py")),
             "--udp", f"{self.ports['tftp-public']}:{self.ports['tftp-udp']}",
             "--tcp", f"{self.ports['cache-public']}:{self.ports['cache']}",
             "--loss", str(loss), "--delay", str(delay)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        self._public_url_changed()
        return relay

    def stop_relay(self, relay: subprocess.Popen[str]) -> str:
        relay.terminate()
        out, _ = relay.communicate(timeout=10)
        self.ports["cache-public"] = self.ports["cache"]
        self.ports["tftp-public"] = self.ports["tftp-udp"]
        self._public_url_changed()
        return out.strip()

    def _public_url_changed(self) -> None:
        self.env["NIXBOOT_CACHE__PUBLIC_URL"] = self.public_cache_url
        for name in ("tftp", "cache"):
            self.stop_service(name)
            self.start_service(name)
        self.wait_healthy(("tftp", "cache"))

    async def default_toplevel(self) -> str:
        nc = await connect(self.nats_url)
        try:
            kv = await nc.jetstream().key_value(subjects.KV_GENERATIONS)
            entry = await kv.get(subjects.mac_token(self.machines[0]))
            mg = msgspec.json.decode(entry.value or b"", type=records.MachineGenerations)
        finally:
            await nc.close()
        default = mg.default()
        assert default is not None
        return default.toplevel

    async def closure_nar_bytes(self) -> int:
        """NAR bytes of one machine's closure (what the cache compresses into its directory)."""
        toplevel = await self.default_toplevel()
        out = await asyncio.to_thread(
            subprocess.run,
            ["nix", "path-info", "--json", "-r", toplevel],
            capture_output=True, text=True, check=True,
            env={**os.environ, "NIX_CONFIG": NIX_ENV_CONFIG},
        )  # fmt: skip
        return sum(int(p["narSize"]) for p in json.loads(out.stdout))

    def wipe(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
