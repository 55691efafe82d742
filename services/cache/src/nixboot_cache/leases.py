"""Lease events on a thread of their own: its own event loop and NATS connection.

Lease → warm started is on every boot's critical path, and during a storm the service's main loop
is busy answering every machine's narinfos, NARs and reports. A lease event read on that loop went
through nats-py's reader task, the subscription's queue and the callback task, each waiting behind
the HTTP work: the cache's share of lease → warm started reached 80-170 ms p99 at N = 50
(bench/storm, 2 cores). Here the event is read and decoded and the warm decided on a quiet loop;
the main loop (which owns the warmer, the NAR cache and its executor) gets one
``call_soon_threadsafe``. How long that hand-over waits for the main loop is measured
(``nixboot_cache_lease_handoff_seconds``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from nixboot_shared import bus, events, subjects
from nixboot_shared.config import Config

log = logging.getLogger(__name__)

# Decide what to warm for a lease (runs on the lease thread; must not touch main-loop objects
# other than by reading), and return the handoff that starts it on the main loop.
Handoff = Callable[[], None]
Decide = Callable[[events.LeaseSeen, Any], Awaitable[Handoff | None]]


def lease_handler(
    decide: Decide, kv: Any, run: Callable[[Handoff], object]
) -> Callable[[events.AnyEvent], Awaitable[None]]:
    """The lease events' handler: decide where the event is read, then ``run`` the handoff
    (on the main loop: from the lease thread, or at once in replay mode)."""

    async def on_event(event: events.AnyEvent) -> None:
        if not isinstance(event, events.LeaseSeen):
            return
        handoff = await decide(event, kv)
        if handoff is not None:
            run(handoff)

    return on_event


class LeaseThread:
    def __init__(
        self, cfg: Config, durable: str, filter_subject: str, decide: Decide, name: str
    ) -> None:
        self.cfg = cfg
        self.durable = durable
        self.filter_subject = filter_subject
        self.decide = decide
        self.name = name
        self.main_loop: asyncio.AbstractEventLoop | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start the thread; returns once its consumer is subscribed (or raises its error)."""
        self.main_loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=self.name, daemon=True
        )
        self._thread.start()
        await asyncio.wait_for(asyncio.wrap_future(ready), timeout)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException as e:  # reported to start(), or logged once running
            if not ready.done():
                ready.set_exception(e)
            else:
                log.exception("lease thread failed")
        finally:
            loop.close()

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        self._stopped = asyncio.Event()
        nc = await bus.connect(self.cfg.nats.url, self.name, settings=self.cfg.nats)
        try:
            js = nc.jetstream()
            kv = await js.key_value(subjects.KV_GENERATIONS)

            main_loop = self.main_loop
            assert main_loop is not None
            # call_soon_threadsafe raises once the main loop is closed: the event is nak'ed,
            # not lost.
            on_event = lease_handler(self.decide, kv, main_loop.call_soon_threadsafe)
            await bus.subscribe_events(
                js, on_event, durable=self.durable, filter_subject=self.filter_subject
            )
            ready.set_result(None)
            await self._stopped.wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)

    async def stop(self) -> None:
        """Drain the connection and end the thread (from the main loop, at shutdown)."""
        if self.loop is None or self._stopped is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop already ended
            self.loop.call_soon_threadsafe(self._stopped.set)
        await asyncio.to_thread(self._thread.join, 10)
