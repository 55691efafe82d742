"""Warming: when a machine's lease is seen, make its current and pinned generations' closures
warm (narinfo answerable, compressed NAR on disk) before its initrd asks for them.

A classroom booting at once sends many events for the same toplevel: one warm runs per toplevel
and later events join it. Compression runs in the shared thread pool, at most ``parallel`` paths at
once (one per core): zstd and sha256 release the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nixboot_cache import metrics
from nixboot_cache.narcache import Fetch, NarCache
from nixboot_cache.store import PathInfo, StoreDb
from nixboot_shared import events

log = logging.getLogger(__name__)

Publish = Callable[[events.Event], Awaitable[None]]
ClosureOf = Callable[[str], Awaitable[list[PathInfo]]]


@dataclass
class WarmResult:
    toplevel: str
    paths: int
    built: int
    bytes: int
    compressed_bytes: int
    seconds: float


class Warmer:
    def __init__(
        self,
        store: StoreDb,
        cache: NarCache,
        publish: Publish,
        parallel: int,
        *,
        closure_of: ClosureOf | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        """``closure_of``/``fetch``: where closures and NARs come from when not from the local
        store (a cache filled from an upstream)."""
        self.store = store
        self.closure_of = closure_of
        self.fetch = fetch
        self.cache = cache
        self.publish = publish
        self.parallel = max(1, parallel)
        self._running: dict[str, asyncio.Task[WarmResult]] = {}
        self.started = 0  # warms actually run (deduplicated), for tests and /metrics

    def warm(
        self,
        toplevel: str,
        mac: str | None,
        trigger: str,
        *,
        decided: float,
    ) -> asyncio.Task[WarmResult]:
        """The warm of ``toplevel``: the running one if any, else a new one. ``decided``: when
        the lease thread decided it, which is when the warm counts as started."""
        task = self._running.get(toplevel)
        if task is not None and not task.done():
            return task
        self.started += 1
        # The warm starts when decided (its event says so), though the closure query runs in a
        # thread.
        task = asyncio.ensure_future(self._warm(toplevel, mac, trigger, decided))
        self._running[toplevel] = task
        task.add_done_callback(lambda _t: self._running.pop(toplevel, None))
        return task

    async def _warm(
        self, toplevel: str, mac: str | None, trigger: str, started: float
    ) -> WarmResult:
        t0 = time.monotonic()
        if self.closure_of is not None:
            try:
                closure = await self.closure_of(toplevel)
            except Exception:
                metrics.WARMS.labels("missing").inc()
                raise
        else:
            closure = await asyncio.to_thread(self.store.closure, toplevel)
        if not closure:
            metrics.WARMS.labels("missing").inc()
            raise LookupError(f"{toplevel} is not in the local store")
        total = sum(p.nar_size for p in closure)
        await self.publish(
            events.WarmStarted(
                mac=mac, toplevel=toplevel, paths=len(closure), trigger=trigger, ts=started
            )
        )
        log.info("warm %s: %d paths, %.1f MiB NAR", toplevel, len(closure), total / 2**20)
        sem = asyncio.Semaphore(self.parallel)
        done = built = nar_bytes = comp_bytes = 0
        last_report = time.monotonic()

        async def one(info_index: int) -> None:
            nonlocal done, built, nar_bytes, comp_bytes, last_report
            info = closure[info_index]
            async with sem:
                meta, was_built = await self.cache.ensure(info, self.fetch)
            done += 1
            built += was_built
            nar_bytes += meta.nar_size
            comp_bytes += meta.file_size
            now = time.monotonic()
            if now - last_report >= 1.0 or done == len(closure):
                last_report = now
                log.info(
                    "warm %s: %d/%d paths, %.1f/%.1f MiB",
                    toplevel, done, len(closure), nar_bytes / 2**20, total / 2**20,
                )  # fmt: skip
                await self.publish(
                    events.WarmProgress(
                        mac=mac, toplevel=toplevel, done=done, paths=len(closure), bytes=nar_bytes
                    )
                )

        try:
            await asyncio.gather(*(one(i) for i in range(len(closure))))
        except Exception:
            metrics.WARMS.labels("failed").inc()
            raise
        seconds = time.monotonic() - t0
        metrics.WARMS.labels("ok").inc()
        metrics.WARM_SECONDS.observe(seconds)
        await self.publish(
            events.WarmFinished(
                mac=mac,
                toplevel=toplevel,
                paths=len(closure),
                bytes=nar_bytes,
                compressed_bytes=comp_bytes,
                seconds=seconds,
            )
        )
        log.info("warm %s: done in %.2fs (%d compressed now)", toplevel, seconds, built)
        return WarmResult(toplevel, len(closure), built, nar_bytes, comp_bytes, seconds)
