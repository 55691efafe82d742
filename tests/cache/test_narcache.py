"""The compressed NAR store on its own: streaming while compressing, eviction, truncation."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from nixboot_cache import nar, nix32
from nixboot_cache.narcache import NarCache, open_inflight, stream_inflight
from nixboot_cache.store import PathInfo


def make_path(root: Path, name: str, size: int, seed: int) -> PathInfo:
    """A directory that stands in for a store path (NarCache only reads it)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "data").write_bytes(random.Random(seed).randbytes(size))
    data = b"".join(nar.dump(d))
    h = "sha256:" + nix32.encode(hashlib.sha256(data).digest())
    return PathInfo(str(d), h, len(data), (), None, None)


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    ex = ThreadPoolExecutor(4)
    yield ex  # type: ignore[misc]
    ex.shutdown()


async def test_stream_while_compressing(
    tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = make_path(tmp_path / "src", "big", 8 << 20, 1)
    # The compressor's source stops halfway until the reader has its first bytes: the reader
    # then sees them while the compressor provably has half the NAR still to read, however the
    # threads are scheduled. A compressor that writes only complete files makes the gate give
    # up after 30 s; the reader's first bytes then come after the whole source was read, and the
    # assert below fails. (``job.done`` is no witness: it is set in a later loop callback.)
    first_chunk_seen = threading.Event()
    source_read = threading.Event()
    real_dump = nar.dump

    def gated_dump(path: str) -> Iterator[bytes]:
        sent = 0
        for chunk in real_dump(path):
            if sent >= 4 << 20 and not first_chunk_seen.is_set():
                first_chunk_seen.wait(30)  # zstd has written blocks of the first 4 MiB by now
                first_chunk_seen.set()  # waited once: give up
            sent += len(chunk)
            yield chunk
        source_read.set()

    monkeypatch.setattr(nar, "dump", gated_dump)
    cache = NarCache(tmp_path / "cache", executor, 1 << 40)
    job = cache.start(info)
    assert cache.start(info) is job  # joined, not restarted
    fd = open_inflight(job)
    chunks = []
    read_at_first_chunk = None
    async for chunk in stream_inflight(job, fd):
        if read_at_first_chunk is None:
            read_at_first_chunk = source_read.is_set()
            first_chunk_seen.set()
        chunks.append(chunk)
    assert read_at_first_chunk is False  # the first bytes left before compression finished
    body = b"".join(chunks)
    meta = await job.finished
    assert body == cache.nar_file(info.nar_hash32).read_bytes()
    assert len(body) == meta.file_size
    assert meta.file_hash == "sha256:" + nix32.encode(hashlib.sha256(body).digest())
    out = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    assert out == b"".join(real_dump(info.path))
    assert cache.meta(info.nar_hash32) == meta
    assert not list((tmp_path / "cache" / "tmp").iterdir())


async def test_wrong_nar_hash_is_never_stored(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    info = make_path(tmp_path / "src", "p", 1000, 2)
    (Path(info.path) / "data").write_bytes(b"changed behind the database's back")
    cache = NarCache(tmp_path / "cache", executor, 1 << 40)
    with pytest.raises(RuntimeError, match="store database says"):
        await cache.ensure(info)
    assert cache.meta(info.nar_hash32) is None
    assert not list((tmp_path / "cache" / "nar").iterdir())


async def test_truncated_file_is_rebuilt(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    info = make_path(tmp_path / "src", "p", 300_000, 3)
    cache = NarCache(tmp_path / "cache", executor, 1 << 40)
    meta, built = await cache.ensure(info)
    assert built
    f = cache.nar_file(info.nar_hash32)
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    assert cache.meta(info.nar_hash32) is None  # detected, dropped
    assert not f.exists()
    meta2, built2 = await cache.ensure(info)
    assert built2 and meta2 == meta and f.read_bytes() == good
    # Also across a restart: the scan at start drops it.
    f.write_bytes(good[:100])
    again = NarCache(tmp_path / "cache", executor, 1 << 40)
    assert again.meta(info.nar_hash32) is None and again.total_bytes == 0


async def test_lru_eviction_spares_protected(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    infos = [make_path(tmp_path / "src", f"p{i}", 200_000, 10 + i) for i in range(5)]
    protected = {infos[0].nar_hash32}
    cache = NarCache(tmp_path / "cache", executor, 450_000, lambda: protected)
    for info in infos[:2]:
        await cache.ensure(info)
    cache.touch(infos[0].nar_hash32)
    await cache.ensure(infos[2])  # over the bound: p1 is the LRU unprotected one
    assert cache.meta(infos[0].nar_hash32) is not None
    assert cache.meta(infos[1].nar_hash32) is None
    assert cache.meta(infos[2].nar_hash32) is not None
    await cache.ensure(infos[3])
    await cache.ensure(infos[4])
    assert cache.total_bytes <= 450_000
    assert cache.meta(infos[0].nar_hash32) is not None  # oldest, but protected
    assert cache.meta(infos[4].nar_hash32) is not None
    assert cache.stats.evicted == 3


async def test_recently_used_not_evicted(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    infos = [make_path(tmp_path / "src", f"p{i}", 200_000, 20 + i) for i in range(3)]
    cache = NarCache(tmp_path / "cache", executor, 1, grace_seconds=60)
    for info in infos:
        await cache.ensure(info)
    assert all(cache.meta(i.nar_hash32) is not None for i in infos)
    cache.grace_seconds = 0
    cache.evict()
    assert cache.total_bytes == 0 and cache.stats.evicted == 3


async def test_concurrent_ensures_compress_once(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    info = make_path(tmp_path / "src", "p", 2 << 20, 4)
    cache = NarCache(tmp_path / "cache", executor, 1 << 40)
    results = await asyncio.gather(*(cache.ensure(info) for _ in range(8)))
    assert cache.stats.compressed == 1
    assert len({m for m, _ in results}) == 1
