"""The build pipeline: take a request off the shared JetStream work queue, build it with nix,
record generations for every machine using the attribute, then ack. A builder killed mid-build
never acks, so JetStream redelivers the request to another (or the restarted) instance."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import FetchTimeoutError

from nixboot_builder import gcroots, generations, metrics, nixlog, wire
from nixboot_builder.nix import Nix, NixError, read_boot_files
from nixboot_builder.store import FALLBACK_KEY, Store
from nixboot_shared import bus, events, subjects
from nixboot_shared import metrics as shared_metrics
from nixboot_shared.records import Generation, MachineGenerations

log = logging.getLogger(__name__)

DURABLE = "nixboot-builders"
# Redelivery delay after a crash; a live builder extends it with in-progress acks.
ACK_WAIT_SECONDS = 10.0
PROGRESS_EVERY_SECONDS = 0.5


def pending_root(state_dir: Path, build_id: str) -> Path:
    """The GC root nix makes for a build's result, held until the generation's numbered roots
    exist (``gcroots``). Named by build: a redelivered request reuses (and replaces) it."""
    return state_dir / "building" / build_id


async def request_build(
    js: JetStreamContext,
    attr: str,
    reason: str,
    dedupe_key: str | None = None,
    flake_rev: str | None = None,
) -> wire.BuildRequest:
    """Queue a build of ``attr``. ``dedupe_key`` (e.g. attr + flake revision) makes requests from
    several instances or polls collapse into one within JetStream's duplicate window."""
    req = wire.BuildRequest(attr=attr, reason=reason, flake_rev=flake_rev)
    headers = {"Nats-Msg-Id": dedupe_key or req.build_id}
    ack = await js.publish(subjects.build_request_subject(attr), wire.encode(req), headers=headers)
    if ack.duplicate:
        log.info("build of %s already queued (%s)", attr, dedupe_key)
        return req
    await bus.publish(js, events.BuildRequested(build_id=req.build_id, attr=attr, reason=reason))
    return req


def generation_event_id(key: str, gen: Generation) -> str:
    """Same generation, same event id: a re-announcement is deduplicated by JetStream."""
    return hashlib.sha256(f"{key}/{gen.number}/{gen.toplevel}".encode()).hexdigest()[:32]


class Builder:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        store: Store,
        nix: Nix,
        flake: str,
        state_dir: Path,
        keep: int,
        fallback_attr: str = "",
    ) -> None:
        self.nc, self.js, self.store, self.nix = nc, js, store, nix
        self.flake, self.state_dir, self.keep = flake, state_dir, keep
        self.fallback_attr = fallback_attr
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stopping = False

    async def stop(self) -> None:
        """Leave the work queue. Called before the NATS connection drains: a pull subscription
        left behind mid-fetch holds the drain for its whole timeout."""
        self._stopping = True
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def run(self) -> None:
        self._sub = sub = await self.js.pull_subscribe(
            subjects.BUILDS_SUBJECTS,
            durable=DURABLE,
            stream=subjects.BUILDS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_SECONDS, max_deliver=-1
            ),
        )
        while not self._stopping:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except (FetchTimeoutError, TimeoutError):
                continue
            except Exception:
                if self._stopping:
                    return
                raise
            for msg in msgs:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        try:
            req = wire.decode_request(msg.data)
        except Exception as e:
            log.error("dropping undecodable build request on %s: %s", msg.subject, e)
            shared_metrics.EVENTS_REJECTED.labels(DURABLE).inc()
            await msg.term()
            return
        heartbeat = asyncio.ensure_future(self._keep_alive(msg))
        try:
            await self.build(req)
        except Exception:
            # NATS or KV trouble while recording: let another attempt redo it.
            log.exception("build %s could not be recorded; will be redelivered", req.build_id)
            await msg.nak(delay=2)
            return
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        await msg.ack_sync()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(ACK_WAIT_SECONDS / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _log(self, build_id: str, record: wire.LogRecord) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.build_log_subject(build_id), wire.encode(record))

    async def build(self, req: wire.BuildRequest) -> Generation | None:
        """Build one request and record the result; a nix failure is a result (BuildFailed)."""
        started = time.monotonic()
        bid, attr = req.build_id, req.attr
        try:
            rev = req.flake_rev or await self.nix.flake_fingerprint(self.flake)
        except NixError as e:
            await self._fail(req, str(e), e.log_tail)
            return None
        await bus.publish(self.js, events.BuildStarted(build_id=bid, attr=attr, flake_rev=rev))
        last_progress = 0.0

        async def on_update(updates: list[nixlog.Update]) -> None:
            nonlocal last_progress
            for u in updates:
                if isinstance(u, nixlog.LogLine | nixlog.ErrorMessage):
                    await self._log(bid, wire.LogRecord(kind="line", text=u.text))
                else:
                    rec = wire.LogRecord(
                        kind="progress", done=u.done, expected=u.expected, current=u.current
                    )
                    await self._log(bid, rec)
                    now = time.monotonic()
                    if now - last_progress >= PROGRESS_EVERY_SECONDS or u.done == u.expected:
                        last_progress = now
                        await bus.publish(
                            self.js,
                            events.BuildProgress(
                                build_id=bid,
                                attr=attr,
                                done=u.done,
                                expected=u.expected,
                                current=u.current,
                            ),
                        )

        pending = pending_root(self.state_dir, bid)
        try:
            toplevel, _state, _lines = await self.nix.build(self.flake, attr, on_update, pending)
            boot = read_boot_files(toplevel)
        except NixError as e:
            await self._fail(req, str(e), e.log_tail)
            if pending.is_symlink():
                # Left by an attempt that crashed after building: it may have recorded a
                # generation whose numbered root was never made. Make them, then let go.
                await self.finish(attr, None, None)
                pending.unlink(missing_ok=True)
            return None
        # The closure size needs a nix process: it runs while the generation is recorded and
        # is filled in afterwards (0 = not measured yet), so nix's start-up is off the path.
        closure_task = asyncio.ensure_future(self._closure_size(toplevel))
        seconds = time.monotonic() - started
        new = Generation(
            number=0,
            toplevel=boot.toplevel,
            kernel=boot.kernel,
            initrd=boot.initrd,
            kernel_params=boot.kernel_params,
            init=boot.init,
            flake_rev=rev,
            closure_size=0,
            created=time.time(),
        )
        built = time.monotonic()
        try:
            created = await self.record(attr, new)
            # Registered and announced; the toplevel is pinned by the pending root meanwhile.
            await self.finish(attr, toplevel, await closure_task)
        finally:
            closure_task.cancel()
        pending.unlink(missing_ok=True)
        # Counted before it is announced, so whoever sees the event finds it in /metrics too.
        metrics.BUILDS.labels("ok").inc()
        metrics.BUILD_SECONDS.observe(seconds)
        # Announced after recording: whoever sees it finds the generations already in KV, with
        # their closure sizes and GC roots.
        await bus.publish(
            self.js,
            events.BuildSucceeded(build_id=bid, attr=attr, toplevel=toplevel, seconds=seconds),
        )
        await self._log(bid, wire.LogRecord(kind="end", ok=True, toplevel=toplevel))
        log.info(
            "build %s of %s: %s in %.2fs, recorded in %.2fs",
            bid,
            attr,
            toplevel,
            seconds,
            time.monotonic() - built,
        )
        return created

    async def _closure_size(self, toplevel: str) -> int | None:
        try:
            return await self.nix.closure_size(toplevel)
        except NixError as e:
            log.warning("closure size of %s: %s", toplevel, e)
            return None

    async def _targets(self, attr: str) -> list[tuple[str, str]]:
        """(generations key, mac) of every machine using ``attr`` (and the fallback record)."""
        machines = await self.store.machines()
        targets = [(subjects.mac_token(m.mac), m.mac) for m in machines if m.attr == attr]
        if attr == self.fallback_attr:
            targets.append((FALLBACK_KEY, FALLBACK_KEY))
        return targets

    async def record(self, attr: str, new: Generation) -> Generation | None:
        """Add ``new`` to every machine using ``attr`` (and the fallback record) and announce
        the generations created. GC roots and the closure size follow in ``finish``."""
        created_any: Generation | None = None
        for key, mac in await self._targets(attr):
            outcome: list[generations.Added] = []

            def apply(
                record: MachineGenerations, outcome: list[generations.Added] = outcome
            ) -> MachineGenerations:
                outcome.clear()
                outcome.append(generations.add_build(record, new, self.keep))
                return outcome[0].record

            await self.store.update_generations(key, mac, apply)
            created = outcome[0].created if outcome else None
            announce = created
            if created is None and outcome:
                # A builder killed between the KV write above and the publish below left a
                # recent generation without its event: announce it again under the same id
                # (JetStream drops the copy if the first publish got through).
                newest = outcome[0].record.newest_first()[:1]
                if (
                    newest
                    and newest[0].toplevel == new.toplevel
                    and time.time() - newest[0].created < bus.DUPLICATE_WINDOW_SECONDS / 2
                ):
                    announce = newest[0]
            if created is not None:
                created_any = created
            if announce is not None:
                await bus.publish(
                    self.js,
                    events.GenerationCreated(
                        id=generation_event_id(key, announce),
                        mac=None if key == FALLBACK_KEY else mac,
                        number=announce.number,
                        toplevel=announce.toplevel,
                        attr=attr,
                    ),
                )
        return created_any

    async def finish(self, attr: str, toplevel: str | None, closure: int | None) -> None:
        """Fill in the closure size of ``toplevel``'s generations still without one, and sync
        the GC roots of every record using ``attr``."""
        for key, mac in await self._targets(attr):
            record = await self.store.generations(key)
            if record is None:
                continue  # removed meanwhile (its roots went with it)
            if toplevel is not None and closure:

                def fill(
                    r: MachineGenerations, top: str = toplevel, size: int = closure
                ) -> MachineGenerations:
                    return generations.set_closure_size(r, top, size)

                record = await self.store.update_generations(key, mac, fill)
            await gcroots.sync(self.nix, self.state_dir, key, record)

    async def _fail(self, req: wire.BuildRequest, error: str, tail: str) -> None:
        log.warning("build %s of %s failed: %s", req.build_id, req.attr, error)
        metrics.BUILDS.labels("failed").inc()
        await bus.publish(
            self.js,
            events.BuildFailed(
                build_id=req.build_id, attr=req.attr, error=error[:4000], log_tail=tail[-4000:]
            ),
        )
        await self._log(req.build_id, wire.LogRecord(kind="end", ok=False, text=error))
