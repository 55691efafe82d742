"""dhcp-hook service: turns DHCP lease changes into LeaseSeen events and the MAC<->IP lease map.

Inputs: files the sh hook (deploy/dhcp/nixboot-dhcp-hook.sh) writes into the spool directory,
seen by inotify as they are closed; datagrams from the Python hook (hook.py) on a unix socket; the
spool directory drained at start and every few seconds (both hooks' files, and what the service
itself put back while NATS was down); and ``POST /leases`` (same fields as LeasePayload, API
token) for DHCP servers on other hosts. Every input goes through the same parser and ``Recorder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path

import msgspec
from fastapi import FastAPI, Request, Response
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import Counter, Histogram

from nixboot_dhcp_hook import hook, inotify, parse
from nixboot_dhcp_hook.parse import BadLease, LeaseChange
from nixboot_shared import bus, events, metrics, records, security, subjects
from nixboot_shared.config import Config
from nixboot_shared.service import ServiceContext, run

log = logging.getLogger(__name__)

DRAIN_INTERVAL_SECONDS = 2.0
# Publish attempts before a change goes (back) to the spool: short, the spool retries for ever.
PUBLISH_ATTEMPTS = 3
RETRANSMIT_SECONDS = 3.0
MAX_CONCURRENT = 64  # lease payloads in flight (distinct MACs proceed in parallel)
# A sh hook file without its end marker is taken for one being written; this old, its writer died.
INCOMPLETE_GRACE_SECONDS = 30.0
MAX_SPOOL_FILE_BYTES = 1 << 20  # far above any DHCP server's call: larger is not from a hook
REJECTED_DIR = "rejected"  # inside the spool: malformed files, kept for a human to read
# The newest rejected files kept: enough to read what went wrong, never a full disk.
REJECTED_KEEP = 100
MAX_REMEMBERED = 100_000  # MAC keys whose last write this instance remembers


def is_spool_name(name: str) -> bool:
    """A hook call's spool file; ``.<name>.tmp`` files are still being written (and renamed)."""
    return name.endswith(hook.SPOOL_SUFFIX) and not name.startswith(".")


LEASE_CHANGES = Counter("nixboot_dhcp_lease_changes", "Lease changes recorded", ["source", "kind"])
STALE = Counter(
    "nixboot_dhcp_stale_lease_changes",
    "Lease changes older than the lease map's: published, not applied to the map",
    ["source"],
)
RETRANSMITS = Counter(
    "nixboot_dhcp_retransmits",
    "Repeated grants of the same lease within seconds: applied to the map, not published",
    ["source"],
)
UNCHANGED = Counter(
    "nixboot_dhcp_unchanged_leases",
    "Renewals telling the address and expiry the lease map holds (dnsmasq re-telling its lease"
    " file at start-up): not published, not applied",
    ["source"],
)
SPOOLED = Counter(
    "nixboot_dhcp_spooled", "Hook payloads the service put back into the spool (NATS down)"
)
DRAINED = Counter("nixboot_dhcp_spool_drained", "Spool files delivered or rejected")
REJECTED = Counter(
    "nixboot_dhcp_spool_rejected", "Spool files that hold no valid hook call: moved to rejected/"
)
LEASE_TO_EVENT = Histogram(
    "nixboot_dhcp_lease_to_event_seconds",
    "From the hook call (or HTTP request) to the event stored in JetStream",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30, 300),
)


def _trim_oldest(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` files moved into ``directory`` last (rejects are rare: listing
    it each time is cheap)."""
    aged: list[tuple[float, Path]] = []
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            aged.append((f.stat().st_ctime, f))  # ctime: when it was moved aside
    aged.sort()
    for _, f in aged[: max(0, len(aged) - keep)]:
        with contextlib.suppress(OSError):
            f.unlink()


class LeasePayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /leases``: one lease change, from a DHCP server on another host."""

    mac: str
    ip: str
    hostname: str | None = None
    kind: str = "new"
    expires: float | None = None
    arch: str = "unknown"
    user_class: str | None = None
    vendor_class: str | None = None
    server_ts: float | None = None


def bad_input(source: str, message: str) -> None:
    metrics.BAD_INPUT.labels(f"dhcp-hook-{source}").inc()
    log.warning("rejected lease input from %s: %s", source, message)


def guess_source(call: parse.HookCall | None) -> str:
    """A bounded metric label for a payload that did not parse."""
    if call is None or not call.argv:
        return "unknown"
    first = call.argv[0]
    if first == "isc":
        return "isc"
    if first.startswith(("lease4_", "leases4_")):
        return "kea"
    return "dnsmasq" if first in parse.DNSMASQ_KINDS else "unknown"


def to_event(c: LeaseChange) -> events.LeaseSeen:
    return events.LeaseSeen(
        id=parse.change_id(c),
        ts=c.ts,
        mac=c.mac,
        ip=c.ip,
        lease_kind=c.kind,
        hostname=c.hostname,
        expires=c.expires,
        arch=c.arch,
        user_class=c.user_class,
        vendor_class=c.vendor_class,
        source=c.source,
        server_ts=c.server_ts,
    )


def is_retransmit(current: records.Lease | None, c: LeaseChange) -> bool:
    """A client that does not hear the ACK repeats its REQUEST (seen with Kea: the same xid
    committed again a second later, with a new CLTT). The same grant of the same address within
    RETRANSMIT_SECONDS is that, not a new lease change: the map takes it, the stream does not.
    Retransmits within one second already share an event id (parse.change_id).

    A lease dnsmasq knows from its lease file (DNSMASQ_DATA_MISSING: its start-up replay, and the
    client's next requests) neither is nor opens such a window: dnsmasq runs its script for a
    renewal only when the expiry changed, so each such call is a real change; and a replay that
    opened the window would make the first real request after a restart look like a retransmit."""
    return (
        current is not None
        and not c.from_lease_file
        and not current.from_lease_file
        and c.kind in ("new", "renew")
        and (current.kind, current.ip) == (c.kind, c.ip)
        and current.server_ts is not None
        and 0 < c.server_ts - current.server_ts <= RETRANSMIT_SECONDS
    )


def is_unchanged(current: records.Lease | None, c: LeaseChange) -> bool:
    """A renewal that tells the active lease the map holds, same address and same expiry: no
    change at all. dnsmasq's start-up replay of its lease file is that (a real renewal always
    moves the expiry; an infinite lease, which never does, is only re-told by a replay). The map's
    record, which has the client's options, stays."""
    return (
        c.kind == "renew"
        and current is not None
        and current.kind in ("new", "renew")
        and (current.ip, current.expires) == (c.ip, c.expires)
        and (c.expires is not None or c.from_lease_file)
    )


def _lease_key(lease: records.Lease) -> tuple[float, float]:
    return (lease.server_ts or 0.0, lease.seen)


class Recorder:
    """Publishes each change once and keeps the lease map ordered by the DHCP server's clock."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv
        # One change at a time per MAC in this process (asyncio locks wake waiters in FIFO order,
        # so arrival order is kept); compare-and-set guards against other instances.
        self.locks: dict[str, asyncio.Lock] = {}
        # What this instance last wrote per MAC key, with its revision: the next change of that
        # MAC skips the KV read before publishing (a round trip on the lease → event path, slow
        # while a storm keeps NATS busy). Another instance's write in between makes the
        # compare-and-set fail, and the retry reads KV.
        self.written: dict[str, tuple[records.Lease, int]] = {}

    async def _current(self, key: str) -> tuple[records.Lease | None, int | None]:
        mine = self.written.get(key)
        if mine is not None:
            return mine
        return await self._get(key)

    def _remember(self, key: str, lease: records.Lease, revision: int) -> None:
        if len(self.written) >= MAX_REMEMBERED and key not in self.written:
            self.written.clear()  # far beyond any fleet: start over rather than grow
        self.written[key] = (lease, revision)

    async def _get(self, key: str) -> tuple[records.Lease | None, int | None]:
        self.written.pop(key, None)
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, None
        if not entry.value:
            return None, entry.revision
        try:
            return msgspec.json.decode(entry.value, type=records.Lease), entry.revision
        except msgspec.DecodeError:
            log.error("lease map key %s holds an undecodable value: replacing it", key)
            return None, entry.revision

    async def _mac_of_ip(self, ip: str) -> tuple[str | None, int | None]:
        try:
            entry = await self.kv.get(subjects.ip_key(ip))
        except KeyNotFoundError:
            return None, None
        return (entry.value.decode() if entry.value else None), entry.revision

    async def record(self, c: LeaseChange) -> str:
        """Publish and apply one change; returns the event id. Raises when NATS is unavailable."""
        lock = self.locks.setdefault(c.mac, asyncio.Lock())
        try:
            async with lock:
                return await self._record(c)
        finally:
            if not lock.locked() and self.locks.get(c.mac) is lock:
                del self.locks[c.mac]  # nobody waits: keep the dict as small as the work

    async def _record(self, c: LeaseChange) -> str:
        event = to_event(c)
        token = subjects.mac_token(c.mac)
        current, revision = await self._current(token)
        if current is not None and (
            (current.server_ts, current.seen, current.ip, current.kind)
            == (c.server_ts, c.ts, c.ip, c.kind)
        ):
            # Already applied (a spool copy re-delivered after the dedupe window): nothing to do.
            return event.id
        if is_unchanged(current, c):
            UNCHANGED.labels(c.source).inc()
            log.debug("%s re-told the lease of %s unchanged: skipped", c.source, c.mac)
            return event.id
        if is_retransmit(current, c):
            RETRANSMITS.labels(c.source).inc()
            log.debug("%s %s for %s: retransmit, not published", c.source, c.kind, c.mac)
        else:
            await bus.publish(self.js, event, attempts=PUBLISH_ATTEMPTS)
            LEASE_TO_EVENT.observe(max(0.0, time.time() - c.ts))
            LEASE_CHANGES.labels(c.source, c.kind).inc()
        for _ in range(10):  # compare-and-set retries against a concurrent writer
            if current is not None and parse.order_key(c) < _lease_key(current):
                STALE.labels(c.source).inc()
                log.info(
                    "%s %s for %s is older than the lease map's: not applied",
                    c.source,
                    c.kind,
                    c.mac,
                )
                return event.id
            lease = records.Lease(
                mac=c.mac,
                ip=c.ip,
                hostname=c.hostname,
                expires=c.expires,
                arch=c.arch,
                user_class=c.user_class,
                server_ts=c.server_ts,
                seen=c.ts,
                kind=c.kind,
                from_lease_file=c.from_lease_file,
            )
            value = msgspec.json.encode(lease)
            try:
                if revision is None:
                    new_revision = await self.kv.create(token, value)
                else:
                    new_revision = await self.kv.update(token, value, last=revision)
            except KeyWrongLastSequenceError:
                current, revision = await self._get(token)
                continue
            self._remember(token, lease, new_revision)
            await self._update_ip_index(c, token, current)
            return event.id
        raise RuntimeError(f"lease map key {token} keeps changing under us")

    async def _update_ip_index(
        self, c: LeaseChange, token: str, previous: records.Lease | None
    ) -> None:
        if previous is not None and previous.ip != c.ip:
            await self._drop_ip(previous.ip, token)
        if c.kind in ("release", "expire"):
            await self._drop_ip(c.ip, token)
            return
        owner, _ = await self._mac_of_ip(c.ip)
        if owner is not None and owner != token:
            # The address moved between machines: only the newer lease may claim it.
            other, _ = await self._get(owner)
            if (
                other is not None
                and other.ip == c.ip
                and other.kind in ("new", "renew")
                and _lease_key(other) > parse.order_key(c)
            ):
                return
        await self.kv.put(subjects.ip_key(c.ip), token.encode())

    async def _drop_ip(self, ip: str, token: str) -> None:
        owner, revision = await self._mac_of_ip(ip)
        if owner == token and revision is not None:
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self.kv.delete(subjects.ip_key(ip), last=revision)


class HookInbox(asyncio.DatagramProtocol):
    """Datagrams from the hook command, queued for one worker (the hook never waits for us)."""

    def __init__(self, queue: asyncio.Queue[bytes | Path]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            # Lost here, but only under a flood far above any DHCP server's rate; counted.
            bad_input("socket", "inbox full: dropped a datagram")


class DhcpHookService:
    def __init__(self, cfg: Config, recorder: Recorder) -> None:
        self.recorder = recorder
        state = cfg.state_path
        self.socket_path = Path(cfg.dhcp_hook.socket or state / "dhcp-hook.sock")
        self.spool_dir = Path(cfg.dhcp_hook.spool_dir or state / "spool")
        # Datagram payloads, and spool files inotify saw closed.
        self.queue: asyncio.Queue[bytes | Path] = asyncio.Queue(maxsize=10000)
        self.drain_now = asyncio.Event()
        # Spool files being handled: the drain leaves them alone (no double publish).
        self.inflight: set[Path] = set()

    async def record_call(self, call: parse.HookCall) -> bool:
        """Parse and record one hook call. False: NATS is unavailable, keep the call. Raises
        BadLease when the call is not a lease change we can read."""
        changes = parse.parse_hook(call.argv, call.env, call.ts)
        for change in changes:
            try:
                await self.recorder.record(change)
            except Exception as e:
                log.warning(
                    "cannot record %s %s of %s now (%s): will retry from the spool",
                    change.source,
                    change.kind,
                    change.mac,
                    e,
                )
                return False
        return True

    async def handle_payload(self, payload: bytes) -> bool:
        """Parse and record one datagram payload. False: NATS is unavailable, keep the payload."""
        call: parse.HookCall | None = None
        try:
            call = parse.decode_hook_payload(payload)
            return await self.record_call(call)
        except BadLease as e:
            bad_input(guess_source(call), str(e))
            return True

    async def worker(self) -> None:
        """Take datagrams and spool files in arrival order; handle different MACs concurrently
        (the Recorder keeps one MAC's changes in order), so one slow KV round trip does not delay
        every lease."""
        slots = asyncio.Semaphore(MAX_CONCURRENT)
        pending: set[asyncio.Task[object]] = set()
        while True:
            item = await self.queue.get()
            await slots.acquire()
            job = (
                self._handle_or_spool(item)
                if isinstance(item, bytes)
                else self.handle_file(item, from_watch=True)
            )
            task: asyncio.Task[object] = asyncio.ensure_future(job)
            pending.add(task)

            def done(t: asyncio.Task[object]) -> None:
                pending.discard(t)
                slots.release()

            task.add_done_callback(done)

    def _spooled_copy(self, payload: bytes) -> tuple[bytes, Path | None]:
        """The payload without the hook's trailer, and the spool file that holds it too."""
        head, sep, last = payload.rpartition(b"\0")
        if not sep or not last.startswith(hook.SPOOLED_KEY):
            return payload, None
        name = last[len(hook.SPOOLED_KEY) :].decode(errors="replace")
        if "/" in name or not is_spool_name(name):
            bad_input("socket", f"bad spool name {name[:60]!r} in a hook datagram")
            return head, None
        return head, self.spool_dir / name

    async def _handle_or_spool(self, payload: bytes) -> None:
        payload, spooled = self._spooled_copy(payload)
        if spooled is not None:
            self.inflight.add(spooled)
        try:
            if await self.handle_payload(payload):
                if spooled is not None:
                    with contextlib.suppress(FileNotFoundError):
                        await asyncio.to_thread(spooled.unlink)  # recorded: the copy is spent
                return
        except Exception:
            log.exception("lease payload failed: spooling it")
        finally:
            if spooled is not None:
                self.inflight.discard(spooled)
        if spooled is not None:
            SPOOLED.inc()  # the hook's copy stays in the spool; the drain delivers it
            return
        # Same file format and naming as the hook's spool: drained in order later.
        call_ts = time.time()
        with contextlib.suppress(BadLease):
            call_ts = parse.decode_hook_payload(payload).ts
        await asyncio.to_thread(hook.spool, payload, str(self.spool_dir), call_ts)
        SPOOLED.inc()

    def _read_spool_file(self, path: Path) -> tuple[bytes, float]:
        """Contents and mtime (the sh hook's call time). Small files in the page cache: read in
        the event loop, a thread hop would cost more than the read."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_size > MAX_SPOOL_FILE_BYTES:
                raise BadLease(f"{st.st_size} bytes, more than any hook call")
            return os.read(fd, MAX_SPOOL_FILE_BYTES + 1), st.st_mtime
        finally:
            os.close(fd)

    def _reject(self, path: Path, source: str, reason: str) -> None:
        """Count, log, and move the file to rejected/ (kept for a human; never retried)."""
        REJECTED.inc()
        aside = path.parent / REJECTED_DIR / path.name
        try:
            aside.parent.mkdir(mode=0o770, exist_ok=True)
            os.replace(path, aside)
            where = f"moved to {aside}"
            _trim_oldest(aside.parent, REJECTED_KEEP)
        except FileNotFoundError:
            where = "gone"
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            where = f"deleted, cannot move it aside: {e.strerror}"
        bad_input(source, f"spool file {path.name}: {reason} ({where})")

    async def handle_file(self, path: Path, *, from_watch: bool = False) -> bool:
        """Record one spool file and delete it; a malformed one goes to rejected/. False: NATS is
        unavailable, the file stays for the drain."""
        if path in self.inflight:
            return True
        self.inflight.add(path)
        call: parse.HookCall | None = None
        try:
            try:
                payload, mtime = self._read_spool_file(path)
            except FileNotFoundError:
                return True  # another instance (or the datagram's handler) took it
            except OSError as e:
                self._reject(path, "spool", f"unreadable: {e.strerror}")
                return True
            except BadLease as e:
                self._reject(path, "spool", str(e))
                return True
            try:
                if parse.is_sh_payload(payload):
                    call = parse.decode_sh_payload(payload, mtime, hook.ENV_PREFIXES)
                else:
                    call = parse.decode_hook_payload(payload)
                ok = await self.record_call(call)
            except parse.IncompleteHookFile as e:
                if time.time() - mtime > INCOMPLETE_GRACE_SECONDS:
                    self._reject(path, "spool", f"{e}, and {INCOMPLETE_GRACE_SECONDS:.0f} s old")
                return True  # else still being written: its close brings it back
            except BadLease as e:
                self._reject(path, guess_source(call) if call else "spool", str(e))
                return True
            if not ok:
                if from_watch:
                    SPOOLED.inc()  # stays in the spool; the drain delivers it
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        finally:
            self.inflight.discard(path)

    def _spool_files(self) -> list[Path]:
        """Oldest first: by mtime (the sh hook's names do not sort by time), then by name."""
        found = []
        try:
            for entry in os.scandir(self.spool_dir):
                if is_spool_name(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((entry.stat().st_mtime_ns, entry.name))
        except OSError:
            return []
        return [self.spool_dir / name for _, name in sorted(found)]

    async def drain(self) -> int:
        """Deliver spooled calls oldest first; stop at the first that NATS cannot take."""
        done = 0
        for path in await asyncio.to_thread(self._spool_files):
            if path in self.inflight:
                continue
            if not await self.handle_file(path):
                break
            DRAINED.inc()
            done += 1
        if done:
            log.info("delivered %d spooled lease payloads", done)
        return done

    async def drain_loop(self) -> None:
        while True:
            try:
                await self.drain()
            except Exception:
                log.exception("spool drain failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain_now.wait(), DRAIN_INTERVAL_SECONDS)
            self.drain_now.clear()

    def watch_spool(self) -> inotify.DirWatch | None:
        """inotify on the spool: each sh hook file is handled as soon as it is closed. Without
        inotify (watch limit reached, not Linux) the drain still delivers it, within 2 s."""
        try:
            watch = inotify.DirWatch(str(self.spool_dir), inotify.IN_CLOSE_WRITE)
        except (OSError, AttributeError) as e:
            log.warning("no inotify on %s (%s): spool files wait for the drain", self.spool_dir, e)
            return None

        def readable() -> None:
            try:
                names, overflow = watch.read_names()
            except OSError as e:
                log.warning("inotify read failed (%s): the drain takes over", e)
                names, overflow = [], True
            if overflow:
                self.drain_now.set()
            for name in names:
                # The Python hook and the service write `.<name>.tmp` and rename: not ours here.
                if is_spool_name(name):
                    try:
                        self.queue.put_nowait(self.spool_dir / name)
                    except asyncio.QueueFull:
                        self.drain_now.set()

        asyncio.get_running_loop().add_reader(watch.fd, readable)
        return watch

    def open_socket(self) -> socket.socket:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o770)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.socket_path))
        # The DHCP server's user writes here: owner and group only (add it to our group).
        os.chmod(self.socket_path, 0o660)
        # Room for bursts: the hook must never find the queue full while we are alive.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setblocking(False)
        return sock


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    token = security.read_or_create_secret(ctx.cfg.api_token_path())
    recorder = Recorder(ctx.js, ctx.kv[subjects.KV_LEASES])
    svc = DhcpHookService(ctx.cfg, recorder)
    sock = svc.open_socket()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: HookInbox(svc.queue), sock=sock)
    watch = svc.watch_spool()
    ctx.spawn(svc.worker(), "worker")
    ctx.spawn(svc.drain_loop(), "drain")
    log.info("dhcp-hook: socket %s, spool %s", svc.socket_path, svc.spool_dir)

    async def close() -> None:
        transport.close()
        if watch is not None:
            loop.remove_reader(watch.fd)
            watch.close()
        with contextlib.suppress(FileNotFoundError):
            svc.socket_path.unlink()

    ctx.cleanups.append(close)

    @app.post("/leases")
    async def post_lease(request: Request) -> Response:
        if not security.check_api_token(token, request.headers.get("authorization")):
            bad_input("http", "missing or wrong API token")
            return Response('{"error":"missing or wrong API token"}', 401)
        now = time.time()
        try:
            p = msgspec.json.decode(await request.body(), type=LeasePayload)
            change = parse.from_fields(
                mac=p.mac,
                ip=p.ip,
                kind=p.kind,
                now=now,
                hostname=p.hostname,
                expires=p.expires,
                arch=p.arch,
                user_class=p.user_class,
                vendor_class=p.vendor_class,
                server_ts=p.server_ts,
            )
        except (msgspec.ValidationError, msgspec.DecodeError, BadLease) as e:
            bad_input("http", str(e))
            return Response(msgspec.json.encode({"error": str(e)}), 400)
        try:
            event_id = await recorder.record(change)
        except Exception as e:
            log.warning("cannot record HTTP lease for %s: %s", change.mac, e)
            return Response('{"error":"event bus unavailable, retry"}', 503)
        return Response(msgspec.json.encode({"id": event_id}), 202)


def main(cfg: Config) -> int:
    return run("dhcp-hook", cfg, cfg.dhcp_hook.http, setup)
