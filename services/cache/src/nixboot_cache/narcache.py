"""The compressed NAR store: ``<cache>/nar/<narhash>.nar.zst`` plus a JSON sidecar per file.

Names are the nix32 NarHash: content-addressed and known from the store database before anything
is compressed, so a narinfo can be answered at once for a cold path and its URL stays valid forever
(after eviction, or a zstd upgrade that changes the compressed bytes, the same URL is rebuilt from
the store; the client checks only NarHash). Files are written to ``tmp/`` and renamed; the sidecar
(FileHash, FileSize, NarSize) is written after the rename, and a file whose size differs from its
sidecar is treated as truncated: deleted, rebuilt, never served.

While a NAR is being compressed its temporary file is readable: ``InFlight`` tells readers how far
it is written, so a client asking for a cold path streams it as it is produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard

from nixboot_cache import metrics, nar, nix32
from nixboot_cache.store import PathInfo

log = logging.getLogger(__name__)

ZSTD_LEVEL = 3
READ_CHUNK = 256 * 1024
# After the cache directory ran out of space, NARs are compressed straight to the client (not
# kept) for this long before the disk is tried again.
DISK_FULL_BACKOFF_SECONDS = 10.0


class NarMismatch(RuntimeError):
    """The store path's NAR no longer matches the database (corrupt store): never served."""


@dataclass(frozen=True)
class NarMeta:
    store_path: str
    nar_hash32: str
    nar_size: int
    file_hash: str  # sha256:<nix32> of the compressed file
    file_size: int


# A producer of an already zstd-compressed NAR (an upstream cache's file), run in a worker thread.
Fetch = Callable[[PathInfo], Iterator[bytes]]


@dataclass
class InFlight:
    info: PathInfo
    tmp: Path
    fetch: Fetch | None = None
    written: int = 0
    done: bool = False
    error: BaseException | None = None
    meta: NarMeta | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Future[NarMeta] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class Stats:
    compressed: int = 0
    compressed_bytes: int = 0
    evicted: int = 0
    truncated_rebuilt: int = 0


class NarCache:
    def __init__(
        self,
        root: Path,
        executor: Executor,
        max_bytes: int,
        protected: Callable[[], set[str]] = set,
        grace_seconds: float = 0.0,
    ) -> None:
        self.root = root
        self.executor = executor
        self.max_bytes = max_bytes
        self.protected = protected  # nar hashes that must never be evicted
        self.grace_seconds = grace_seconds
        self._disk_full_until = 0.0
        self.stats = Stats()
        self._used: dict[str, float] = {}  # nar hash -> monotonic time of last use
        self._metas: dict[str, NarMeta] = {}  # sidecars read so far
        self._inflight: dict[str, InFlight] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()  # nar hash -> file size, oldest first
        self._lock = threading.Lock()
        self._nar_dir = f"{root}/nar/"
        for sub in ("nar", "meta", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- layout --------------------------------------------------------------------------------
    def nar_file(self, h: str) -> Path:
        return self.root / "nar" / f"{h}.nar.zst"

    def nar_path(self, h: str) -> str:
        """``nar_file`` as a string, without pathlib's ~2 µs (every NAR request)."""
        return f"{self._nar_dir}{h}.nar.zst"

    def meta_file(self, h: str) -> Path:
        return self.root / "meta" / f"{h}.json"

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def _scan(self) -> None:
        """At start: drop leftovers of interrupted writes, index what is complete by mtime."""
        for tmp in (self.root / "tmp").iterdir():
            tmp.unlink(missing_ok=True)
        found = []
        for f in (self.root / "nar").glob("*.nar.zst"):
            h = f.name.removesuffix(".nar.zst")
            meta = self.meta(h)
            if meta is not None:
                found.append((f.stat().st_mtime, h, meta.file_size))
        for _, h, size in sorted(found):
            self._lru[h] = size

    # -- lookups -------------------------------------------------------------------------------
    def meta(self, h: str) -> NarMeta | None:
        """The sidecar of a complete file, or None. A file whose size disagrees with its sidecar
        (truncated, or the sidecar lost) is removed so it is rebuilt and never served. Sidecars
        are kept in memory once read; the file is stat()ed on every call (~2 µs)."""
        found = self.meta_stat(h)
        return None if found is None else found[0]

    def meta_stat(self, h: str) -> tuple[NarMeta, os.stat_result] | None:
        """``meta`` and the file's stat from the same call (a NAR response needs both)."""
        try:
            st = os.stat(self.nar_path(h))
            size = st.st_size
        except FileNotFoundError:
            self._metas.pop(h, None)
            return None
        meta = self._metas.get(h)
        if meta is None:
            try:
                meta = NarMeta(**json.loads(self.meta_file(h).read_text()))
            except FileNotFoundError:
                return None  # between the rename of the file and of its sidecar
            except (ValueError, TypeError):
                log.warning("cache: unreadable sidecar for %s: rebuilding", h)
                self._drop(h, truncated=True)
                return None
        if size != meta.file_size:
            log.warning(
                "cache: %s is %d bytes, sidecar says %d: rebuilding", h, size, meta.file_size
            )
            self._drop(h, truncated=True)
            return None
        self._metas[h] = meta
        return meta, st

    def touch(self, h: str) -> None:
        with self._lock:
            if h in self._lru:
                self._lru.move_to_end(h)
                self._used[h] = time.monotonic()

    def _drop(self, h: str, *, truncated: bool = False) -> None:
        self._metas.pop(h, None)
        self.meta_file(h).unlink(missing_ok=True)
        self.nar_file(h).unlink(missing_ok=True)
        with self._lock:
            self._lru.pop(h, None)
        if truncated:
            self.stats.truncated_rebuilt += 1
            metrics.TRUNCATED.inc()

    def inflight(self, h: str) -> InFlight | None:
        return self._inflight.get(h)

    def disk_full(self) -> bool:
        return time.monotonic() < self._disk_full_until

    def note_disk_error(self, exc: BaseException) -> None:
        """A full (or quota-limited) cache directory: serve without keeping for a while."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if not self.disk_full():
                log.error(
                    "cache: %s is full (%s): serving NARs without keeping them", self.root, exc
                )
            metrics.DISK_FULL.inc()
            self._disk_full_until = time.monotonic() + DISK_FULL_BACKOFF_SECONDS

    # -- compression ---------------------------------------------------------------------------
    def start(self, info: PathInfo, fetch: Fetch | None = None) -> InFlight:
        """Start compressing ``info`` (or join the compression already running). With ``fetch``
        the compressed file comes from there instead of the local store; it is checked against
        ``info``'s NarHash/NarSize the same way before it is kept."""
        h = info.nar_hash32
        job = self._inflight.get(h)
        if job is not None:
            return job
        tmp = self.root / "tmp" / f"{h}.{os.getpid()}.{time.monotonic_ns()}"
        tmp.touch()  # exists before any reader opens it
        job = InFlight(info=info, tmp=tmp, fetch=fetch)
        self._inflight[h] = job
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._compress, job, loop)

        def finish(f: asyncio.Future[NarMeta]) -> None:
            # On the loop thread, like every reader's open(): a reader that found the job still
            # in flight has its descriptor already, so removing the name here races with nobody.
            self._inflight.pop(h, None)
            tmp.unlink(missing_ok=True)
            job.done = True
            exc = f.exception()
            if exc is not None:
                self.note_disk_error(exc)
                job.error = exc
                job.finished.set_exception(exc)
                job.finished.exception()  # retrieved: a failed warm is logged by its caller
            else:
                job.meta = f.result()
                job.finished.set_result(job.meta)
            job._notify()

        fut.add_done_callback(finish)
        return job

    async def ensure(self, info: PathInfo, fetch: Fetch | None = None) -> tuple[NarMeta, bool]:
        """The complete compressed file of ``info``; True when it had to be built."""
        meta = self.meta(info.nar_hash32)
        if meta is not None:
            return meta, False
        return await asyncio.shield(self.start(info, fetch).finished), True

    def _compress(self, job: InFlight, loop: asyncio.AbstractEventLoop) -> NarMeta:
        """Runs in a worker thread: NAR → zstd → tmp file, hashing both; zstd and sha256 release
        the GIL, so several workers use several cores."""
        info = job.info
        nar_hash = hashlib.sha256()
        file_hash = hashlib.sha256()
        nar_size = 0
        written = 0
        comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        with open(job.tmp, "wb") as out:

            def emit(data: bytes) -> None:
                nonlocal written
                if data:
                    out.write(data)
                    out.flush()
                    file_hash.update(data)
                    written += len(data)
                    job.written = written  # readers never read past this
                    loop.call_soon_threadsafe(job._notify)

            if job.fetch is None:
                for chunk in nar.dump(info.path):
                    nar_hash.update(chunk)
                    nar_size += len(chunk)
                    emit(comp.compress(chunk))
                emit(comp.flush())
            else:
                # Kept as received; decompressed only to check the NAR (frames may be several).
                dec = zstandard.ZstdDecompressor().decompressobj()
                for chunk in job.fetch(info):
                    emit(chunk)
                    while chunk:
                        plain = dec.decompress(chunk)
                        nar_hash.update(plain)
                        nar_size += len(plain)
                        if nar_size > info.nar_size:
                            raise NarMismatch(f"{info.path}: NAR longer than {info.nar_size}")
                        chunk = dec.unused_data if dec.eof else b""
                        if dec.eof:
                            dec = zstandard.ZstdDecompressor().decompressobj()
            # No fsync: it cost ~5 s per 500 files here. After a crash, a file cut short is
            # caught by the sidecar size check, and the client checks NarHash anyway.
        got = nix32.encode(nar_hash.digest())
        if got != info.nar_hash32 or nar_size != info.nar_size:
            raise NarMismatch(
                f"{info.path}: NAR is sha256:{got} ({nar_size} bytes), the store database says "
                f"{info.nar_hash} ({info.nar_size} bytes)"
            )
        h = info.nar_hash32
        meta = NarMeta(
            info.path, h, nar_size, "sha256:" + nix32.encode(file_hash.digest()), written
        )
        # A second name, renamed into place: the tmp name stays for readers joining until the
        # loop thread removes it (see ``start``).
        keep = self.root / "tmp" / f"{job.tmp.name}.keep"
        os.link(job.tmp, keep)
        os.replace(keep, self.nar_file(h))
        meta_tmp = self.root / "tmp" / f"{h}.json.{time.monotonic_ns()}"
        meta_tmp.write_text(json.dumps(asdict(meta)))
        os.replace(meta_tmp, self.meta_file(h))
        with self._lock:
            self._lru[h] = written
            self._lru.move_to_end(h)
            self._used[h] = time.monotonic()
        self.stats.compressed += 1
        self.stats.compressed_bytes += written
        metrics.COMPRESSED.inc()
        self.evict()
        return meta

    # -- eviction ------------------------------------------------------------------------------
    def evict(self) -> list[str]:
        """Remove least recently used files until under ``max_bytes``; protected ones stay."""
        with self._lock:
            if sum(self._lru.values()) <= self.max_bytes:
                return []
        keep = self.protected()
        removed = []
        recent = time.monotonic() - self.grace_seconds
        with self._lock:
            total = sum(self._lru.values())
            for h in list(self._lru):
                if total <= self.max_bytes:
                    break
                if h in keep or self._used.get(h, 0.0) > recent:
                    continue
                total -= self._lru.pop(h)
                self._used.pop(h, None)
                removed.append(h)
        for h in removed:
            self._metas.pop(h, None)
            self.nar_file(h).unlink(missing_ok=True)
            self.meta_file(h).unlink(missing_ok=True)
            self.stats.evicted += 1
            metrics.EVICTED.inc()
            log.info("cache: evicted %s", h)
        return removed


async def stream_direct(path: str) -> AsyncIterator[bytes]:
    """The compressed NAR of ``path`` made for this client alone, nothing written to disk (the
    cache directory is full). The narinfo of a NAR not on disk carries no FileHash/FileSize, and
    nix checks the NarHash of what it unpacks."""
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    chunks = nar.dump(path)

    def step() -> bytes | None:
        chunk = next(chunks, None)
        return None if chunk is None else comp.compress(chunk)

    while (data := await asyncio.to_thread(step)) is not None:
        if data:
            yield data
    yield comp.flush()


def open_inflight(job: InFlight) -> int:
    """Open the file being written; call on the loop thread right after finding ``job``."""
    return os.open(job.tmp, os.O_RDONLY)


async def stream_inflight(job: InFlight, fd: int) -> AsyncIterator[bytes]:
    """The bytes of a file being compressed, as they are written; raises if compression fails
    (the client sees a truncated body and retries, instead of a corrupt NAR). Closes ``fd``."""
    try:
        pos = 0
        while True:
            changed = job.changed
            target = job.written
            while pos < target:
                data = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, target - pos), pos)
                if not data:
                    raise OSError(f"{job.tmp}: shorter than announced")
                pos += len(data)
                yield data
            if job.done:
                if job.error is not None:
                    raise job.error
                if job.meta is not None and pos >= job.meta.file_size:
                    return
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=5)
    finally:
        os.close(fd)
