"""Flake change detection: poll the flake's fingerprint (git revision, or the NAR hash of a path
flake's files) and queue a build of every configuration in use when it changes, or when a
configuration has no generation built from the current fingerprint (first start).

A local flake is also watched with inotify, which wakes the poll as soon as a change is complete;
the interval poll stays, for remote flakes and as the safety net."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path

from nats.js import JetStreamContext

from nixboot_builder.inotify import TreeWatcher
from nixboot_builder.nix import Nix, NixError
from nixboot_builder.store import FALLBACK_KEY, Store
from nixboot_builder.worker import request_build
from nixboot_shared import subjects

log = logging.getLogger(__name__)


def local_flake_dir(flake: str) -> Path | None:
    """The directory of a local flake reference (``/x``, ``path:/x``, ``git+file:///x``)."""
    for prefix in ("path:", "git+file://", ""):
        if flake.startswith(prefix) and flake[len(prefix) :].startswith("/"):
            return Path(flake[len(prefix) :].split("?", 1)[0])
    return None


def tree_stamp(directory: Path) -> str:
    """A cheap summary of a directory's files (names, sizes, mtimes; git objects left out):
    when it is unchanged, asking nix for the flake's fingerprint can be skipped."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        if os.path.basename(root) == ".git" and "objects" in dirs:
            dirs.remove("objects")
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FlakePoller:
    def __init__(
        self,
        js: JetStreamContext,
        store: Store,
        nix: Nix,
        flake: str,
        fallback_attr: str = "",
        watch: bool = True,
    ) -> None:
        self.js, self.store, self.nix, self.flake = js, store, nix, flake
        self.fallback_attr = fallback_attr
        self.fingerprint: str | None = None
        self.local_dir = local_flake_dir(flake)
        self.stamp: str | None = None
        self.watch = watch

    async def attrs_needing_build(self, fingerprint: str) -> list[str]:
        """Attributes in use whose machines' newest generation is not from ``fingerprint``."""
        stale: set[str] = set()
        users = [(subjects.mac_token(m.mac), m.attr) for m in await self.store.machines()]
        if self.fallback_attr:
            users.append((FALLBACK_KEY, self.fallback_attr))
        for key, attr in users:
            record = await self.store.generations(key)
            newest = record.newest_first()[0] if record and record.generations else None
            if newest is None or newest.flake_rev != fingerprint:
                stale.add(attr)
        return sorted(stale)

    async def poll_once(self) -> list[str]:
        """One poll; returns the attributes queued."""
        if self.local_dir is not None and self.fingerprint is not None:
            stamp = await asyncio.to_thread(tree_stamp, self.local_dir)
            if stamp == self.stamp:
                return []
            self.stamp = stamp
        elif self.local_dir is not None:
            self.stamp = await asyncio.to_thread(tree_stamp, self.local_dir)
        try:
            fingerprint = await self.nix.flake_fingerprint(self.flake)
        except NixError as e:
            log.warning("flake poll: %s", e)
            return []
        if fingerprint == self.fingerprint:
            return []
        attrs = await self.attrs_needing_build(fingerprint)
        for attr in attrs:
            # Keyed by revision: every builder instance polls, JetStream keeps one request.
            await request_build(
                self.js,
                attr,
                "flake-change",
                dedupe_key=f"{attr}@{fingerprint}",
                flake_rev=fingerprint,
            )
        if attrs:
            log.info("flake %s changed (%s): queued %s", self.flake, fingerprint, ", ".join(attrs))
        self.fingerprint = fingerprint
        return attrs

    def _watch(self) -> TreeWatcher | None:
        if self.local_dir is None or not self.watch:
            return None
        watcher = TreeWatcher(self.local_dir)
        try:
            watcher.start()
        except OSError as e:
            log.warning("cannot watch %s (%s): polling only", self.local_dir, e)
            return None
        return watcher

    async def run(self, interval: float) -> None:
        watcher = self._watch()
        wake = watcher.changed if watcher is not None else asyncio.Event()
        try:
            while True:
                wake.clear()  # before polling: a change seen during the poll polls again
                await self.poll_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval)
        finally:
            if watcher is not None:
                watcher.close()
