"""The one component that correlates boot events into sessions: consumes the event stream with a
durable consumer, keeps each machine's recent events in KV ``nixboot-boots`` (so a restart resumes
where it stopped) and records the metrics of every finished session exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from nixboot_cache.timeline import metrics
from nixboot_cache.timeline import session as se
from nixboot_shared import bus, subjects
from nixboot_shared import events as ev
from nixboot_shared.config import TimelineConfig

log = logging.getLogger(__name__)

DURABLE = "nixboot-timeline"
# Hard cap per machine so a flapping machine cannot grow its KV value without bound.
MAX_EVENTS_PER_MACHINE = 500

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(se.MachineBoots)


class Tracker:
    def __init__(
        self,
        kv: KeyValue | None,
        cfg: TimelineConfig,
        clock: Callable[[], float] = time.time,
        record_metrics: bool = True,
    ) -> None:
        # kv None: a replay tracker that keeps its sessions in memory only, and
        # record_metrics False keeps replayed boots out of the live metrics.
        self.kv = kv
        self.record_metrics = record_metrics
        self.cfg = cfg
        self.rules = se.Rules(gap_seconds=cfg.gap_seconds, abandon_seconds=cfg.abandon_seconds)
        self.clock = clock
        self.machines: dict[str, se.MachineBoots] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Read every machine's state from KV (start-up, after a restart)."""
        if self.kv is None:
            return
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            if not entry.value:
                continue
            try:
                self.machines[key] = _decoder.decode(entry.value)
            except msgspec.DecodeError as e:
                # A record from an incompatible version: start that machine afresh, say so.
                log.error("timeline: dropping unreadable state of %s: %s", key, e)
        log.info("timeline: loaded %d machines", len(self.machines))

    async def handle(self, event: ev.AnyEvent) -> None:
        """Take one event (any order, possibly again); persist before the caller acks."""
        if not se.is_boot_event(event):
            return
        token = subjects.mac_token(event.mac)
        async with self._lock:
            state = self.machines.get(token) or se.MachineBoots(mac=event.mac or "")
            if not se.add_event(state, event, self.rules, self.cfg.keep_sessions):
                return
            if len(state.events) > MAX_EVENTS_PER_MACHINE:
                state.events = state.events[-MAX_EVENTS_PER_MACHINE:]
                state.horizon = state.events[0].ts
            self.machines[token] = state
            self._settle(state)
            await self._save(token, state)
            if self.record_metrics:
                # The per-stage gauge is refreshed by tick(): recomputing every machine's
                # sessions on each event would cost O(machines) per event.
                metrics.EVENTS_TRACKED.labels(event.kind).inc()

    async def tick(self) -> None:
        """Abandon stale sessions and record the ones that settled."""
        async with self._lock:
            for token, state in self.machines.items():
                if self._settle(state):
                    await self._save(token, state)
            if self.record_metrics:
                self._update_gauge()

    def _settle(self, state: se.MachineBoots) -> bool:
        outcomes = se.settled(state, self.clock(), self.rules, self.cfg.settle_seconds)
        if self.record_metrics:
            for o in outcomes:
                metrics.record(o)
        return bool(outcomes)

    async def _save(self, token: str, state: se.MachineBoots) -> None:
        if self.kv is not None:
            await self.kv.put(token, _encoder.encode(state))

    def _update_gauge(self) -> None:
        now = self.clock()
        counts: dict[str, int] = {}
        for state in self.machines.values():
            s = latest_boot(state, self.rules)
            if s is not None and s.result(now, self.rules, superseded=False) == "active":
                stage = s.current_stage()
                counts[stage] = counts.get(stage, 0) + 1
        metrics.set_in_progress(counts)

    async def run_ticks(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_seconds)
            try:
                await self.tick()
            except Exception:  # KV briefly unreachable: try again next tick
                log.exception("timeline: tick failed")

    async def subscribe(self, js: JetStreamContext) -> Any:
        """Durable consumer over every event from the stream's start: a first start (or a new
        deployment) builds sessions from the whole retained history."""
        return await bus.subscribe_events(js, self.handle, durable=DURABLE, deliver_new=False)


async def follow_replay(nc: Client, tracker: Tracker, prefix: str) -> Any:
    """Feed ``tracker`` from events republished under ``prefix`` (core NATS, see replay.py)."""

    async def on_msg(msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.BadEvent as e:
            log.error("replay: rejected message on %s: %s", msg.subject, e)
            return
        await tracker.handle(event)

    return await nc.subscribe(f"{prefix}.{subjects.EVENTS_SUBJECTS}", cb=on_msg)


def latest_boot(state: se.MachineBoots, rules: se.Rules) -> se.Session | None:
    boots = [s for s in se.segment(state.events, rules) if s.is_boot()]
    return boots[-1] if boots else None
