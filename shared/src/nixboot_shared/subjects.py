"""Every NATS subject, stream and KV bucket name nixboot uses, in one place.

Subjects live under ``nixboot.``; a machine's MAC is one token written ``aa-bb-cc-dd-ee-ff``
(NATS tokens and KV keys cannot hold ``:``). Events that concern no single machine use the
token ``_``.
"""

from __future__ import annotations

import re

PREFIX = "nixboot"

# JetStream stream that keeps every event (replay, debugging, boot timelines).
EVENTS_STREAM = "NIXBOOT_EVENTS"
EVENTS_SUBJECTS = f"{PREFIX}.evt.>"

# Work queue of build requests: one builder instance takes each request; a crash redelivers it.
BUILDS_STREAM = "NIXBOOT_BUILDS"
BUILD_REQUESTS = f"{PREFIX}.build.request"
BUILDS_SUBJECTS = f"{BUILD_REQUESTS}.>"

# Live build logs and progress (core NATS: followers only, never replayed).
BUILD_LOG_PREFIX = f"{PREFIX}.buildlog"

# KV buckets: the state every service reads through watches.
KV_MACHINES = "nixboot-machines"  # key: mac token -> Machine
KV_GENERATIONS = "nixboot-generations"  # key: mac token -> MachineGenerations
# ... and this key (not a MAC token): the fallback configuration's generations, written by the
# builder when ``fallback_attr`` is set; what machines with no generations of their own boot.
FALLBACK_KEY = "fallback"
KV_LEASES = "nixboot-leases"  # key: mac token -> Lease;  key "ip.<a-b-c-d>" -> mac token
KV_BOOTS = "nixboot-boots"  # key: mac token -> current boot session

ALL_BUCKETS = (KV_MACHINES, KV_GENERATIONS, KV_LEASES, KV_BOOTS)

NO_MAC = "_"

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:\-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


class InvalidMac(ValueError):
    """A MAC address that is not six hex octets."""


def normalize_mac(mac: str) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for any of ``AA:BB..``, ``aa-bb-..``, ``aabbcc..``."""
    m = mac.strip().lower()
    if not _MAC_RE.match(m):
        raise InvalidMac(
            f"invalid MAC address {mac!r}: expected six hex octets like aa:bb:cc:dd:ee:ff"
        )
    digits = m.replace(":", "").replace("-", "")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def mac_token(mac: str | None) -> str:
    """The subject token / KV key of a MAC: ``aa-bb-cc-dd-ee-ff`` (``_`` for none)."""
    if mac is None:
        return NO_MAC
    return normalize_mac(mac).replace(":", "-")


def event_subject(kind: str, mac: str | None) -> str:
    """``nixboot.evt.<kind>.<mac-token>``; ``kind`` is the event's tag."""
    return f"{PREFIX}.evt.{kind}.{mac_token(mac)}"


def build_request_subject(attr: str) -> str:
    return f"{BUILD_REQUESTS}.{attr}"


def build_log_subject(build_id: str) -> str:
    return f"{BUILD_LOG_PREFIX}.{build_id}"


def ip_key(ip: str) -> str:
    """KV key of the IP -> MAC index in the leases bucket (dots are token separators)."""
    return "ip." + ip.replace(".", "-")


class InvalidPrefix(ValueError):
    """A replay prefix that is malformed or would reach the live subjects."""


_PREFIX_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_REPLAY_PREFIX = 64  # the prefix also names the replay's KV copies (bucket name limits)


def check_replay_prefix(prefix: str) -> str:
    """A replay prefix: dot-separated tokens, never under the live ``nixboot.`` subjects."""
    parts = prefix.split(".")
    if (
        not prefix
        or len(prefix) > MAX_REPLAY_PREFIX
        or not all(_PREFIX_TOKEN.match(p) for p in parts)
    ):
        raise InvalidPrefix(
            f"invalid replay prefix {prefix!r}: use up to {MAX_REPLAY_PREFIX} characters, "
            "tokens of [A-Za-z0-9_-] joined by ."
        )
    if parts[0] == PREFIX:
        raise InvalidPrefix(f"replay prefix {prefix!r} would reach live {PREFIX}. subjects")
    return prefix
