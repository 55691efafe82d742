"""Filling this cache from an upstream binary cache (another nixboot cache), for an instance on a
host without the builder's Nix store.

Trust: a narinfo from the upstream is used only when it carries a valid signature by the
configured upstream key over its fingerprint (store path, NarHash, NarSize, references) and names
the store path that was asked for; the NAR is accepted only when its decompressed bytes hash to
that NarHash (checked in ``NarCache`` while the file is written, before it is served or signed).
So a compromised network or upstream mirror can make downloads fail, never make us serve or sign
something the upstream key did not sign. Verified narinfos are kept on disk (``<cache>/upstream``)
so NAR URLs published before a restart stay servable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx

from nixboot_cache import nix32
from nixboot_cache.narinfo import STORE_DIR, InvalidNarInfo, NarInfo, parse, store_hash
from nixboot_cache.signing import PublicKey, narinfo_fingerprint
from nixboot_cache.store import PathInfo

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


class UpstreamError(RuntimeError):
    """The upstream could not be asked (network, 5xx) or answered something unusable."""


class UntrustedNarInfo(UpstreamError):
    """A narinfo without a valid signature by the upstream key, or for another path."""


def verify(text: str, hash_part: str, key: PublicKey) -> NarInfo:
    """The parsed narinfo if ``key`` signed it and it is the one asked for. Pure."""
    try:
        ni = parse(text)
    except InvalidNarInfo as e:
        raise UntrustedNarInfo(f"{hash_part}: malformed narinfo from upstream: {e}") from None
    if store_hash(ni.store_path) != hash_part:
        raise UntrustedNarInfo(f"{hash_part}: upstream answered for {ni.store_path}")
    fp = narinfo_fingerprint(ni)
    good = [s for s in ni.sigs if s.startswith(key.name + ":") and key.verify(fp, s)]
    if not good:
        why = "unsigned" if not ni.sigs else f"no valid signature by {key.name}"
        raise UntrustedNarInfo(f"{ni.store_path}: narinfo from upstream is {why}")
    if ni.compression != "zstd":
        # A nixboot upstream always serves zstd; storing what we received keeps the file
        # byte-identical to the upstream's (no recompression on this host).
        raise UpstreamError(f"{ni.store_path}: compression {ni.compression!r} (need zstd)")
    if "://" in ni.url or ".." in ni.url.split("/") or ni.url.startswith("/"):
        raise UntrustedNarInfo(f"{ni.store_path}: NAR URL {ni.url!r} leaves the upstream")
    for ref in ni.references:
        if not nix32.is_store_hash(ref[:32]) or "/" in ref:
            raise UntrustedNarInfo(f"{ni.store_path}: bad reference {ref!r}")
    return ni.with_sigs(tuple(good))  # only the signatures we checked travel on


def path_info(ni: NarInfo) -> PathInfo:
    return PathInfo(
        path=ni.store_path,
        nar_hash=ni.nar_hash,
        nar_size=ni.nar_size,
        references=tuple(sorted(f"{STORE_DIR}/{r}" for r in ni.references)),
        deriver=f"{STORE_DIR}/{ni.deriver}" if ni.deriver else None,
        ca=ni.ca,
    )


class Upstream:
    def __init__(self, url: str, public_key: str, root: Path) -> None:
        self.url = url.rstrip("/")
        try:
            self.key = PublicKey.parse(public_key)
        except ValueError as e:
            raise ValueError(f"cache.upstream_public_key: {e}") from None
        self.dir = root / "upstream"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.infos: dict[str, NarInfo] = {}  # hash part -> verified narinfo
        self.by_nar: dict[str, str] = {}  # nar hash32 -> hash part
        self._asking: dict[str, asyncio.Task[NarInfo | None]] = {}
        self._http: httpx.AsyncClient | None = None
        self._load()

    def _load(self) -> None:
        """Verified narinfos kept from earlier runs: checked again (a file on disk is no more
        trusted than the network)."""
        for f in self.dir.glob("*.narinfo"):
            h = f.name.removesuffix(".narinfo")
            try:
                self._remember(verify(f.read_text(), h, self.key))
            except (UpstreamError, OSError, UnicodeDecodeError) as e:
                log.warning("upstream: dropping stored %s: %s", f.name, e)
                f.unlink(missing_ok=True)

    def _remember(self, ni: NarInfo) -> None:
        h = ni.hash_part
        self.infos[h] = ni
        self.by_nar[ni.nar_hash.removeprefix("sha256:")] = h

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def known(self, hash_part: str) -> NarInfo | None:
        return self.infos.get(hash_part)

    async def narinfo(self, hash_part: str) -> NarInfo | None:
        """The verified narinfo, None when the upstream does not have the path; concurrent
        requests for one path share one upstream request."""
        ni = self.infos.get(hash_part)
        if ni is not None:
            return ni
        task = self._asking.get(hash_part)
        if task is None:
            task = asyncio.ensure_future(self._ask(hash_part))
            self._asking[hash_part] = task
            task.add_done_callback(lambda _t: self._asking.pop(hash_part, None))
        return await asyncio.shield(task)

    async def _ask(self, hash_part: str) -> NarInfo | None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5))
        try:
            r = await self._http.get(f"{self.url}/{hash_part}.narinfo")
        except httpx.HTTPError as e:
            raise UpstreamError(f"upstream {self.url}: {e!r}") from None
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise UpstreamError(
                f"upstream {self.url}: {hash_part}.narinfo answered {r.status_code}"
            )
        ni = verify(r.text, hash_part, self.key)
        # What we keep is the upstream's text (signature included), written atomically.
        tmp = self.dir / f".{hash_part}.{os.getpid()}.tmp"
        tmp.write_text(r.text)
        os.replace(tmp, self.dir / f"{hash_part}.narinfo")
        self._remember(ni)
        return ni

    async def closure(self, store_path: str) -> list[PathInfo]:
        """The closure of ``store_path`` from verified narinfos, asked level by level (all
        references of a level at once)."""
        seen: dict[str, NarInfo] = {}
        level = [store_hash(store_path)]
        while level:
            found = await asyncio.gather(*(self.narinfo(h) for h in level))
            nxt: list[str] = []
            for h, ni in zip(level, found, strict=True):
                if ni is None:
                    raise LookupError(f"{h}: not in the upstream cache {self.url}")
                seen[h] = ni
                nxt += [r[:32] for r in ni.references if r[:32] not in seen]
            level = sorted(set(nxt) - set(seen))
        return [path_info(ni) for ni in seen.values()]

    def closure_known(self, store_path: str) -> list[PathInfo]:
        """The closure as far as the narinfos seen so far go (eviction's protected set; runs
        in a worker thread, no network)."""
        out: dict[str, NarInfo] = {}
        todo = [store_hash(store_path)]
        while todo:
            h = todo.pop()
            ni = self.infos.get(h)
            if ni is None or h in out:
                continue
            out[h] = ni
            todo += [r[:32] for r in ni.references]
        return [path_info(ni) for ni in out.values()]

    def info_by_nar(self, nar_hash32: str) -> PathInfo | None:
        h = self.by_nar.get(nar_hash32)
        return None if h is None else path_info(self.infos[h])

    def download(self, info: PathInfo) -> Iterator[bytes]:
        """The compressed NAR of ``info`` from the upstream (runs in a worker thread; the
        caller checks NarHash and NarSize on the decompressed bytes)."""
        ni = self.infos.get(store_hash(info.path))
        if ni is None:
            raise UpstreamError(f"{info.path}: no verified narinfo")
        url = f"{self.url}/{ni.url}"
        with (
            httpx.Client(timeout=httpx.Timeout(60, connect=5)) as client,
            client.stream("GET", url) as r,
        ):
            if r.status_code != 200:
                raise UpstreamError(f"upstream {url} answered {r.status_code}")
            yield from r.iter_bytes(CHUNK)
