"""TFTP file names: what a client may ask for, and what kind of file it is.

Pure functions, no I/O. A name is accepted only as a plain relative path of ordinary components:
no absolute paths, no ``.``/``..``, no empty components, no backslashes (Windows-style clients and
path tricks), no control characters. Symlinks are a filesystem matter and checked where files are
opened (``files.RootDir``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nixboot_shared.events import FileKind
from nixboot_shared.subjects import InvalidMac, normalize_mac

MAX_NAME_LENGTH = 512

# Boot programs nixboot ships into the TFTP root (see bootprograms.py).
BOOT_PROGRAM_SUFFIXES = (".0", ".c32", ".efi", ".kpxe", ".kkpxe", ".pxe", ".lkrn")

MENU_DIR = "pxelinux.cfg"
BOOT_DIR = "boot"


class BadName(ValueError):
    """A requested name that is not a safe relative path inside the TFTP root."""


def safe_parts(name: str) -> tuple[str, ...]:
    """Split a requested name into path components, refusing every way out of the root."""
    if not name:
        raise BadName("empty file name")
    if len(name) > MAX_NAME_LENGTH:
        raise BadName(f"file name longer than {MAX_NAME_LENGTH} characters")
    if "\\" in name:
        raise BadName("backslashes are not allowed in file names")
    if name.startswith("/"):
        raise BadName("absolute paths are not allowed; names are relative to the TFTP root")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadName("control characters are not allowed in file names")
    parts = tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise BadName(f"path component {part!r} is not allowed")
    return parts


def file_kind(name: str) -> FileKind:
    """The bounded label of a name for metrics and events (never the name itself)."""
    if name.startswith(MENU_DIR + "/"):
        return "menu"
    if name.startswith(BOOT_DIR + "/"):
        if name.endswith("/kernel"):
            return "kernel"
        if name.endswith("/initrd"):
            return "initrd"
        return "other"
    if name.endswith(BOOT_PROGRAM_SUFFIXES):
        return "boot-program"
    return "other"


@dataclass(frozen=True)
class MenuName:
    """What a ``pxelinux.cfg/...`` name asks for."""

    by: Literal["mac", "ip", "default", "other"]
    mac: str | None = None  # normalized, for by="mac"
    ip_hex: str | None = None  # upper-case hex prefix, for by="ip"


_HEX_IP = re.compile(r"^[0-9A-Fa-f]{1,8}$")


def parse_menu_name(rest: str) -> MenuName:
    """Parse what follows ``pxelinux.cfg/``: ``01-<mac>`` (ARP type 1 = Ethernet), a hex IP
    address or a prefix of one (pxelinux tries ``0A000002``, ``0A00000``, ... ``0``), ``default``.
    Everything else (UUIDs, other hardware types) is ``other``."""
    if rest.startswith("01-") and len(rest) == 20:
        try:
            return MenuName(by="mac", mac=normalize_mac(rest[3:]))
        except InvalidMac:
            return MenuName(by="other")
    if _HEX_IP.match(rest):
        return MenuName(by="ip", ip_hex=rest.upper())
    if rest == "default":
        return MenuName(by="default")
    return MenuName(by="other")


def ip_to_hex(ip: str) -> str:
    """``10.0.0.2`` -> ``0A000002`` (pxelinux's spelling of an IPv4 address)."""
    octets = ip.split(".")
    if len(octets) != 4:
        raise ValueError(f"not an IPv4 address: {ip!r}")
    values = [int(o) for o in octets]
    if any(not 0 <= v <= 255 for v in values):
        raise ValueError(f"not an IPv4 address: {ip!r}")
    return "".join(f"{v:02X}" for v in values)


def hex_to_ip(hex8: str) -> str:
    """``0A000002`` -> ``10.0.0.2``; exactly eight hex digits."""
    if len(hex8) != 8 or not _HEX_IP.match(hex8):
        raise ValueError(f"not a hex IPv4 address: {hex8!r}")
    return ".".join(str(int(hex8[i : i + 2], 16)) for i in range(0, 8, 2))
