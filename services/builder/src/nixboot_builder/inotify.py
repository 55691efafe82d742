"""Wake the flake poller when a local flake's files change: Linux inotify through ctypes, read on
the event loop (``add_reader``), so there is no thread, no idle wake-ups and no latency of its own.

Only completed changes wake it (a file closed after writing, created, deleted, moved, chmod'ed),
never a bare ``IN_MODIFY``: a file being written is seen once it is closed, not half-written. A
burst (a ``git checkout``, an editor's save-and-rename) is let settle for ``settle`` seconds of
quiet before the poller looks. Polling stays the safety net for anything inotify misses (queue
overflow, a writer that never closes, the watch limit reached)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class InotifyUnavailable(OSError):
    pass


def _skip(directory: str) -> bool:
    # Git's object store churns on every commit but says nothing refs and the index don't.
    return directory.endswith(os.sep + os.path.join(".git", "objects"))


def parse_events(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(watch descriptor, mask, name) of each event in a read() of the inotify descriptor."""
    out = []
    offset = 0
    while offset + _HEADER.size <= len(buf):
        wd, mask, _cookie, length = _HEADER.unpack_from(buf, offset)
        start = offset + _HEADER.size
        out.append((wd, mask, buf[start : start + length].rstrip(b"\0")))
        offset = start + length
    return out


class TreeWatcher:
    """Sets ``changed`` whenever something under ``root`` changed (after ``settle`` quiet)."""

    def __init__(self, root: Path, settle: float = 0.01) -> None:
        self.root, self.settle = root, settle
        self.changed = asyncio.Event()
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._fd = -1
        self._dirs: dict[int, bytes] = {}
        self._settle_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise InotifyUnavailable(e, f"inotify_init1: {os.strerror(e)}")
        self._fd = fd
        try:
            self._add_tree(os.fsencode(self.root))
        except BaseException:
            self.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def close(self) -> None:
        if self._settle_handle is not None:
            self._settle_handle.cancel()
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _add_tree(self, top: bytes) -> None:
        for directory, subdirs, _files in os.walk(top):
            if _skip(os.fsdecode(directory)):
                subdirs.clear()
                continue
            wd = self._libc.inotify_add_watch(self._fd, directory, WATCH_MASK)
            if wd < 0:
                e = ctypes.get_errno()
                if e in (errno.ENOENT, errno.ENOTDIR):  # gone meanwhile: its parent saw it
                    continue
                raise InotifyUnavailable(e, f"inotify_add_watch {directory!r}: {os.strerror(e)}")
            self._dirs[wd] = directory

    def _readable(self) -> None:
        try:
            buf = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        relevant = False
        for wd, mask, name in parse_events(buf):
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            relevant = True
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and wd in self._dirs:
                # A new directory (maybe with files already in it): watch it too.
                try:
                    self._add_tree(os.path.join(self._dirs[wd], name))
                except OSError as e:
                    log.warning("flake watch: %s; polling still covers it", e)
        if relevant:
            self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        if self._settle_handle is not None:
            self._settle_handle.cancel()
        self._settle_handle = self._loop.call_later(self.settle, self.changed.set)
