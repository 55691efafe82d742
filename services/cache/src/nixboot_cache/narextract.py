"""Reading one entry out of a NAR stream (the inverse of ``nar.dump`` for a single path).

Pure: works on a ``read(n)`` callable (a zstd stream reader over a cached file, or bytes) and
writes file contents to a ``sink``. A cache filled from an upstream has no store to read kernels
from: it takes them out of the NARs it has verified against their signed NarHash.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

Read = Callable[[int], bytes]
Sink = Callable[[bytes], object]

MAX_TOKEN = 4096  # names, symlink targets and keywords; file contents are streamed
CHUNK = 1 << 20


class BadNar(ValueError):
    """The stream is not a well-formed NAR."""


class NotInNar(LookupError):
    """The NAR has no entry at the requested path."""


@dataclass(frozen=True)
class Entry:
    kind: str  # "regular", "symlink" or "directory"
    target: str = ""  # symlinks
    at: str = ""  # where the entry is (a symlink may be met above the requested path)
    rest: str = ""  # what of the requested path lies below that symlink
    size: int = 0  # regular files: bytes written to the sink
    executable: bool = False


class _Reader:
    def __init__(self, read: Read) -> None:
        self._read = read

    def exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self._read(n - len(out))
            if not got:
                raise BadNar("NAR ends early")
            out += got
        return out

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.exact(8))[0]
        return value

    def token(self) -> bytes:
        n = self.u64()
        if n > MAX_TOKEN:
            raise BadNar(f"token of {n} bytes")
        data = self.exact(n + (-n) % 8)
        return data[:n]

    def expect(self, *words: bytes) -> None:
        for w in words:
            got = self.token()
            if got != w:
                raise BadNar(f"expected {w!r}, got {got[:40]!r}")

    def contents(self, sink: Sink | None) -> int:
        size = self.u64()
        left = size
        while left:
            chunk = self._read(min(CHUNK, left))
            if not chunk:
                raise BadNar("NAR ends inside a file")
            left -= len(chunk)
            if sink is not None:
                sink(chunk)
        self.exact((-size) % 8)
        return size


def extract(read: Read, rel: str, sink: Sink) -> Entry:
    """The entry at ``rel`` ("" for the root, else ``a/b`` below it); a regular file's contents go
    to ``sink``. Reading stops at the entry: the rest of the NAR is not parsed."""
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise NotInNar(f"{rel!r}: '.' and '..' are not NAR names")
    r = _Reader(read)
    r.expect(b"nix-archive-1")
    found = _node(r, parts, sink, [])
    if found is None:
        raise NotInNar(f"no entry {rel!r} in the NAR")
    return found


def _node(r: _Reader, want: list[str] | None, sink: Sink, at: list[str]) -> Entry | None:
    """Parse one node; ``want`` is the path still to descend (None: skipping this node)."""
    r.expect(b"(", b"type")
    kind = r.token()
    here = want is not None and not want
    if kind == b"regular":
        executable = False
        tok = r.token()
        if tok == b"executable":
            r.expect(b"")
            executable = True
            tok = r.token()
        if tok != b"contents":
            raise BadNar(f"expected 'contents', got {tok[:40]!r}")
        size = r.contents(sink if here else None)
        r.expect(b")")
        return Entry("regular", size=size, executable=executable, at="/".join(at)) if here else None
    if kind == b"symlink":
        r.expect(b"target")
        target = r.token().decode("utf-8", "surrogateescape")
        r.expect(b")")
        if want is None:
            return None
        # Also when the requested path continues below the symlink: the caller resolves it.
        return Entry("symlink", target=target, at="/".join(at), rest="/".join(want))
    if kind != b"directory":
        raise BadNar(f"unknown node type {kind[:40]!r}")
    if here:
        return Entry("directory")
    while True:
        tok = r.token()
        if tok == b")":
            return None
        if tok != b"entry":
            raise BadNar(f"expected 'entry', got {tok[:40]!r}")
        r.expect(b"(", b"name")
        name = r.token().decode("utf-8", "surrogateescape")
        r.expect(b"node")
        if want and name == want[0]:
            return _node(r, want[1:], sink, [*at, name])  # nothing after it matters
        _node(r, None, sink, at)
        r.expect(b")")
