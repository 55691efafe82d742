"""Reading the event stream back: by start time or sequence, filtered by MAC and type."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from nixboot_shared import events as ev
from nixboot_shared import subjects

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class BadQuery(ValueError):
    """A time, MAC, type or prefix the reader cannot use; the message says which."""


def parse_time(value: str, now: float) -> float:
    """``10m`` / ``2h`` (ago), a Unix time, or an ISO 8601 time -> Unix time."""
    v = value.strip()
    m = _DURATION.match(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise BadQuery(
            f"cannot read time {value!r}: use a duration like 10m, a Unix time or ISO 8601"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


@dataclass(frozen=True)
class Query:
    since: float | None = None  # Unix time; None with start_seq None: from the beginning
    start_seq: int | None = None
    until: float | None = None
    mac: str | None = None
    kind: str | None = None
    limit: int | None = None

    def filter_subject(self) -> str:
        kind = self.kind or "*"
        if self.kind is not None and not _TOKEN.match(self.kind):
            raise BadQuery(f"invalid event type {self.kind!r}")
        try:
            mac = subjects.mac_token(self.mac) if self.mac else "*"
        except subjects.InvalidMac as e:
            raise BadQuery(str(e)) from None
        return f"{subjects.PREFIX}.evt.{kind}.{mac}"


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    data: bytes
    event: ev.AnyEvent | None  # None: the payload does not decode (shown, not dropped)


async def read(js: JetStreamContext, q: Query, follow: bool = False) -> AsyncIterator[Stored]:
    """Events stored in the stream matching ``q``, in stream order. Stops at the end of what was
    stored when called, unless ``follow``. Uses an ephemeral consumer with no acks."""
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, inactive_threshold=30.0, deliver_policy=DeliverPolicy.ALL
    )
    if q.start_seq is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = q.start_seq
    elif q.since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = dt.datetime.fromtimestamp(q.since, tz=dt.UTC)
    sub = await js.pull_subscribe(q.filter_subject(), stream=subjects.EVENTS_STREAM, config=config)
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        seen = 0
        given = 0
        while follow or seen < pending:
            try:
                msgs = await sub.fetch(batch=256 if not follow else 64, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                if follow:
                    continue
                break  # nothing more arrived: what was pending was filtered or expired
            for msg in msgs:
                seen += 1
                meta = msg.metadata
                try:
                    event: ev.AnyEvent | None = ev.decode(msg.data)
                except ev.BadEvent:
                    event = None
                # Events may be stored out of ts order: skip, do not stop, past ``until``.
                if q.until is not None and event is not None and event.ts > q.until:
                    continue
                yield Stored(meta.sequence.stream, msg.subject, msg.data, event)
                given += 1
                if q.limit is not None and given >= q.limit:
                    return
    finally:
        with contextlib.suppress(Exception):  # the ephemeral consumer expires on its own
            await sub.unsubscribe()


def check_prefix(prefix: str) -> str:
    """A replay prefix (``subjects.check_replay_prefix``), as a ``BadQuery``."""
    try:
        return subjects.check_replay_prefix(prefix)
    except subjects.InvalidPrefix as e:
        raise BadQuery(str(e)) from None
