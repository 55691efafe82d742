"""NATS plumbing every service shares: connect, bootstrap streams and buckets, publish, consume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from nixboot_shared import events, metrics, subjects
from nixboot_shared.config import NatsConfig, tls_context

log = logging.getLogger(__name__)

# Dedupe window for Nats-Msg-Id: long enough to cover a service's retries after a NATS restart.
DUPLICATE_WINDOW_SECONDS = 600.0


class NatsRefused(RuntimeError):
    """NATS answered but will not let us in (bad credentials, a TLS certificate that does not
    verify): retrying cannot help, so connecting stops with this instead of looping."""


def redact(url: str) -> str:
    """The URL without any user or password part, for log lines."""
    return ",".join(re.sub(r"^([a-z]+://)?[^/@]*@", r"\1", u.strip()) for u in url.split(","))


def _is_refusal(e: BaseException) -> bool:
    if isinstance(e, (nats.errors.AuthorizationError, ssl.SSLError)):
        return True
    text = str(e).lower()
    return any(
        word in text
        for word in ("authorization violation", "authentication", "user authentication expired")
    )


def client_options(settings: NatsConfig) -> dict[str, Any]:
    """nats.connect keyword arguments for authentication and TLS. The password file is read at
    every (re)connect, so a rotated password is picked up without a restart."""
    opts: dict[str, Any] = {}
    if settings.credentials_file:
        opts["user_credentials"] = settings.credentials_file
    if settings.nkey_seed_file:
        opts["nkeys_seed"] = settings.nkey_seed_file
    if settings.user and settings.password_file:
        path = Path(settings.password_file)
        opts["user"] = settings.user
        opts["password"] = lambda: path.read_text().strip()
    if settings.tls_enabled():
        opts["tls"] = tls_context(settings)
    return opts


async def connect(
    url: str, name: str, credentials_file: str = "", *, settings: NatsConfig | None = None
) -> Client:
    """Connect with endless reconnects: services outlive NATS restarts and keep their state.
    ``settings`` brings authentication and TLS (``credentials_file`` alone: a .creds file). An
    unreachable NATS is waited for; one that refuses our credentials or certificate raises
    NatsRefused at once."""
    shown = redact(url)
    first = asyncio.get_running_loop().create_future()

    async def on_error(e: Exception) -> None:
        if not first.done() and _is_refusal(e):
            first.set_exception(NatsRefused(f"NATS at {shown} refused the connection: {e}"))
            return
        log.warning("nats: %s", e or type(e).__name__)  # a timeout has no text of its own

    async def on_disconnect() -> None:
        if first.done():
            log.warning("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    if settings is None:
        settings = NatsConfig(credentials_file=credentials_file)
    elif credentials_file and not settings.credentials_file:
        settings = msgspec.structs.replace(settings, credentials_file=credentials_file)
    nc = Client()
    connecting = asyncio.ensure_future(
        nc.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()],
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # typed int, used as seconds
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **client_options(settings),
        )
    )
    try:
        await asyncio.wait([connecting, first], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        raise
    if first.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        first.result()  # raises NatsRefused
    first.cancel()
    await connecting
    return nc


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (e.g. created by an older version): bring it up to date.
        await js.update_stream(config)


async def bootstrap(
    js: JetStreamContext, replicas: int = 1, *, patience: float = 30.0
) -> dict[str, KeyValue]:
    """Create the streams and KV buckets if missing. Idempotent and safe to race: add_stream with
    an identical config succeeds for every caller, so several services may start at once.
    While a cluster elects a new leader (after a node loss) JetStream answers 503 or times out:
    keep trying for ``patience`` seconds instead of failing the service's start."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            return await _bootstrap_once(js, replicas)
        except (ServiceUnavailableError, nats.errors.TimeoutError) as e:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("jetstream not ready (%s), retrying bootstrap", e or type(e).__name__)
            await asyncio.sleep(0.5)


async def _bootstrap_once(js: JetStreamContext, replicas: int) -> dict[str, KeyValue]:
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_SUBJECTS],
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            max_age=30 * 24 * 3600.0,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=subjects.BUILDS_STREAM,
            subjects=[subjects.BUILDS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        ),
    )
    buckets: dict[str, KeyValue] = {}
    for bucket in subjects.ALL_BUCKETS:
        try:
            buckets[bucket] = await js.key_value(bucket)
        except NotFoundError:
            try:
                buckets[bucket] = await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=5, replicas=replicas)
                )
            except BadRequestError:
                buckets[bucket] = await js.key_value(bucket)  # another service won the race
    return buckets


async def publish(js: JetStreamContext, event: events.Event, *, attempts: int = 20) -> None:
    """Publish to JetStream with the event id as ``Nats-Msg-Id``: retrying after a lost ack (NATS
    restarting mid-boot) stores the event once."""
    payload = events.encode(event)
    delay = 0.1
    for attempt in range(attempts):
        try:
            await js.publish(event.subject, payload, headers={"Nats-Msg-Id": event.id})
            metrics.EVENTS_PUBLISHED.labels(event.kind).inc()
            return
        except Exception as e:  # timeouts and no-responders while NATS restarts
            if attempt == attempts - 1:
                metrics.EVENTS_FAILED.labels(event.kind).inc()
                raise
            log.debug("publish %s failed (%s), retrying", event.kind, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


EventHandler = Callable[[events.AnyEvent], Awaitable[None]]


async def subscribe_events(
    js: JetStreamContext,
    handler: EventHandler,
    *,
    durable: str,
    filter_subject: str = subjects.EVENTS_SUBJECTS,
    deliver_new: bool = True,
) -> Any:
    """A durable push consumer over the event stream. Undecodable messages are logged, counted and
    terminated (never redelivered forever); a handler error leads to redelivery."""

    async def on_msg(msg: Msg) -> None:
        try:
            event = events.decode(msg.data)
        except events.BadEvent as e:
            log.error("rejected message on %s: %s", msg.subject, e)
            metrics.EVENTS_REJECTED.labels(durable).inc()
            await msg.term()
            return
        try:
            await handler(event)
        except Exception:
            log.exception("handler %s failed on %s", durable, event.kind)
            await msg.nak(delay=1)
            return
        await msg.ack()

    return await js.subscribe(
        filter_subject,
        durable=durable,
        cb=on_msg,
        manual_ack=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
            ack_wait=30,
            max_deliver=10,
        ),
    )
