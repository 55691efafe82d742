"""Flake change detection in-process: the inotify watcher on a real directory, and the poller
against a real nats-server and the real nix, woken by inotify or by its interval alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from nixboot_builder import demo
from nixboot_builder.inotify import TreeWatcher
from nixboot_builder.nix import Nix
from nixboot_builder.poller import FlakePoller
from nixboot_builder.store import Store
from nixboot_shared import bus, events, subjects
from nixboot_shared.records import Machine


async def woke(watcher: TreeWatcher, within: float = 10.0) -> bool:
    # Positive checks wait long (a loaded machine may be slow to deliver); negative ones pass short.
    try:
        await asyncio.wait_for(watcher.changed.wait(), within)
    except TimeoutError:
        return False
    watcher.changed.clear()
    return True


async def test_tree_watcher_wakes_on_completed_changes_only(tmp_path: Path) -> None:
    (tmp_path / "a.nix").write_text("old")
    (tmp_path / ".git" / "objects" / "ab").mkdir(parents=True)
    watcher = TreeWatcher(tmp_path, settle=0.02)
    watcher.start()
    try:
        assert not await woke(watcher, 0.2)
        (tmp_path / "a.nix").read_text()  # reading is no change
        assert not await woke(watcher, 0.2)
        # A file being written wakes nobody until it is closed.
        with (tmp_path / "a.nix").open("w") as f:
            f.write("half")
            f.flush()
            assert not await woke(watcher, 0.3)
        assert await woke(watcher)
        # A new directory is watched too, including what appears in it later.
        (tmp_path / "sub").mkdir()
        assert await woke(watcher)
        (tmp_path / "sub" / "b.nix").write_text("b")
        assert await woke(watcher)
        (tmp_path / "sub" / "b.nix").chmod(0o755)
        assert await woke(watcher)
        (tmp_path / "sub" / "b.nix").unlink()
        assert await woke(watcher)
        # Git's object store is left out (its refs are not).
        (tmp_path / ".git" / "objects" / "ab" / "cdef").write_bytes(b"blob")
        assert not await woke(watcher, 0.3)
        (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        assert await woke(watcher)
    finally:
        watcher.close()


@pytest.fixture
async def js_store(nats_url: str) -> AsyncIterator[tuple[Client, Store]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    kv = await bus.bootstrap(js)
    store = Store(js, kv[subjects.KV_MACHINES], kv[subjects.KV_GENERATIONS])
    await store.put_machine(Machine(mac="52:54:00:00:01:01", name="p", attr="demo"))
    yield nc, store
    await nc.drain()


@pytest.mark.parametrize("watch", [True, False], ids=["inotify", "interval-only"])
async def test_poller_queues_a_build_per_change(
    js_store: tuple[Client, Store], flake_dir: Path, watch: bool
) -> None:
    nc, store = js_store
    requested: asyncio.Queue[float] = asyncio.Queue()

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        if isinstance(events.decode(msg.data), events.BuildRequested):
            await requested.put(time.monotonic())

    await nc.subscribe("nixboot.evt.>", cb=on_event)
    await nc.flush()
    # Interval 30 s with inotify: only the watch can explain a request within 15 s of the change
    # (the interval is counted from the end of the previous poll, which came after the previous
    # request). Without it, 0.3 s. The 15 s bound leaves a loaded CI machine room for nix eval.
    interval = 30.0 if watch else 0.3
    bound = 15.0
    assert bound < interval or not watch
    poller = FlakePoller(nc.jetstream(), store, Nix(), f"path:{flake_dir}", watch=watch)
    task = asyncio.ensure_future(poller.run(interval))
    try:
        await asyncio.wait_for(requested.get(), 30)  # first start: no generation yet
        for n in range(2):
            start = time.monotonic()
            demo.set_knob(flake_dir, "appVersion", f"poller-{watch}-{n}-{time.monotonic_ns()}")
            seen = await asyncio.wait_for(requested.get(), 20)
            assert seen - start < bound, seen - start
        # A touch that leaves the content alone queues nothing (same fingerprint).
        (flake_dir / "knobs.nix").touch()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(requested.get(), 1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
