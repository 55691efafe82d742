"""The watch-kept KV mirror (the cache's lease map): current after puts and deletes, and after
the NATS server restarts under it (nats-py re-creates the watch's ordered consumer). Real
nats-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats

from nixboot_shared import bus, subjects
from nixboot_shared.view import KvMirror
from tests.conftest import NatsServer


async def eventually(cond: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_mirror_follows_puts_deletes_and_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js")
    server.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        kv = (await bus.bootstrap(nc.jetstream()))[subjects.KV_LEASES]
        await kv.put("a", b"1")
        await kv.put("b", b"2")
        mirror = KvMirror(kv, bytes)
        task = asyncio.ensure_future(mirror.run())
        await asyncio.wait_for(mirror.ready.wait(), 10)
        assert mirror.values == {"a": b"1", "b": b"2"}
        await kv.delete("b")
        await kv.put("c", b"3")
        await eventually(lambda: mirror.values == {"a": b"1", "c": b"3"}, "puts and deletes")

        server.stop()
        server.start()
        await eventually(lambda: nc.is_connected, "reconnected")
        for _ in range(100):  # JetStream takes a moment to be back after the restart
            try:
                await kv.delete("a")
                await kv.put("d", b"4")
                break
            except Exception:
                await asyncio.sleep(0.1)
        await eventually(
            lambda: mirror.values == {"c": b"3", "d": b"4"}, f"after restart: {mirror.values}"
        )
        task.cancel()
    finally:
        await nc.close()
        server.stop()
