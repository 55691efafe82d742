"""Run the builder service as a real process (so tests can kill it) and watch its events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client

from nixboot_shared import events
from tests.conftest import free_port


class BuilderProcess:
    def __init__(
        self,
        tmp: Path,
        nats_url: str,
        flake: str,
        machines: list[dict[str, str]],
        keep: int = 5,
        poll_seconds: float = 0.0,
        name: str = "builder",
        fallback_attr: str = "",
    ) -> None:
        self.state_dir = tmp / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"{name}.toml"
        lines = [
            f'state_dir = "{self.state_dir}"',
            f'fallback_attr = "{fallback_attr}"',
            "[nats]",
            f'url = "{nats_url}"',
            "[builder]",
            f'flake = "{flake}"',
            f"poll_seconds = {poll_seconds}",
            f"keep_generations = {keep}",
            "[builder.http]",
            'host = "127.0.0.1"',
            f"port = {self.port}",
        ]
        for m in machines:
            lines += ["[[machines]]", *(f"{k} = {json.dumps(v)}" for k, v in m.items())]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, NIXBOOT_CONFIG=str(self.config))
        with self.log.open("ab") as out:
            # Own session: a kill of the group also takes its nix child, like a crashed host.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nixboot_builder"],
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"builder did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    @property
    def token(self) -> str:
        return (self.state_dir / "api-token").read_text().strip()

    def client(self, auth: bool = True) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


class EventLog:
    """Every nixboot event published while the test runs (core subscription to the subjects)."""

    def __init__(self) -> None:
        self.events: list[events.AnyEvent] = []
        self.nc: Client | None = None
        self._changed = asyncio.Event()

    async def start(self, url: str) -> EventLog:
        self.nc = await nats.connect(url)

        async def on_msg(msg: Any) -> None:
            self.events.append(events.decode(msg.data))
            self._changed.set()

        await self.nc.subscribe("nixboot.evt.>", cb=on_msg)
        await self.nc.flush()  # subscribed on the server before the test goes on
        return self

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.drain()

    def of(self, kind: type[Any], **match: Any) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, pred: Callable[[], bool], timeout: float = 60.0, what: str = "event"
    ) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = [type(e).__name__ for e in self.events]
                raise TimeoutError(f"timed out waiting for {what}; events: {kinds}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
