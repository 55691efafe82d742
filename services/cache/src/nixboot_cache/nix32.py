"""Nix's base32 ("nix32"): its own alphabet and bit order, not RFC 4648.

Characters are emitted from the highest 5-bit group down, so the text is the little-endian hash
read backwards; every store path hash and every ``sha256:`` in a narinfo uses it.
"""

from __future__ import annotations

import re

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


class InvalidNix32(ValueError):
    """Text that is not nix32 of the expected length."""


def encoded_length(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    n = len(data)
    out = []
    for k in range(encoded_length(n) - 1, -1, -1):
        b = k * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < n:
            c |= data[i + 1] << (8 - j)
        out.append(ALPHABET[c & 31])
    return "".join(out)


def decode(text: str, nbytes: int) -> bytes:
    """Inverse of ``encode`` for a hash of ``nbytes`` bytes; rejects wrong length, characters and
    set bits beyond the hash (so each hash has exactly one spelling)."""
    if len(text) != encoded_length(nbytes):
        raise InvalidNix32(f"expected {encoded_length(nbytes)} nix32 characters, got {len(text)}")
    out = bytearray(nbytes)
    for pos, ch in enumerate(text):
        digit = _INDEX.get(ch)
        if digit is None:
            raise InvalidNix32(f"invalid nix32 character {ch!r}")
        b = (len(text) - 1 - pos) * 5
        i, j = divmod(b, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < nbytes:
            out[i + 1] |= carry
        elif carry:
            raise InvalidNix32("nix32 text has bits beyond the hash length")
    return bytes(out)


def is_store_hash(text: str) -> bool:
    """A 32-character store path hash (20 bytes) in nix32."""
    return len(text) == 32 and all(c in _INDEX for c in text)


# 52 characters carry 260 bits for sha256's 256: the 4 bits beyond the hash are the top 4 of the
# first character (it is emitted first, from the highest group), so it must be "0" or "1" —
# the only check ``decode`` adds to the alphabet and length. A regex does it in ~0.3 µs where
# decoding took ~10 µs on every NAR request (tests/cache/test_protocol.py checks they agree).
_SHA256 = re.compile(f"[01][{ALPHABET}]{{51}}")


def is_sha256(text: str) -> bool:
    """A 52-character nix32 sha256 (one that ``decode(text, 32)`` accepts)."""
    return len(text) == 52 and _SHA256.fullmatch(text) is not None
