"""File objects the TFTP server sends: files under the root, and in-memory content.

Every source is a real file descriptor, because tftpy (and our sender) need more than ``read``:
tftpy locks files with ``fcntl.flock`` and reads ``.name`` at session end, which is why returning
``io.BytesIO`` from a tftpy ``dyn_file_func`` crashes its server loop. In-memory content (rendered
menus) therefore lives in an anonymous ``memfd``: seekable, lockable, with a descriptor we can
``pread`` at any offset for retransmits.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from nixboot_tftp.names import BadName


class NotFound(LookupError):
    """The name does not exist (TFTP error 1)."""


class AccessDenied(PermissionError):
    """The name exists but may not be served (TFTP error 2)."""


def memory_file(data: bytes, name: str = "nixboot-memory") -> BinaryIO:
    """A read-only-by-convention, seekable file holding ``data``, positioned at 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.lseek(fd, 0, os.SEEK_SET)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def to_netascii(data: bytes) -> bytes:
    """RFC 764 netascii: CR -> CR NUL, LF -> CR LF (CR first, so inserted CRs stay alone)."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading without following a final symlink and without blocking on
    FIFOs or devices (which would stall the single transfer loop)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AccessDenied("not a regular file")
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


class RootDir:
    """Files under one directory. A name that resolves (through symlinks) outside it is refused."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(root))
        if not self.root.is_dir():
            raise NotADirectoryError(f"TFTP root {root} is not a directory")
        # Kept for tests that check nothing outside the root is ever opened.
        self.opener = open_regular

    def resolve(self, parts: tuple[str, ...]) -> Path:
        """The real path of a validated name; ``AccessDenied`` if it leads out of the root."""
        if not parts or any(p in ("", ".", "..") or "/" in p for p in parts):
            raise BadName("invalid path components")
        real = Path(os.path.realpath(self.root.joinpath(*parts)))
        if real == self.root or self.root not in real.parents:
            raise AccessDenied("the name resolves outside the TFTP root")
        return real

    def open(self, parts: tuple[str, ...]) -> BinaryIO:
        real = self.resolve(parts)
        try:
            return self.opener(real)
        except FileNotFoundError:
            raise NotFound("no such file") from None
        except (IsADirectoryError, NotADirectoryError):
            raise NotFound("no such file") from None
        except PermissionError:
            raise AccessDenied("file is not readable by the server") from None
        except OSError as e:
            raise AccessDenied(f"cannot open: {e.strerror}") from None
