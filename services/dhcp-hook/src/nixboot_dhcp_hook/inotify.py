"""Linux inotify on one directory, through ctypes: which files were closed after writing.

Why not a library: we need one watch and one event type; inotify_simple would be a dependency for
~40 lines, and asyncinotify brings its own task model. The fd is non-blocking; the caller polls it
from the event loop (``loop.add_reader``) and calls ``read_names`` when it is readable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_CLOSE_WRITE = 0x00000008
IN_Q_OVERFLOW = 0x00004000  # events were lost: rescan the directory
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class DirWatch:
    """``inotify_init1`` + ``inotify_add_watch(path, mask)``; raises OSError when unavailable."""

    def __init__(self, path: str, mask: int = IN_CLOSE_WRITE) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask)) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.fd = fd

    def read_names(self) -> tuple[list[str], bool]:
        """Names of the files with events since the last call, and whether the kernel's queue
        overflowed (some events lost)."""
        names: list[str] = []
        overflow = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return names, overflow
            pos = 0
            while pos + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, pos)
                pos += _EVENT.size
                raw = data[pos : pos + length].rstrip(b"\0")
                pos += length
                if mask & IN_Q_OVERFLOW:
                    overflow = True
                elif raw:
                    names.append(os.fsdecode(raw))

    def close(self) -> None:
        os.close(self.fd)
