"""The whole nixboot stack as separate processes on loopback, the way a supervisor runs it, with
the handles a fault test needs: SIGKILL a service and start it again, restart nats-server, run the
cache inside a private mount namespace whose state/cache is a small tmpfs, point clients at a relay.

Derived from bench/storm/nixboot_stack.py (copied, not imported: the lead is changing the bench)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import nats

from nixboot_shared import records, subjects

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVICES = ("dhcp-hook", "tftp", "builder", "cache")
NIX_ENV_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
class FaultStack:
    root: Path
    flake: Path
    machines: list[str]  # MACs, all on nixosConfigurations.demo
    relay: bool = False  # clients reach TFTP and the cache through relay ports
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    tmpfs_bytes: int = 0  # >0: the cache runs with state/cache on a tmpfs of this size

    @property
    def state(self) -> Path:
        return self.root / "state"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports['nats']}"

    @property
    def public_cache_url(self) -> str:
        """What menus tell machines: the relay's port when there is one."""
        return f"http://127.0.0.1:{self.ports['cache-public']}"

    @property
    def token(self) -> str:
        return (self.state / "api-token").read_text().strip()

    def write_config(self) -> Path:
        self.ports = {name: free_port() for name in (*SERVICES, "nats")}
        self.ports["tftp-udp"] = free_port(socket.SOCK_DGRAM)
        self.ports["cache-public"] = free_port() if self.relay else self.ports["cache"]
        self.ports["tftp-public"] = (
            free_port(socket.SOCK_DGRAM) if self.relay else self.ports["tftp-udp"]
        )
        machines = "".join(
            f'[[machines]]\nmac = "{mac}"\nname = "pc-{i:03d}"\nattr = "demo"\n'
            for i, mac in enumerate(self.machines)
        )
        config = self.root / "nixboot.toml"
        config.write_text(
            f'state_dir = "{self.state}"\nlog_level = "WARNING"\nmenu_timeout_seconds = 0\n'
            f'[nats]\nurl = "{self.nats_url}"\n'
            f'[tftp]\nhost = "127.0.0.1"\nport = {self.ports["tftp-udp"]}\nmax_transfers = 1024\n'
            f"[tftp.http]\nport = {self.ports['tftp']}\n"
            f'[cache]\npublic_url = "{self.public_cache_url}"\n'
            f'[cache.http]\nhost = "127.0.0.1"\nport = {self.ports["cache"]}\n'
            f'[builder]\nflake = "path:{self.flake}"\npoll_seconds = 3600\n'
            f"[builder.http]\nport = {self.ports['builder']}\n"
            f"[dhcp_hook.http]\nport = {self.ports['dhcp-hook']}\n" + machines
        )
        return config

    def start(self) -> None:
        config = self.write_config()
        self.state.mkdir(parents=True, exist_ok=True)
        self.start_nats()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
        self.env["NIXBOOT_CONFIG"] = str(config)
        self.env["NIX_CONFIG"] = NIX_ENV_CONFIG
        for name in SERVICES:
            self.start_service(name)
        self.wait_healthy(SERVICES)

    def start_nats(self) -> None:
        argv = [str(VENV_BIN / "nats-server"), "-js", "-sd", str(self.root / "nats")]
        argv += ["-a", "127.0.0.1", "-p", str(self.ports["nats"])]
        log = open(self.root / "nats.log", "ab")  # noqa: SIM115
        self.procs["nats"] = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.ports["nats"]), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def start_service(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "nixboot", "serve", name]
        if name == "cache" and self.tmpfs_bytes:
            # A private mount namespace: the tmpfs is visible to this process only and vanishes
            # with it; the host's mounts are never touched.
            cache_dir = self.state / "cache"
            cache_dir.mkdir(parents=True, exist_ok=True)
            script = (
                f'mount -t tmpfs -o size={self.tmpfs_bytes} nixboot-faults {cache_dir} && exec "$@"'
            )
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)

    def healthy(self, name: str) -> bool:
        try:
            return httpx.get(f"{self.url(name)}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, names: tuple[str, ...], timeout: float = 60) -> float:
        """Seconds until every one of ``names`` answers /healthz with 200."""
        start = time.monotonic()
        pending = set(names)
        while pending and time.monotonic() < start + timeout:
            pending = {n for n in pending if not self.healthy(n)}
            if pending:
                time.sleep(0.1)
        if pending:
            raise RuntimeError(f"not healthy: {sorted(pending)}; logs in {self.root}")
        return time.monotonic() - start

    def kill(self, name: str) -> None:
        """SIGKILL: no cleanup, no drain, as a crash or the OOM killer would."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_service(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for name in (*SERVICES, "nats"):
            self.stop_service(name)

    def start_relay(self, loss: float, delay: float) -> subprocess.Popen[str]:
        """Put tests/faults/relay.py between clients and TFTP + the cache: clients use the
        relay's ports, and the services restart with menus naming the relay's HTTP port."""
        self.ports["cache-public"] = free_port()
        self.ports["tftp-public"] = free_port(socket.SOCK_DGRAM)
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
        nc = await nats.connect(self.nats_url)
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

    def hook_argv(self) -> list[str]:
        """The real hook as a DHCP server runs it."""
        import nixboot_dhcp_hook.hook as hook

        return ["python3", "-S", "-I", hook.__file__ or "", "--state-dir", str(self.state)]

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def wipe(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def wait_generations(
    nats_url: str, macs: list[str], timeout: float, number: int = 1
) -> dict[str, records.Generation]:
    """Each machine's default generation once it is ``number`` (or newer)."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_GENERATIONS)
        deadline = time.monotonic() + timeout
        found: dict[str, records.Generation] = {}
        while time.monotonic() < deadline:
            for mac in macs:
                if mac in found:
                    continue
                try:
                    entry = await kv.get(subjects.mac_token(mac))
                except Exception:
                    continue
                mg = msgspec.json.decode(entry.value or b"", type=records.MachineGenerations)
                default = mg.default()
                if default is not None and default.number >= number:
                    found[mac] = default
            if len(found) == len(macs):
                return found
            await asyncio.sleep(0.3)
    finally:
        await nc.close()
    if number > 1:
        return found
    raise RuntimeError(f"generations missing for {len(macs) - len(found)} machines")
