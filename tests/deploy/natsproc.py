"""Real nats-server processes from the venv for the deployment tests: one node or a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats

from nixboot_shared import bus
from nixboot_shared.config import NatsConfig
from tests.harness import stack as harness

NATS_SERVER = Path(sys.executable).parent / "nats-server"


def free_port() -> int:
    """A port below the ephemeral range (see tests/harness/stack.py): nodes restart on it."""
    return harness.free_port()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class NatsNode:
    """One nats-server; ``args`` are passed after the common ones, restart reuses them and the
    store directory (a restarted cluster member must catch up from its own store)."""

    name: str
    store: Path
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.store.parent / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by Popen
        self.proc = subprocess.Popen(
            [
                *(str(NATS_SERVER), "-n", self.name, "-a", "127.0.0.1", "-p", str(self.port)),
                *("-js", "-sd", str(self.store), *self.args),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port)

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def cluster_nodes(base: Path, size: int = 3, cluster_name: str = "nixboot") -> list[NatsNode]:
    """``size`` nodes on loopback, every node given routes to all the others."""
    route_ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    return [
        NatsNode(
            name=f"n{i}",
            store=base / f"n{i}",
            args=[
                "--cluster_name",
                cluster_name,
                "--cluster",
                f"nats://127.0.0.1:{route_ports[i]}",
                "--routes",
                routes,
            ],
        )
        for i in range(size)
    ]


async def wait_jetstream(
    url: str, settings: NatsConfig | None = None, timeout: float = 20.0
) -> None:
    """Until JetStream answers through ``url`` (a cluster needs its meta leader elected first);
    ``settings``: authentication/TLS as nixboot's configuration gives them."""
    opts = bus.client_options(settings) if settings is not None else {}
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, **opts)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception as e:  # not yet: no meta leader, connection refused
            last = e
            await asyncio.sleep(0.2)
    raise TimeoutError(f"JetStream not ready at {url}: {last}")
