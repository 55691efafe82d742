"""The few TFTP packets the server writes itself (RFC 1350, 2347), as pure functions.

Requests (RRQ/WRQ with options) are parsed by tftpy's packet factory; DATA and ERROR are built here
because tftpy's ERROR packet cannot carry our own message and its DATA path costs a dozen logging
calls per block.
"""

from __future__ import annotations

import struct

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_OPTIONS = 8

_HEADER = struct.Struct("!HH")


def data_header(block: int) -> bytes:
    return _HEADER.pack(OP_DATA, block & 0xFFFF)


def error(code: int, message: str) -> bytes:
    text = message.encode("ascii", "replace")[:200]
    return _HEADER.pack(OP_ERROR, code) + text + b"\0"


def oack(options: dict[str, str]) -> bytes:
    body = b"".join(
        k.encode("ascii") + b"\0" + v.encode("ascii") + b"\0" for k, v in options.items()
    )
    return struct.pack("!H", OP_OACK) + body


def opcode(packet: bytes) -> int | None:
    return _HEADER.unpack_from(packet)[0] if len(packet) >= 4 else None


def block_of(packet: bytes) -> int:
    """The block number of an ACK/DATA packet (caller checked ``len >= 4``)."""
    return int(_HEADER.unpack_from(packet)[1])
