"""The nixboot stack as the benchmark runs it: nats-server and the four services on loopback, each
a `nixboot serve` process, so one service (the cache) can be restarted cold between rounds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from classic import free_port

SERVICES = ("dhcp-hook", "tftp", "builder", "cache")


@dataclass
class NixbootStack:
    root: Path
    flake: Path
    machines: list[tuple[str, str]]  # (mac, attr)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def cache_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['cache']}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports['nats']}"

    def write_config(self) -> Path:
        self.ports = {name: free_port() for name in (*SERVICES, "nats")}
        self.ports["tftp-udp"] = free_port()
        machines = "".join(
            f'[[machines]]\nmac = "{mac}"\nname = "pc-{i:03d}"\nattr = "{attr}"\n'
            for i, (mac, attr) in enumerate(self.machines)
        )
        config = self.root / "nixboot.toml"
        config.write_text(
            f'state_dir = "{self.state}"\nlog_level = "WARNING"\nmenu_timeout_seconds = 0\n'
            f'[nats]\nurl = "{self.nats_url}"\n'
            f'[tftp]\nhost = "127.0.0.1"\nport = {self.ports["tftp-udp"]}\nmax_transfers = 1024\n'
            f"[tftp.http]\nport = {self.ports['tftp']}\n"
            f'[cache]\npublic_url = "{self.cache_url}"\n'
            f'[cache.http]\nhost = "127.0.0.1"\nport = {self.ports["cache"]}\n'
            f'[builder]\nflake = "path:{self.flake}"\npoll_seconds = 3600\n'
            f"[builder.http]\nport = {self.ports['builder']}\n"
            f"[dhcp_hook.http]\nport = {self.ports['dhcp-hook']}\n" + machines
        )
        return config

    def start(self) -> None:
        config = self.write_config()
        self.state.mkdir(parents=True, exist_ok=True)
        nats_bin = Path(sys.executable).parent / "nats-server"
        self.procs["nats"] = subprocess.Popen(
            [
                str(nats_bin),
                "-js",
                "-sd",
                str(self.root / "nats"),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.ports["nats"]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
        self.env["NIXBOOT_CONFIG"] = str(config)
        for name in SERVICES:
            self.start_service(name)
        self.wait_healthy(SERVICES)

    def start_service(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "nixboot", "serve", name], env=self.env, stdout=log, stderr=log
        )

    def wait_healthy(self, names: tuple[str, ...], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                try:
                    url = f"http://127.0.0.1:{self.ports[name]}/healthz"
                    if httpx.get(url, timeout=1).status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"not healthy: {sorted(pending)}; logs in {self.root}")

    def restart_cache_cold(self) -> None:
        """Cold: no compressed NAR on disk, no memo in memory."""
        self.stop_service("cache")
        shutil.rmtree(self.state / "cache", ignore_errors=True)
        self.start_service("cache")
        self.wait_healthy(("cache",))

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

    def hook_argv(self) -> list[str]:
        """The real hook as a DHCP server runs it (deploy/dhcp/nixboot-dhcp-hook.sh's command)."""
        import nixboot_dhcp_hook.hook as hook

        return ["python3", "-S", "-I", hook.__file__ or "", "--state-dir", str(self.state)]

    def public_key(self) -> str:
        return (self.state / "cache-key.pub").read_text().strip()
