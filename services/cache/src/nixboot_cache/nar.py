"""NAR (Nix ARchive) serialisation of a store path, streamed in chunks.

Format: every token is ``str(s)`` = u64 little-endian length, the bytes, zero padding to 8.
Archive = ``str("nix-archive-1")`` + node; directory entries sorted by raw name bytes; a regular
file is executable when its owner execute bit is set (the only mode bit Nix keeps).
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator

CHUNK = 1 << 20
_PAD = b"\0" * 8


class UnsupportedFile(ValueError):
    """A file type NAR cannot represent (device, socket, fifo)."""


def _str(data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return struct.pack("<Q", len(data)) + data + _PAD[:pad]


_OPEN = _str(b"(")
_CLOSE = _str(b")")
_TYPE = _str(b"type")


def _regular(path: bytes, size: int, executable: bool) -> Iterator[bytes]:
    head = _OPEN + _TYPE + _str(b"regular")
    if executable:
        head += _str(b"executable") + _str(b"")
    yield head + _str(b"contents") + struct.pack("<Q", size)
    remaining = size
    with open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                # The file shrank while we read it: a NAR with a wrong length would be corrupt.
                raise OSError(f"{path.decode(errors='replace')}: file changed while reading")
            remaining -= len(chunk)
            yield chunk
    yield _PAD[: (-size) % 8] + _CLOSE


def _node(path: bytes) -> Iterator[bytes]:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        yield from _regular(path, st.st_size, bool(st.st_mode & stat.S_IXUSR))
    elif stat.S_ISLNK(st.st_mode):
        yield _OPEN + _TYPE + _str(b"symlink") + _str(b"target") + _str(os.readlink(path)) + _CLOSE
    elif stat.S_ISDIR(st.st_mode):
        yield _OPEN + _TYPE + _str(b"directory")
        for name in sorted(os.listdir(path)):
            yield _str(b"entry") + _OPEN + _str(b"name") + _str(name) + _str(b"node")
            yield from _node(os.path.join(path, name))
            yield _CLOSE
        yield _CLOSE
    else:
        raise UnsupportedFile(f"{path.decode(errors='replace')}: not a file, symlink or directory")


def dump(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The NAR of ``path`` as a stream of byte chunks (small tokens are merged; file contents
    come in chunks of at most ``CHUNK`` bytes, so memory stays bounded)."""
    pending = _str(b"nix-archive-1")
    for piece in _node(os.fsencode(path)):
        if len(pending) + len(piece) < 64 * 1024:
            pending += piece
        else:
            if pending:
                yield pending
            pending = piece
    if pending:
        yield pending
