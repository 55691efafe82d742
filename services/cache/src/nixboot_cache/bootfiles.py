"""Kernels and initrds for a cache filled from an upstream: taken out of verified NARs.

A generation names its boot files by store path (``/nix/store/<hash>-linux/bzImage``, or a
symlink inside the toplevel). Without the builder's store, the file is read out of the NAR of its
store path (fetched from the upstream and checked against the signed NarHash like any other),
following symlinks across store paths, and kept as ``<cache>/boot/<toplevel-hash>/<which>``.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import time
from concurrent.futures import Executor
from pathlib import Path

import zstandard

from nixboot_cache import narextract
from nixboot_cache.narcache import NarCache
from nixboot_cache.narinfo import STORE_DIR, is_store_path, store_hash
from nixboot_cache.upstream import Upstream, path_info

MAX_LINKS = 16


def split_store_path(path: str) -> tuple[str, str]:
    """``/nix/store/<hash>-name/a/b`` -> (``/nix/store/<hash>-name``, ``a/b``). Pure."""
    norm = posixpath.normpath(path)
    parts = norm.removeprefix(STORE_DIR + "/").split("/", 1)
    base = f"{STORE_DIR}/{parts[0]}"
    if not norm.startswith(STORE_DIR + "/") or not is_store_path(base):
        raise LookupError(f"{path!r} is not inside a store path")
    return base, parts[1] if len(parts) > 1 else ""


def follow(base: str, entry: narextract.Entry) -> str:
    """Where a symlink met at ``base/entry.at`` leads, with the rest of the asked path. Pure."""
    link = posixpath.join(base, entry.at) if entry.at else base
    target = posixpath.normpath(posixpath.join(posixpath.dirname(link), entry.target))
    return posixpath.join(target, entry.rest) if entry.rest else target


class UpstreamBootFiles:
    def __init__(self, upstream: Upstream, nars: NarCache, root: Path, executor: Executor) -> None:
        self.upstream = upstream
        self.nars = nars
        self.root = root / "boot"
        self.executor = executor
        self._making: dict[Path, asyncio.Task[Path]] = {}

    def file(self, toplevel_hash: str, which: str) -> Path:
        return self.root / toplevel_hash / which

    async def get(self, toplevel_hash: str, which: str, path: str) -> Path:
        final = self.file(toplevel_hash, which)
        if final.is_file():
            return final
        task = self._making.get(final)
        if task is None:
            task = asyncio.ensure_future(self._make(path, final))
            self._making[final] = task
            task.add_done_callback(lambda _t: self._making.pop(final, None))
        return await asyncio.shield(task)

    async def _make(self, path: str, final: Path) -> Path:
        current = path
        loop = asyncio.get_running_loop()
        for _ in range(MAX_LINKS):
            base, rel = split_store_path(current)
            ni = await self.upstream.narinfo(store_hash(base))
            if ni is None:
                raise LookupError(f"{base} is not in the upstream cache")
            meta, _ = await self.nars.ensure(path_info(ni), self.upstream.download)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.{os.getpid()}.{time.monotonic_ns()}"
            nar_file = self.nars.nar_file(meta.nar_hash32)
            try:
                entry = await loop.run_in_executor(self.executor, _extract, nar_file, rel, tmp)
                if entry.kind == "regular":
                    os.replace(tmp, final)
                    return final
            finally:
                tmp.unlink(missing_ok=True)
            if entry.kind != "symlink":
                raise LookupError(f"{current} is a {entry.kind}, not a file")
            current = follow(base, entry)
        raise LookupError(f"{path}: more than {MAX_LINKS} symlinks")


def _extract(nar_file: Path, rel: str, out: Path) -> narextract.Entry:
    with open(nar_file, "rb") as f, open(out, "wb") as sink:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return narextract.extract(reader.read, rel, sink.write)
