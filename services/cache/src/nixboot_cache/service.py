"""The cache service: a Nix binary cache and boot-file server, warmed by lease events.

Routes (all GET and HEAD unless noted):
  /nix-cache-info                  StoreDir, WantMassQuery, Priority
  /<hash32>.narinfo                signed with the deployment key
  /nar/<narhash52>.nar.zst         compressed NAR (streamed while compressed when cold)
  /log/<drv>                       build log of a derivation
  /boot/<toplevel-hash>/kernel|initrd   with Range
  /boot.ipxe, /ipxe/<mac>          iPXE chain script and per-MAC menu (a GET spends the
                                   one-shot pin it makes default: nixboot_shared.pins)
  POST /report/<boot_id>           stage reports from booting machines (per-boot token)
"""

from __future__ import annotations

import asyncio
import bz2
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from nats.js.kv import KeyValue
from starlette.background import BackgroundTask

from nixboot_cache import chain, metrics, narextract, nix32
from nixboot_cache.bootfiles import UpstreamBootFiles
from nixboot_cache.leases import LeaseThread, lease_handler
from nixboot_cache.narcache import (
    InFlight,
    NarCache,
    NarMeta,
    NarMismatch,
    open_inflight,
    stream_direct,
    stream_inflight,
)
from nixboot_cache.narinfo import STORE_DIR, NarInfo
from nixboot_cache.signing import SecretKey, load_or_create
from nixboot_cache.store import DEFAULT_DB, PathInfo, StoreDb
from nixboot_cache.timeline import setup_timeline
from nixboot_cache.upstream import Upstream, UpstreamError, path_info
from nixboot_cache.warm import Publish, Warmer
from nixboot_shared import bus, events, menu, pins, security, subjects
from nixboot_shared import metrics as shared_metrics
from nixboot_shared.config import Config
from nixboot_shared.records import Generation, Lease, MachineGenerations
from nixboot_shared.service import ServiceContext, run
from nixboot_shared.view import KvMirror

log = logging.getLogger(__name__)

CACHE_INFO = f"StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: 30\n"
_DRV_RE = re.compile(r"^[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+\.drv$")
LOG_DIR = Path("/nix/var/log/nix/drvs")
WARM_DURABLE = "nixboot-cache-warm"
PATH_MEMO_SECONDS = 1.0


def warm_durable(cfg: Config) -> str:
    """Each cache instance its own durable: every instance sees every lease (a shared durable
    would hand each lease to one of them)."""
    return f"{WARM_DURABLE}-{cfg.cache.instance}" if cfg.cache.instance else WARM_DURABLE


LEASE_EVENTS = f"{subjects.PREFIX}.evt.lease.>"


def cache_key(cfg: Config) -> SecretKey:
    """The deployment's signing key: ``cache.secret_key_file`` or generated in the state dir."""
    if cfg.cache.secret_key_file:
        return SecretKey.parse(Path(cfg.cache.secret_key_file).read_text())
    state = cfg.state_path
    return load_or_create(state / "cache-key.sec", state / "cache-key.pub", cfg.cache.key_name)


class Generations:
    """In-memory view of the generations bucket, kept current by a KV watch."""

    def __init__(self) -> None:
        self.by_mac: dict[str, MachineGenerations] = {}

    def apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.by_mac.pop(key, None)
            return
        try:
            self.by_mac[key] = msgspec.json.decode(value, type=MachineGenerations)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("generations: ignoring undecodable record %s: %s", key, e)

    def for_menu(self, token: str, fallback_attr: str) -> tuple[MachineGenerations | None, bool]:
        """What a machine's menu offers, and whether that is the fallback: its own generations,
        else (an unknown machine, or one not built yet) the fallback configuration's, which the
        builder keeps under ``subjects.FALLBACK_KEY``; with no ``fallback_attr``, nothing (the
        menu then offers the local disk only). Pins belong to machines, never to the fallback."""
        own = self.by_mac.get(token)
        if own is not None and own.generations:
            return own, False
        fb = self.by_mac.get(subjects.FALLBACK_KEY) if fallback_attr else None
        if fb is None or not fb.generations:
            return None, True
        return msgspec.structs.replace(fb, pinned=None, next_boot=None), True

    def by_toplevel_hash(self, h: str) -> Generation | None:
        for mg in self.by_mac.values():
            for g in mg.generations:
                if menu.store_hash(g.toplevel) == h:
                    return g
        return None

    def protected_toplevels(self) -> set[str]:
        """Current (newest), default and pinned generations of every machine: never evicted."""
        keep: set[str] = set()
        for mg in list(self.by_mac.values()):  # called from worker threads: copy first
            by_number = {g.number: g for g in mg.generations}
            chosen = [mg.default(), *(mg.newest_first()[:1])]
            chosen += [by_number.get(n) for n in (mg.pinned, mg.next_boot) if n is not None]
            keep.update(g.toplevel for g in chosen if g is not None)
        return keep


class CacheService:
    def __init__(self, cfg: Config, store_db: Path = DEFAULT_DB) -> None:
        self.cfg = cfg
        state = cfg.state_path
        state.mkdir(parents=True, exist_ok=True)
        self.key = cache_key(cfg)
        self.public_key = str(self.key.public())
        self.boot_secret = security.read_or_create_secret(state / "boot-secret")
        self.store = StoreDb(store_db)
        self.gens = Generations()
        cores = os.cpu_count() or 1
        # One compression per core for warming, plus headroom so a cold request never queues
        # behind a whole warm.
        self.executor = ThreadPoolExecutor(max_workers=cores + 2, thread_name_prefix="nar")
        self.nars = NarCache(
            state / "cache",
            self.executor,
            cfg.cache.max_bytes,
            self._protected,
            grace_seconds=cfg.cache.evict_grace_seconds,
        )
        self.publish_event: Publish = _no_publish
        self.kv_generations: KeyValue | None = None  # set once NATS is up (one-shot pins)
        # With an upstream, everything comes from there (verified): this host's own store, if
        # it has one, is not the deployment's and is never served.
        self.upstream: Upstream | None = None
        self.boot_files: UpstreamBootFiles | None = None
        if cfg.cache.upstream_url:
            self.upstream = Upstream(
                cfg.cache.upstream_url, cfg.cache.upstream_public_key, state / "cache"
            )
            self.boot_files = UpstreamBootFiles(
                self.upstream, self.nars, state / "cache", self.executor
            )
            self.warmer = Warmer(
                self.store,
                self.nars,
                self._publish,
                parallel=cores,
                closure_of=self.upstream.closure,
                fetch=self.upstream.download,
            )
        else:
            self.warmer = Warmer(self.store, self.nars, self._publish, parallel=cores)
        # The lease map, mirrored by a watch: naming the machine behind an HTTP request (every
        # kernel, initrd and boot.ipxe) is a dict lookup, never a NATS round trip.
        self.lease_map: KvMirror[bytes] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.chains = chain.ChainRequests()
        self._narinfo_memo: dict[tuple[PathInfo, str, int], str] = {}
        self._known: dict[str, str] = {}  # nar hash -> store path, for every narinfo we answered
        self._paths: dict[str, tuple[PathInfo, float]] = {}  # hash part -> (path, held until)
        metrics.CACHE_BYTES.set_function(lambda: self.nars.total_bytes)
        metrics.MAX_BYTES.set(cfg.cache.max_bytes)

    async def _publish(self, event: events.Event) -> None:
        await self.publish_event(event)

    def publish_soon(self, event: events.Event) -> None:
        """Publish without making an HTTP client wait (a menu must not hang while NATS
        restarts; ``bus.publish`` retries for up to ~30 s)."""
        task = asyncio.ensure_future(self._publish(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_log_failure)

    def _protected(self) -> set[str]:
        """Nar hashes of every path in a protected closure (runs in a worker thread)."""
        keep: set[str] = set()
        for top in self.gens.protected_toplevels():
            if self.upstream is not None:
                keep.update(p.nar_hash32 for p in self.upstream.closure_known(top))
            else:
                keep.update(p.nar_hash32 for p in self.store.closure(top))
        return keep

    async def lookup(self, hash_part: str) -> PathInfo | None:
        """The path with this hash part: from the local store, or the upstream (verified).
        A path found in the local store is held for ``PATH_MEMO_SECONDS``: a classroom asks for
        the same paths within that time, and the two sqlite queries were the largest part of a
        narinfo answer. A valid path's row never changes; one garbage-collected meanwhile is
        answered as it would have been a moment earlier. Misses are never held (a path built
        just now is found at once)."""
        if self.upstream is None:
            now = time.monotonic()
            hit = self._paths.get(hash_part)
            if hit is not None and hit[1] > now:
                return hit[0]
            info = self.store.by_hash(hash_part)
            if info is not None:
                if len(self._paths) >= 50_000:
                    self._paths.clear()
                self._paths[hash_part] = (info, now + PATH_MEMO_SECONDS)
            return info
        ni = await self.upstream.narinfo(hash_part)
        return None if ni is None else path_info(ni)

    def start_nar(self, info: PathInfo) -> InFlight:
        return self.nars.start(info, self.upstream.download if self.upstream else None)

    # -- binary cache ---------------------------------------------------------------------------
    def narinfo(self, info: PathInfo, meta: NarMeta | None) -> str:
        """The signed narinfo text; memoised, since the same paths are asked for by every
        machine of a classroom (the key covers everything the text is made of)."""
        memo_key = (info, meta.file_hash if meta else "", meta.file_size if meta else 0)
        text = self._narinfo_memo.get(memo_key)
        if text is not None:
            return text
        ni = NarInfo(
            store_path=info.path,
            url=f"nar/{info.nar_hash32}.nar.zst",
            compression="zstd",
            file_hash=meta.file_hash if meta else "",
            file_size=meta.file_size if meta else 0,
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            references=tuple(r.removeprefix(STORE_DIR + "/") for r in info.references),
            deriver=info.deriver.removeprefix(STORE_DIR + "/") if info.deriver else None,
            ca=info.ca,
            # The upstream's verified signature travels on next to ours: clients booted from
            # this instance trust its key (the menu names it), others may trust the upstream's.
            sigs=self._upstream_sigs(info.path),
        )
        text = self.key.sign_narinfo(ni).render()
        if len(self._narinfo_memo) >= 50_000:
            self._narinfo_memo.clear()
        self._narinfo_memo[memo_key] = text
        return text

    def _upstream_sigs(self, path: str) -> tuple[str, ...]:
        if self.upstream is None:
            return ()
        ni = self.upstream.known(menu.store_hash(path))
        return ni.sigs if ni is not None else ()

    def path_for_nar(self, h: str) -> PathInfo | None:
        if self.upstream is not None:
            return self.upstream.info_by_nar(h)
        path = self._known.get(h)
        if path is None:
            # Rare: a URL published before a restart whose file was since evicted.
            path = self.store.path_by_nar_hash(nix32.decode(h, 32).hex())
        return None if path is None else self.store.by_path(path)

    async def consume_once(self, token: str, mg: MachineGenerations, number: int) -> None:
        """This menu made the one-shot pin default: it is spent (the rule in
        nixboot_shared.pins). The local view forgets it at once, so a second menu served before
        the KV watch catches up offers the usual default."""
        self.gens.by_mac[token] = msgspec.structs.replace(mg, next_boot=None)
        if self.kv_generations is None:
            return
        try:
            if await pins.consume_next_boot(self.kv_generations, mg.mac, number):
                metrics.ONE_SHOT_CONSUMED.inc()
        except Exception as e:  # NATS down: the menu is served anyway; the pin may apply again
            log.error("could not consume the one-shot pin of %s: %s", mg.mac, e)

    async def generations_for_lease(
        self, mac: str, kv: KeyValue
    ) -> tuple[MachineGenerations | None, bool]:
        """What a lease of ``mac`` boots, and whether it was read from KV (not in the view yet).
        Runs on the lease thread: it only reads the watched view (dict lookups, atomic under the
        GIL) and asks KV through that thread's ``kv``."""
        token = subjects.mac_token(mac)
        # The watched view answers at once; asking KV costs a round trip while a storm keeps
        # NATS busy (lease → warm started is on every boot's critical path).
        mg: MachineGenerations | None = self.gens.by_mac.get(token)
        if mg is None:
            try:
                entry = await kv.get(token)
            except Exception:  # KeyNotFoundError and friends: a machine with no generations yet
                entry = None
            if entry is not None and entry.value:
                return msgspec.json.decode(entry.value, type=MachineGenerations), True
            # An unknown machine boots the fallback (if any): warm that.
            mg, _ = self.gens.for_menu(token, self.cfg.fallback_attr)
        return mg, False

    async def decide_lease(
        self, event: events.LeaseSeen, kv: KeyValue
    ) -> Callable[[], None] | None:
        """On the lease thread: the main-loop call that starts this lease's warms, if any."""
        if not event.mac or event.lease_kind == "release":
            return None
        mac = event.mac
        mg, from_kv = await self.generations_for_lease(mac, kv)
        if mg is None:
            log.info("lease of %s: no generations, nothing to warm", mac)
            return None
        decided = time.time()

        def handoff() -> None:
            metrics.LEASE_HANDOFF.observe(max(0.0, time.time() - decided))
            self.start_warms(mac, mg, decided, remember=from_kv)

        return handoff

    def start_warms(
        self, mac: str, mg: MachineGenerations, decided: float, *, remember: bool
    ) -> None:
        """On the main loop: warm the default and the newest generation's closures.
        ``remember``: ``mg`` was read from KV; the view keeps it unless the watch was faster."""
        if remember:
            self.gens.by_mac.setdefault(subjects.mac_token(mac), mg)
        tops = []
        default = mg.default()
        newest = mg.newest_first()[:1]
        for g in [default, *newest]:
            if g is not None and g.toplevel not in tops:
                tops.append(g.toplevel)
        for top in tops:
            task = self.warmer.warm(top, mac, "lease", decided=decided)
            task.add_done_callback(_log_failure)
        if self.boot_files is not None:
            # Kernel and initrd are asked for right after the menu: have them out of their NARs.
            for g in {g.toplevel: g for g in [default, *newest] if g is not None}.values():
                for which, path in (("kernel", g.kernel), ("initrd", g.initrd)):
                    get = self.boot_files.get(menu.store_hash(g.toplevel), which, path)
                    asyncio.ensure_future(get).add_done_callback(_log_failure)

    async def report_boot_file(
        self, *, client: str, file: str, kind: str, size: int, started: float
    ) -> None:
        mac = self.mac_of_ip(client)
        await self._publish(
            events.BootFileRequested(
                mac=mac,
                file=file,
                file_kind="kernel" if kind == "kernel" else "initrd",
                client=client,
                protocol="http",
                bytes=size,
                seconds=time.monotonic() - started,
            )
        )

    def report_chain_soon(self, *, client: str, size: int, seconds: float) -> None:
        """boot.ipxe was served: its BootFileRequested event, once the requester is known."""
        ts = time.time()
        task = asyncio.ensure_future(
            self.report_chain(client=client, size=size, seconds=seconds, ts=ts)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_log_failure)

    async def report_chain(self, *, client: str, size: int, seconds: float, ts: float) -> None:
        mac, via = await self.chain_requester(client, ts)
        metrics.CHAIN_REQUESTERS.labels(via).inc()
        if mac is None:
            log.info("boot.ipxe for %s: no lease or menu names the machine", client)
        await self._publish(
            events.BootFileRequested(
                mac=mac,
                ts=ts,  # the request's own time, however long naming the machine took
                file="boot.ipxe",
                file_kind="boot-program",
                client=client,
                protocol="http",
                bytes=size,
                seconds=seconds,
            )
        )

    async def chain_requester(self, ip: str, at: float) -> tuple[str | None, str]:
        """The MAC of whoever asked for boot.ipxe from ``ip`` at ``at``, and how it was found
        (``lease``, ``menu`` or ``unknown``): see nixboot_cache.chain."""
        waiter = self.chains.expect(ip) if ip else None
        deadline = time.monotonic() + chain.ATTRIBUTE_SECONDS
        try:
            while True:
                mac = self.mac_of_fresh_lease(ip, at)
                if mac is not None:
                    return mac, "lease"
                remaining = deadline - time.monotonic()
                if waiter is None or remaining <= 0:
                    return None, "unknown"
                try:
                    mac = await asyncio.wait_for(
                        asyncio.shield(waiter), min(chain.POLL_SECONDS, remaining)
                    )
                except TimeoutError:
                    continue
                return mac, "menu"
        finally:
            if waiter is not None:
                self.chains.forget(ip, waiter)

    def mac_of_fresh_lease(self, ip: str, at: float) -> str | None:
        """The MAC whose lease of ``ip`` in the lease map is the requester's at ``at``."""
        mac = self.mac_of_ip(ip)
        raw = self.lease_map.get(subjects.mac_token(mac)) if mac and self.lease_map else None
        if mac is None or raw is None:
            return None
        try:
            lease = msgspec.json.decode(raw, type=Lease)
        except msgspec.DecodeError:  # not this one (the hook's records are checked on write)
            return None
        return mac if chain.lease_names_requester(lease, ip, at) else None

    def mac_of_ip(self, ip: str) -> str | None:
        """The MAC that last leased ``ip`` (the DHCP hook's index in the leases bucket)."""
        raw = self.lease_map.get(subjects.ip_key(ip)) if self.lease_map and ip else None
        try:
            return subjects.normalize_mac(raw.decode()) if raw else None
        except (UnicodeDecodeError, subjects.InvalidMac):  # a bad index entry: report without
            return None


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %s", task.get_coro(), task.exception())


async def _no_publish(event: events.Event) -> None:
    return None


def _regular_file_stat(path: str | os.PathLike[str]) -> os.stat_result | None:
    """Stat here, on the loop (a local file: microseconds), and hand the result to FileResponse:
    without it Starlette stats in a worker thread, a hop that waits for the GIL behind the busy
    loop (up to the 5 ms switch interval) on every NAR and boot file of a storm."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _count(kind: str, result: str) -> None:
    shared_metrics.labelled(metrics.REQUESTS, kind, result).inc()


def _count_nar(state: str, size: int) -> None:
    shared_metrics.labelled(metrics.NAR_SERVED, state).inc()
    shared_metrics.labelled(metrics.NAR_BYTES, state).inc(size)


def _bad(kind: str, msg: str, status: int = 400) -> Response:
    _count(kind, str(status))
    return PlainTextResponse(msg + "\n", status_code=status)


# -- the binary-cache and boot-file answers ------------------------------------------------------
# Plain functions of the request's parts, shared by the FastAPI routes (which keep them in the
# OpenAPI schema) and by nixboot_cache.hotpath, the raw ASGI front that answers them during a
# storm without FastAPI's routing and middleware stack.


def answer_cache_info() -> Response:
    return Response(CACHE_INFO, media_type="text/x-nix-cache-info")


async def answer_narinfo(svc: CacheService, hash_part: str) -> Response:
    if not nix32.is_store_hash(hash_part):
        return _bad("narinfo", f"malformed store hash {hash_part!r}")
    try:
        info = await svc.lookup(hash_part)
    except UpstreamError as e:  # unreachable, or a narinfo it did not sign: never served
        log.warning("narinfo %s: %s", hash_part, e)
        return _bad("narinfo", f"upstream: {e}", 502)
    if info is None:
        return _bad("narinfo", "no such path", 404)
    svc._known[info.nar_hash32] = info.path
    meta = svc.nars.meta(info.nar_hash32)
    if meta is None and svc.nars.inflight(info.nar_hash32) is None and not svc.nars.disk_full():
        # Cold: answer now (FileHash is optional) and start compressing (or downloading
        # from the upstream), since the NAR request usually follows.
        try:
            svc.start_nar(info)
        except OSError as e:  # the cache directory is full: the NAR is served direct
            svc.nars.note_disk_error(e)
    _count("narinfo", "200")
    return Response(svc.narinfo(info, meta), media_type="text/x-nix-narinfo")


def answer_nar(svc: CacheService, name: str, method: str) -> Response:
    h = name.removesuffix(".nar.zst")
    if not name.endswith(".nar.zst") or not nix32.is_sha256(h):
        return _bad("nar", f"malformed NAR name {name!r}")
    found = svc.nars.meta_stat(h)
    if found is not None and stat.S_ISREG(found[1].st_mode):
        meta, st = found
        svc.nars.touch(h)
        _count("nar", "200")
        if method == "GET":
            _count_nar("warm", meta.file_size)
        return FileResponse(
            svc.nars.nar_path(h), media_type="application/x-nix-nar", stat_result=st
        )
    job = svc.nars.inflight(h)
    if job is None:
        info = svc.path_for_nar(h)
        if info is None:
            return _bad("nar", "no such NAR", 404)
        try:
            job = None if svc.nars.disk_full() else svc.start_nar(info)
        except OSError as e:  # not even an empty temporary file fits
            svc.nars.note_disk_error(e)
        if job is None:
            _count("nar", "200")
            if method == "HEAD":
                return Response(media_type="application/x-nix-nar")
            shared_metrics.labelled(metrics.NAR_SERVED, "direct").inc()
            return StreamingResponse(
                stream_direct(info.path),
                media_type="application/x-nix-nar",
            )
    _count("nar", "200")
    if method == "HEAD":
        return Response(media_type="application/x-nix-nar")
    shared_metrics.labelled(metrics.NAR_SERVED, "streamed").inc()
    fd = open_inflight(job)
    streamed = shared_metrics.labelled(metrics.NAR_BYTES, "streamed")

    async def body() -> object:
        async for chunk in stream_inflight(job, fd):
            streamed.inc(len(chunk))
            yield chunk

    return StreamingResponse(body(), media_type="application/x-nix-nar")  # type: ignore[arg-type]


async def answer_boot_file(
    svc: CacheService,
    toplevel_hash: str,
    which: str,
    *,
    method: str,
    ranged: bool,
    client: str,
) -> Response:
    if not nix32.is_store_hash(toplevel_hash) or which not in ("kernel", "initrd"):
        return _bad("boot", "expected /boot/<toplevel hash>/kernel or initrd")
    gen = svc.gens.by_toplevel_hash(toplevel_hash)
    if gen is None:
        return _bad("boot", "no such generation", 404)
    wanted = gen.kernel if which == "kernel" else gen.initrd
    if svc.boot_files is not None:
        try:
            real = str(await svc.boot_files.get(toplevel_hash, which, wanted))
        except (UpstreamError, NarMismatch, narextract.BadNar) as e:
            log.warning("boot file %s of %s: %s", which, toplevel_hash, e)
            return _bad("boot", f"upstream: {e}", 502)
        except LookupError as e:
            return _bad("boot", f"boot file not in the upstream: {e}", 404)
    else:
        real = os.path.realpath(wanted)
        if not real.startswith(STORE_DIR + "/"):
            return _bad("boot", "boot file missing from the store", 404)
    st = _regular_file_stat(real)
    if st is None:
        return _bad("boot", "boot file missing from the store", 404)
    _count("boot", "200")
    task = None
    if method == "GET" and not ranged:
        # Whole-file downloads become BootFileRequested events (per-stage timing); the task
        # runs once the response has been handed to the server.
        task = BackgroundTask(
            svc.report_boot_file,
            client=client,
            file=f"boot/{toplevel_hash}/{which}",
            kind=which,
            size=st.st_size,
            started=time.monotonic(),
        )
    return FileResponse(
        real, media_type="application/octet-stream", background=task, stat_result=st
    )


def add_routes(app: FastAPI, svc: CacheService) -> None:
    @app.api_route("/nix-cache-info", methods=["GET", "HEAD"])
    async def cache_info() -> Response:
        return answer_cache_info()

    async def get_narinfo(request: Request) -> Response:
        return await answer_narinfo(svc, request.path_params["hash_part"])

    # A plain Starlette route: the hottest request (one per closure path per machine) skips
    # FastAPI's parameter validation layer.
    app.add_route("/{hash_part}.narinfo", get_narinfo, methods=["GET", "HEAD"])

    @app.api_route("/nar/{name}", methods=["GET", "HEAD"])
    async def get_nar(name: str, request: Request) -> Response:
        return answer_nar(svc, name, request.method)

    @app.api_route("/log/{drv}", methods=["GET", "HEAD"])
    async def get_log(drv: str) -> Response:
        base = drv.removeprefix(STORE_DIR + "/")
        if not _DRV_RE.match(base):
            return _bad("log", f"malformed derivation name {drv!r}")
        f = LOG_DIR / base[:2] / (base[2:] + ".bz2")
        try:
            data = await asyncio.to_thread(lambda: bz2.decompress(f.read_bytes()))
        except FileNotFoundError:
            return _bad("log", "no log for this derivation", 404)
        except (OSError, ValueError):
            return _bad("log", "unreadable log", 404)
        metrics.REQUESTS.labels("log", "200").inc()
        return Response(data, media_type="text/plain; charset=utf-8")

    # -- boot files ------------------------------------------------------------------------------
    @app.api_route("/boot/{toplevel_hash}/{which}", methods=["GET", "HEAD"])
    async def boot_file(toplevel_hash: str, which: str, request: Request) -> Response:
        return await answer_boot_file(
            svc,
            toplevel_hash,
            which,
            method=request.method,
            ranged="range" in request.headers,
            client=request.client.host if request.client else "",
        )

    @app.api_route("/boot.ipxe", methods=["GET", "HEAD"])
    async def boot_ipxe(request: Request) -> Response:
        started = time.monotonic()
        text = menu.render_ipxe_chain(svc.cfg.cache.public_url)
        metrics.REQUESTS.labels("ipxe", "200").inc()
        if request.method == "GET":
            # The iPXE path's boot program: the end of the timeline's dhcp stage and the start
            # of its bootloader stage (the menu request that follows ends it).
            svc.report_chain_soon(
                client=request.client.host if request.client else "",
                size=len(text.encode()),
                seconds=time.monotonic() - started,
            )
        return PlainTextResponse(text)

    @app.api_route("/ipxe/{mac}", methods=["GET", "HEAD"])
    async def ipxe_menu(mac: str, request: Request) -> Response:
        try:
            token = subjects.mac_token(mac)
        except subjects.InvalidMac as e:
            return _bad("ipxe", str(e))
        norm = subjects.normalize_mac(mac)
        boot_id = security.new_boot_id()
        params = menu.BootParams(
            cache_url=svc.cfg.cache.public_url,
            public_key=svc.public_key,
            boot_id=boot_id,
            boot_token=security.boot_token(svc.boot_secret, boot_id),
        )
        mg, fallback = svc.gens.for_menu(token, svc.cfg.fallback_attr)
        spec = menu.MenuSpec(
            mac=norm,
            title="nixboot",
            generations=mg,
            params=params,
            timeout_seconds=svc.cfg.menu_timeout_seconds,
        )
        text = menu.render_ipxe(spec, svc.cfg.cache.public_url.rstrip("/") + "/")
        if request.method == "GET":
            if request.client:
                svc.chains.resolve(request.client.host, norm)  # it also asked for boot.ipxe
            once = None if fallback else pins.once_made_default(mg)
            if once is not None and mg is not None:
                await svc.consume_once(token, mg, once)
            gens, default = menu.ordered_entries(spec)
            svc.publish_soon(
                events.MenuServed(
                    mac=norm,
                    boot_id=boot_id,
                    format="ipxe",
                    client=request.client.host if request.client else "",
                    default_generation=default.number if default else None,
                    generations=[g.number for g in gens],
                    fallback=fallback,
                )
            )
        metrics.REQUESTS.labels("ipxe", "200").inc()
        return PlainTextResponse(text)

    @app.post("/report/{boot_id}")
    async def report(boot_id: str, request: Request) -> Response:
        if not re.fullmatch(r"[0-9a-f]{1,64}", boot_id):
            return _bad("report", "malformed boot id")
        try:
            body = msgspec.json.decode(await request.body(), type=StageReport)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return _bad("report", f"bad report: {e}")
        token = request.headers.get("x-nixboot-token") or body.token or ""
        if not security.check_boot_token(svc.boot_secret, boot_id, token):
            metrics.FORGED_REPORTS.inc()
            return _bad("report", "bad token for this boot id", 403)
        try:
            event = events.StageReported(
                mac=body.mac,
                boot_id=boot_id,
                stage=body.stage,
                status=body.status,
                detail=body.detail[:2000],
                bytes=body.bytes,
                seconds=body.seconds,
            )
        except subjects.InvalidMac as e:
            return _bad("report", str(e))
        await svc._publish(event)
        metrics.REQUESTS.labels("report", "204").inc()
        return Response(status_code=204)


class StageReport(msgspec.Struct, forbid_unknown_fields=True):
    stage: events.Stage
    status: Literal["started", "done", "failed"] = "done"
    detail: str = ""
    bytes: int | None = None
    seconds: float | None = None
    mac: str | None = None
    token: str | None = None


async def _watch_generations(svc: CacheService, kv: KeyValue) -> None:
    while True:
        try:
            watcher = await kv.watchall()
            async for entry in watcher:
                if entry is None:
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                svc.gens.apply(entry.key, None if deleted else entry.value)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("generations watch failed (%s); retrying", e)
            await asyncio.sleep(1)


def main(cfg: Config) -> int:
    svc_box: list[CacheService] = []

    async def setup(ctx: ServiceContext, app: FastAPI) -> None:
        svc = CacheService(cfg)
        svc_box.append(svc)

        async def publish(event: events.Event) -> None:
            await bus.publish(ctx.js, event)

        svc.publish_event = publish
        add_routes(app, svc)
        from nixboot_cache.hotpath import HotPath  # it builds on this module

        ctx.front = HotPath(app, svc)
        kv = ctx.kv[subjects.KV_GENERATIONS]
        svc.lease_map = KvMirror(ctx.kv[subjects.KV_LEASES], bytes)
        ctx.spawn(svc.lease_map.run(), "leases-watch")
        svc.kv_generations = kv
        ctx.spawn(_watch_generations(svc, kv), "generations-watch")

        lease_thread: LeaseThread | None = None
        if cfg.replay_prefix:
            # Replay: leases come from the replay bus (ctx.js), never the live stream, so they
            # are taken on the main loop as they come (no storm to stay clear of).
            on_event = lease_handler(svc.decide_lease, kv, lambda handoff: handoff())
            await bus.subscribe_events(
                ctx.js, on_event, durable=warm_durable(cfg), filter_subject=LEASE_EVENTS
            )
        else:
            # Lease events are read on a thread of their own (nixboot_cache.leases: why).
            lease_thread = LeaseThread(
                cfg, warm_durable(cfg), LEASE_EVENTS, svc.decide_lease, "nixboot-cache-leases"
            )
            await lease_thread.start()

        async def stop_executor() -> None:
            svc.executor.shutdown(wait=False, cancel_futures=True)

        ctx.cleanups.append(stop_executor)
        if lease_thread is not None:
            # Cleanups run last-added first: no lease reaches a warmer whose executor is gone.
            ctx.cleanups.append(lease_thread.stop)
        if svc.upstream is not None:
            ctx.cleanups.append(svc.upstream.close)
        # The cache owns boot correlation: it receives the stage reports (docs/observability.md).
        # One tracker writes the boots bucket: with several instances, one has it enabled.
        if cfg.timeline.enabled:
            await setup_timeline(ctx, app)
        log.info("cache: public key %s", svc.public_key)

    return run("cache", cfg, cfg.cache.http, setup)
