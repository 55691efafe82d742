"""Replay mode of the service frame: a service consumes events republished under a subject
prefix (``nixboot replay --to PREFIX``) and keeps every side effect apart from the live system.

``nixboot serve <svc> --replay PREFIX`` calls ``session`` (a config with its own state dir and
listeners), and the frame (``service.run``) hands the service ``open_bus``'s views instead of the
live connection:

- consuming: ``js.subscribe`` / ``nc.subscribe`` on ``nixboot.…`` become core NATS subscriptions
  on ``PREFIX.nixboot.…``. Core, not an ephemeral JetStream consumer: ``nixboot replay``
  republishes on core NATS, and ``PREFIX.nixboot.evt.>`` is in no stream (no stream may overlap
  the live one's subjects without capturing them). So: start the service first, then replay.
  There are no durable consumers at all, so none can collide with (or move) the live ones; acks
  are no-ops and a failed handler is logged, never redelivered.
- publishing: every ``js.publish`` and every ``nc.publish`` on ``nixboot.…`` goes to
  ``PREFIX.<subject>`` on core NATS: never into the live stream, never to live subscribers.
- KV: the service gets copies of the buckets, ``replay_<prefix>_<service>_<bucket>`` (memory
  storage), seeded from the live ones at start, except the buckets derived only from events
  (``DERIVED_BUCKETS``: the tracker's boots), which start empty so replayed events rebuild them.
  The copies are deleted when the service stops; the live buckets are never written.
- JetStream management (streams, consumers, buckets) and durable pull consumers (the builder's
  work queue) are refused with ``ReplayRefused``; read-only reads (an ephemeral, ack-less pull
  consumer over the stored events) still work.
- files and listeners: a fresh state directory (seeded with the small top-level files of the live
  one: signing key, secrets, API token; never its NAR cache or spool), HTTP on 127.0.0.1 with an
  ephemeral port, TFTP on an ephemeral port, the DHCP hook socket inside the replay state dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, cast

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.client import (
    DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
    DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
)
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from nixboot_shared import subjects
from nixboot_shared.config import Config

log = logging.getLogger(__name__)

# Written into a replay state dir by ``prepare``: the frame refuses replay mode without it (a
# ``replay_prefix`` set by hand would otherwise run with the live state dir and ports).
MARKER = ".nixboot-replay"
# Top-level files of the live state dir copied into the replay one (keys, secrets, token).
SEED_FILE_MAX_BYTES = 1 << 20
# Buckets written only from events: a replay rebuilds them from the replayed events.
DERIVED_BUCKETS = (subjects.KV_BOOTS,)


class ReplayRefused(RuntimeError):
    """An operation that would change live JetStream state, refused in replay mode."""


class NotPrepared(RuntimeError):
    """``replay_prefix`` set without ``nixboot serve --replay`` (no replay state dir)."""


def bucket_copy(prefix: str, service: str, bucket: str) -> str:
    return f"replay_{prefix.replace('.', '_')}_{service}_{bucket}"


def prepare(cfg: Config, prefix: str, state_dir: Path) -> Config:
    """``cfg`` for replay mode under ``prefix``, with ``state_dir`` (empty, created by the
    caller) as its state directory, seeded from the live one."""
    subjects.check_replay_prefix(prefix)
    live = cfg.state_path
    if cfg.state_dir and live.is_dir():
        for f in live.iterdir():
            with contextlib.suppress(OSError):  # unreadable or vanished: the service makes anew
                if f.is_file() and not f.is_symlink() and f.stat().st_size <= SEED_FILE_MAX_BYTES:
                    shutil.copy2(f, state_dir / f.name)
    (state_dir / MARKER).write_text(prefix + "\n")

    def local(listen: Any) -> Any:
        # uvicorn: the frame hands it a socket bound to an ephemeral port (granian takes none).
        return msgspec.structs.replace(listen, host="127.0.0.1", port=0, server="uvicorn")

    r = msgspec.structs.replace
    return r(
        cfg,
        replay_prefix=prefix,
        state_dir=str(state_dir),
        tftp=r(cfg.tftp, host="127.0.0.1", port=0, http=local(cfg.tftp.http)),
        cache=r(cfg.cache, http=local(cfg.cache.http)),
        builder=r(cfg.builder, http=local(cfg.builder.http)),
        dhcp_hook=r(
            cfg.dhcp_hook,
            http=local(cfg.dhcp_hook.http),
            socket=str(state_dir / "dhcp-hook.sock"),
            spool_dir=str(state_dir / "spool"),
        ),
    )


@contextlib.contextmanager
def session(cfg: Config, prefix: str) -> Iterator[Config]:
    """A replay config with a temporary state dir, removed afterwards (warmed NARs included)."""
    subjects.check_replay_prefix(prefix)
    state = Path(tempfile.mkdtemp(prefix=f"nixboot-replay-{prefix.replace('.', '_')}-"))
    try:
        yield prepare(cfg, prefix, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def check_prepared(cfg: Config) -> None:
    if not (cfg.state_path / MARKER).is_file():
        raise NotPrepared(
            f"replay_prefix {cfg.replay_prefix!r} is set but {cfg.state_path} is no replay state "
            "dir: start replay mode with `nixboot serve <service> --replay PREFIX`"
        )


@dataclasses.dataclass
class ReplayedMsg(Msg):
    """A core NATS message handed to a JetStream-style handler: acks are no-ops."""

    async def ack(self) -> None:
        return

    async def ack_sync(self, timeout: float = 1.0) -> Msg:
        return self

    async def nak(self, delay: int | float | None = None) -> None:
        log.warning("replay: handler failed on %s; replay mode does not redeliver", self.subject)

    async def in_progress(self) -> None:
        return

    async def term(self) -> None:
        return

    @classmethod
    def of(cls, msg: Msg) -> ReplayedMsg:
        return cls(
            _client=msg._client,
            subject=msg.subject,
            reply=msg.reply,
            data=msg.data,
            headers=msg.headers,
            _sid=msg._sid,
        )


class ReplaySubscription(JetStreamContext.PushSubscription):
    """What ``ReplayJetStream.subscribe`` returns: a core subscription, no consumer behind it."""

    async def unsubscribe(self, limit: int = 0) -> None:
        await self._sub.unsubscribe(limit)

    async def consumer_info(self) -> NoReturn:
        raise ReplayRefused("a replay subscription has no JetStream consumer")


class ReplayJetStream(JetStreamContext):
    """The JetStream context a service gets in replay mode (see the module docstring)."""

    def __init__(self, nc: Client, prefix: str, buckets: dict[str, KeyValue]) -> None:
        super().__init__(nc)
        self.prefix = prefix
        self.buckets = buckets

    def subject(self, subject: str) -> str:
        return f"{self.prefix}.{subject}"

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> api.PubAck:
        await self._nc.publish(self.subject(subject), payload, headers=headers)
        return api.PubAck(stream=f"replay:{self.prefix}", seq=0)

    async def subscribe(
        self,
        subject: str,
        queue: str | None = None,
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        durable: str | None = None,
        stream: str | None = None,
        config: api.ConsumerConfig | None = None,
        manual_ack: bool = False,
        ordered_consumer: bool = False,
        idle_heartbeat: float | None = None,
        flow_control: bool = False,
        pending_msgs_limit: int = DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        deliver_policy: api.DeliverPolicy | None = None,
        headers_only: bool | None = None,
        inactive_threshold: float | None = None,
    ) -> JetStreamContext.PushSubscription:
        if cb is None:
            raise ReplayRefused("replay mode subscribes with a callback only")
        handler = cb

        async def on_msg(msg: Msg) -> None:
            await handler(ReplayedMsg.of(msg))

        sub: Subscription = await self._nc.subscribe(
            self.subject(subject),
            queue=queue or "",
            cb=on_msg,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )
        if durable:
            log.info("replay: %s consumes %s (core NATS, no durable)", durable, sub.subject)
        return ReplaySubscription(self, sub, stream or "", durable or "")

    async def pull_subscribe(
        self,
        subject: str,
        durable: str | None = None,
        stream: str | None = None,
        config: api.ConsumerConfig | None = None,
        pending_msgs_limit: int = DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
        inbox_prefix: bytes | None = None,
    ) -> JetStreamContext.PullSubscription:
        # An ephemeral consumer without acks only reads the stored events; anything else would
        # take messages from a live work queue or move a live consumer.
        reads_only = durable is None and (
            config is not None
            and config.ack_policy == api.AckPolicy.NONE
            and not config.durable_name
        )
        if not reads_only:
            raise ReplayRefused(
                f"pull consumer {durable or ''} on {subject}: replay mode never consumes "
                "live work queues (builds do not run in replay mode)"
            )
        return await super().pull_subscribe(
            subject,
            stream=stream,
            config=config,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
            inbox_prefix=inbox_prefix,
        )

    async def key_value(self, bucket: str) -> KeyValue:
        try:
            return self.buckets[bucket]
        except KeyError:
            raise ReplayRefused(f"bucket {bucket}: no replay copy of it") from None

    async def _refused(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ReplayRefused("JetStream management is not available in replay mode")

    add_stream = update_stream = delete_stream = purge_stream = _refused
    add_consumer = delete_consumer = delete_msg = _refused
    create_key_value = delete_key_value = _refused


class ReplayClient:
    """The NATS client a service gets in replay mode: core publishes and subscriptions on
    ``nixboot.…`` move under the prefix; everything else is the real client's."""

    def __init__(self, nc: Client, js: ReplayJetStream) -> None:
        self._nc = nc
        self._js = js

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    def _subject(self, subject: str) -> str:
        live = subject == subjects.PREFIX or subject.startswith(subjects.PREFIX + ".")
        return self._js.subject(subject) if live else subject

    def jetstream(self, **opts: Any) -> JetStreamContext:
        return self._js

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        await self._nc.publish(self._subject(subject), payload, reply, headers)

    async def subscribe(self, subject: str, *args: Any, **kwargs: Any) -> Subscription:
        return await self._nc.subscribe(self._subject(subject), *args, **kwargs)

    async def request(self, subject: str, *args: Any, **kwargs: Any) -> Msg:
        return await self._nc.request(self._subject(subject), *args, **kwargs)


@dataclasses.dataclass
class ReplayBus:
    nc: Client  # a ReplayClient, typed as what services expect
    js: ReplayJetStream
    kv: dict[str, KeyValue]
    copies: dict[str, str]  # live bucket -> its copy's name
    real_js: JetStreamContext

    async def close(self) -> None:
        """Delete the KV copies (the live buckets were never written)."""
        for name in self.copies.values():
            with contextlib.suppress(Exception):
                await self.real_js.delete_key_value(name)


async def open_bus(nc: Client, prefix: str, service: str) -> ReplayBus:
    """The replay views of ``nc`` for ``service``; makes the KV copies (seeded, see above)."""
    subjects.check_replay_prefix(prefix)
    real_js = nc.jetstream()
    kv: dict[str, KeyValue] = {}
    copies: dict[str, str] = {}
    for bucket in subjects.ALL_BUCKETS:
        name = bucket_copy(prefix, service, bucket)
        with contextlib.suppress(NotFoundError):  # left by an earlier run that died: start anew
            await real_js.delete_key_value(name)
        copy = await real_js.create_key_value(
            api.KeyValueConfig(bucket=name, history=5, storage=api.StorageType.MEMORY)
        )
        copies[bucket] = name
        kv[bucket] = copy
        if bucket not in DERIVED_BUCKETS:
            await _seed(real_js, bucket, copy)
    js = ReplayJetStream(nc, prefix, kv)
    return ReplayBus(cast(Client, ReplayClient(nc, js)), js, kv, copies, real_js)


async def _seed(js: JetStreamContext, bucket: str, copy: KeyValue) -> int:
    """Copy the live bucket's current values (reads only)."""
    try:
        live = await js.key_value(bucket)
    except NotFoundError:
        return 0
    try:
        keys = await live.keys()
    except NoKeysError:
        return 0
    n = 0
    for key in keys:
        try:
            entry = await live.get(key)
        except KeyNotFoundError:
            continue
        if entry.value is not None:
            await copy.put(key, entry.value)
            n += 1
    return n
