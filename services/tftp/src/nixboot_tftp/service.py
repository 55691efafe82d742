"""The TFTP service: boot programs and just-in-time pxelinux menus over TFTP.

The tftpy-based server loop runs in its own thread; NATS (KV watches, events, the one-shot pin
update) lives on the asyncio loop. The two meet only through the local view (read by the loop
thread) and ``call_soon_threadsafe`` (transfer ends handed to the asyncio loop), so a transfer never
waits on NATS and NATS never waits on a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path

from fastapi import FastAPI
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from nixboot_shared import bus, events, pins, security, subjects
from nixboot_shared import metrics as shared_metrics
from nixboot_shared.config import Config
from nixboot_shared.records import Lease
from nixboot_shared.service import ServiceContext, run
from nixboot_shared.subjects import normalize_mac
from nixboot_tftp import metrics
from nixboot_tftp.bootprograms import prepare_root
from nixboot_tftp.content import MenuInfo, MenuSettings, TftpContent
from nixboot_tftp.server import SafeTftpServer, Transfer
from nixboot_tftp.view import LocalView

log = logging.getLogger(__name__)

WATCHED = (subjects.KV_MACHINES, subjects.KV_GENERATIONS, subjects.KV_LEASES)
EVENT_QUEUE = 10_000
INITIAL_LOAD_SECONDS = 10.0


def read_public_key(state_dir: Path) -> str:
    """The cache's public key for the kernel command line; the cache service writes it."""
    try:
        return (state_dir / "cache-key.pub").read_text().strip()
    except FileNotFoundError:
        return ""


async def watch_bucket(kv: KeyValue, bucket: str, view: LocalView, loaded: asyncio.Event) -> None:
    """Keep the view current; restart the watch if it ends (NATS restarts)."""
    while True:
        try:
            watcher = await kv.watchall()
            async for entry in watcher:
                if entry is None:
                    loaded.set()
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                view.apply(bucket, entry.key, None if deleted else entry.value)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("watch of %s failed (%s); restarting", bucket, e)
        await asyncio.sleep(1.0)


async def clear_one_shot(kv: KeyValue, mac: str, number: int) -> None:
    """The menu that made the one-shot pin default was transferred: consume it (shared rule)."""
    if await pins.consume_next_boot(kv, mac, number):
        metrics.ONE_SHOT_CLEARED.inc()


class TransferReporter:
    """The server's end hook: metrics on the loop thread (cheap), events handed to asyncio."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, view: LocalView, kv_generations: KeyValue | None
    ) -> None:
        self.loop = loop
        self.view = view
        self.kv_generations = kv_generations
        self.queue: asyncio.Queue[events.Event] = asyncio.Queue(EVENT_QUEUE)

    def __call__(self, t: Transfer) -> None:
        metrics.TRANSFERS.labels(t.kind, t.result).inc()
        metrics.TRANSFER_SECONDS.labels(t.kind, t.result).observe(t.seconds)
        if t.bytes:
            metrics.BYTES.labels(t.kind).inc(t.bytes)
        mac = t.mac or self.view.mac_for_ip(t.client)
        info = t.info if isinstance(t.info, MenuInfo) else None
        out: list[events.Event] = [
            events.BootFileRequested(
                mac=mac,
                boot_id=info.boot_id if info else None,
                file=t.file[:256],
                file_kind=t.kind,
                client=t.client,
                bytes=t.bytes,
                seconds=round(t.seconds, 6),
                result=t.result,
            )
        ]
        if info is not None and t.result == "ok":
            out.append(
                events.MenuServed(
                    mac=mac,
                    boot_id=info.boot_id,
                    format="pxelinux",
                    client=t.client,
                    default_generation=info.default_generation,
                    generations=info.generations,
                    fallback=info.fallback,
                )
            )
            if info.once is not None and mac is not None:
                # Used now: the next render must not offer it again, even before KV catches up.
                self.view.consumed_once[mac] = info.once
                self.loop.call_soon_threadsafe(self._clear_once, mac, info.once)
        for event in out:
            self.loop.call_soon_threadsafe(self._enqueue, event)

    def _enqueue(self, event: events.Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.inc()

    def _clear_once(self, mac: str, number: int) -> None:
        if self.kv_generations is not None:
            task = asyncio.ensure_future(clear_one_shot(self.kv_generations, mac, number))
            task.add_done_callback(_log_failure)

    async def publish_forever(self, ctx: ServiceContext) -> None:
        while True:
            event = await self.queue.get()
            try:
                await bus.publish(ctx.js, event)
            except Exception as e:
                log.warning("dropping %s event: %s", event.kind, e)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("clearing a one-shot pin failed: %s", task.exception())


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    cfg = ctx.cfg
    state = cfg.state_path
    state.mkdir(parents=True, exist_ok=True)
    secret = security.read_or_create_secret(state / "boot-secret")
    view = LocalView(cfg.fallback_attr)

    # The view first: a menu rendered before the initial load would wrongly say "unknown".
    loaded = {bucket: asyncio.Event() for bucket in WATCHED}
    for bucket in WATCHED:
        ctx.spawn(watch_bucket(ctx.kv[bucket], bucket, view, loaded[bucket]), f"watch-{bucket}")
    try:
        await asyncio.wait_for(
            asyncio.gather(*(e.wait() for e in loaded.values())), INITIAL_LOAD_SECONDS
        )
    except TimeoutError:
        log.warning("initial KV load incomplete after %.0fs; serving anyway", INITIAL_LOAD_SECONDS)

    content = TftpContent(
        view,
        MenuSettings(
            cache_url=cfg.cache.public_url,
            secret=secret,
            public_key=read_public_key(state),
            timeout_seconds=cfg.menu_timeout_seconds,
        ),
    )

    async def on_lease(msg: Msg) -> None:
        # Leases also arrive as events: the view learns them even before the KV record exists.
        try:
            ev = events.decode(msg.data)
        except events.BadEvent as e:
            log.error("rejected message on %s: %s", msg.subject, e)
            shared_metrics.EVENTS_REJECTED.labels("tftp-leases").inc()
            return
        if isinstance(ev, events.LeaseSeen) and ev.mac and ev.lease_kind in ("new", "renew"):
            view.set_lease(Lease(mac=ev.mac, ip=ev.ip, hostname=ev.hostname, arch=ev.arch))
            content.prepare(normalize_mac(ev.mac))  # its menu request follows within ~100 ms

    await ctx.nc.subscribe(f"{subjects.PREFIX}.evt.lease.>", cb=on_lease)

    root = prepare_root(state, cfg.tftp.boot_programs_dir)
    reporter = TransferReporter(
        asyncio.get_running_loop(), view, ctx.kv.get(subjects.KV_GENERATIONS)
    )
    ctx.spawn(reporter.publish_forever(ctx), "publish")
    server = SafeTftpServer(
        str(root), handler=content, on_end=reporter, max_transfers=cfg.tftp.max_transfers
    )
    host, port = server.bind(cfg.tftp.host, cfg.tftp.port)  # PortPermissionError says what to do
    thread = threading.Thread(target=server.listen, name="tftp-loop", daemon=True)
    thread.start()
    log.info("tftp: serving %s on udp %s:%d", root, host, port)

    async def refresh_key() -> None:
        # The cache service may create its key after we start.
        while not content.settings.public_key:
            await asyncio.sleep(2.0)
            content.settings.public_key = read_public_key(state)

    ctx.spawn(refresh_key(), "public-key")

    @app.get("/tftp/status")
    async def status() -> dict[str, object]:
        metrics.ACTIVE.set(server.stats.active)
        return {
            "root": str(root),
            "listen": f"{host}:{port}",
            "active": server.stats.active,
            "busy": server.stats.busy,
            "evicted": server.stats.evicted,
            "bad_packets": server.stats.bad_packets,
            "machines": len(view.machines),
            "leases": len(view.leases),
        }

    async def stop() -> None:
        server.stop(now=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(thread.join, 5)

    ctx.cleanups.append(stop)


def main(cfg: Config) -> int:
    return run("tftp", cfg, cfg.tftp.http, setup)
