"""TFTP option negotiation: blksize (RFC 2348), tsize and timeout (RFC 2349), windowsize (RFC 7440).

Pure functions, no I/O. Option names are case-insensitive (RFC 2347). Unknown options are ignored
(left out of the OACK), as RFC 2347 says. A known option with a value outside its RFC range is
refused with error 8 rather than silently changed, so a broken client sees why; a value above what
this server allows is lowered to its maximum, which the RFCs permit the server to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464  # RFC 2348: largest block that fits one UDP datagram over IPv4
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535  # RFC 7440 range 1..65535
SERVER_MAX_WINDOWSIZE = 64  # what we grant: bounds a transfer's burst and its go-back resend
MIN_TIMEOUT = 1
MAX_TIMEOUT = 255


class NegotiationError(ValueError):
    """A known option with a value outside its RFC range (TFTP error 8)."""


@dataclass(frozen=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: int | None = None  # seconds, when the client chose one
    tsize: bool = False  # the client asked for the transfer size
    # Options to acknowledge in the OACK, in a stable order; tsize's value is filled in later.
    accepted: dict[str, str] = field(default_factory=dict)

    @property
    def wants_oack(self) -> bool:
        return bool(self.accepted)


def _int(name: str, raw: str, lo: int, hi: int | None) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise NegotiationError(f"{name} value {raw[:20]!r} is not a number") from None
    if value < lo or (hi is not None and value > hi):
        top = "" if hi is None else f"..{hi}"
        raise NegotiationError(f"{name} {value} is outside {lo}{top}")
    return value


def negotiate(
    requested: Mapping[str, str],
    *,
    max_blksize: int = MAX_BLKSIZE,
    max_windowsize: int = SERVER_MAX_WINDOWSIZE,
) -> Negotiated:
    """Decide the options of a read request; raise ``NegotiationError`` for invalid values."""
    wanted = {k.lower(): v for k, v in requested.items()}
    blksize, windowsize, timeout, tsize = DEFAULT_BLKSIZE, 1, None, False
    accepted: dict[str, str] = {}
    if "blksize" in wanted:
        blksize = min(_int("blksize", wanted["blksize"], MIN_BLKSIZE, None), max_blksize)
        accepted["blksize"] = str(blksize)
    if "tsize" in wanted:
        _int("tsize", wanted["tsize"], 0, None)
        tsize = True
        accepted["tsize"] = "0"
    if "timeout" in wanted:
        timeout = _int("timeout", wanted["timeout"], MIN_TIMEOUT, MAX_TIMEOUT)
        accepted["timeout"] = str(timeout)
    if "windowsize" in wanted:
        windowsize = min(
            _int("windowsize", wanted["windowsize"], 1, MAX_WINDOWSIZE), max_windowsize
        )
        accepted["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, tsize, accepted)
