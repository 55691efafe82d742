"""Turn what a DHCP server tells its lease script into one normalised lease change. Pure: no I/O.

Three dialects, each seen on the real servers (Debian 12: dnsmasq 2.89, Kea 2.2, ISC dhcpd 4.4):

- dnsmasq ``--dhcp-script``: ``add|old|del <mac> <ip> [hostname]`` with ``DNSMASQ_*`` variables
  (``DNSMASQ_VENDOR_CLASS``, ``DNSMASQ_USER_CLASS0``, ``DNSMASQ_TAGS``, ``DNSMASQ_LEASE_EXPIRES``,
  ``DNSMASQ_TIME_REMAINING``, ``DNSMASQ_SUPPLIED_HOSTNAME``). No variable carries option 93: our
  dnsmasq.conf sets ``nb-arch-<code>`` tags with ``dhcp-match``; the vendor class is the fallback.
- Kea ``libdhcp_run_script.so``: one argument, the hook point, and *only* unprefixed variables
  (``LEASE4_ADDRESS``, ``LEASE4_HWADDR``, ``LEASE4_CLTT``, ``LEASES4_AT0_*``, ``QUERY4_CIADDR``...;
  no ``KEA_`` prefix, no inherited environment). Kea exports no client options, so a Kea lease has
  no architecture, vendor or user class.
- ISC dhcpd ``execute()``: our own argument list, see deploy/dhcp/isc-dhcpd.conf:
  ``isc commit <mac> <ip> <hostname> <vendor-class> <user-class> <arch> <lease-secs> <ciaddr>``,
  ``isc release|expiry <mac> <ip>``. ``binary-to-ascii`` drops leading zeros (``52:54:0:12:..``).

``server_ts`` is the DHCP server's clock in whole seconds (dnsmasq: expires - remaining; Kea: the
lease's CLTT) or, when the server gives none, the hook's clock truncated to seconds: the hook runs
on the server's host at the moment of the change. Whole seconds on purpose: a retransmitted request
handled in the same second yields the same event id and is stored once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from nixboot_shared.events import Arch, LeaseKind
from nixboot_shared.subjects import InvalidMac, normalize_mac

Source = Literal["dnsmasq", "kea", "isc", "http"]

# Client system architecture (DHCP option 93), RFC 4578 and the IANA registry.
ARCH_BY_CODE: dict[int, Arch] = {
    0: "bios",
    6: "uefi-ia32",
    7: "uefi-x64",
    9: "uefi-x64",  # EFI x86-64 as some firmware (and early iPXE) reports it
    11: "uefi-arm64",
}
ARCHES: frozenset[str] = frozenset(get_args(Arch))
KINDS: frozenset[str] = frozenset(get_args(LeaseKind))

_VENDOR_ARCH_RE = re.compile(r"^PXEClient:Arch:(\d{5})(?::|$)")
_TAG_ARCH_RE = re.compile(r"^nb-arch-(\d{1,5})$")
_MAX_TEXT = 255  # DHCP options are at most 255 bytes: longer text is not from a DHCP server


class BadLease(ValueError):
    """Hook input that does not describe a lease change; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class LeaseChange:
    source: Source
    kind: LeaseKind
    mac: str  # aa:bb:cc:dd:ee:ff
    ip: str
    server_ts: float
    ts: float  # when the hook (or HTTP request) saw it: tie-break within one server second
    hostname: str | None = None
    expires: float | None = None
    arch: Arch = "unknown"
    user_class: str | None = None
    vendor_class: str | None = None
    # dnsmasq knows this lease from its lease file (``old`` with DNSMASQ_DATA_MISSING: the client's
    # options are not in the file). Set on its start-up replay of the file and, as dnsmasq 2.90
    # does it, on the client's renewals of such a lease too.
    from_lease_file: bool = False


def arch_from_code(code: int | str | None) -> Arch:
    if code is None or code == "":
        return "unknown"
    try:
        return ARCH_BY_CODE.get(int(code), "unknown")
    except ValueError:
        raise BadLease(f"client architecture {code!r} is not a number") from None


def arch_from_vendor_class(vendor_class: str | None) -> Arch:
    """``PXEClient:Arch:00007:UNDI:003016`` -> uefi-x64; anything else -> unknown."""
    if not vendor_class:
        return "unknown"
    m = _VENDOR_ARCH_RE.match(vendor_class)
    return arch_from_code(int(m.group(1))) if m else "unknown"


def check_ip(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip.strip()))
    except ValueError:
        raise BadLease(f"IP address {ip!r} is not an IPv4 address") from None


def check_mac(mac: str, *, lenient_octets: bool = False) -> str:
    """Normalise a MAC. ``lenient_octets``: accept ISC's ``52:54:0:12:34:56`` (no zero padding)."""
    if lenient_octets and ":" in mac:
        parts = mac.strip().split(":")
        if len(parts) == 6 and all(1 <= len(p) <= 2 for p in parts):
            mac = ":".join(p.zfill(2) for p in parts)
    try:
        return normalize_mac(mac)
    except InvalidMac as e:
        raise BadLease(str(e)) from None


def _text(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise BadLease(f"{what} {value[:40]!r}... is not printable text of at most {_MAX_TEXT}")
    return value


def _number(value: str | None, what: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        n = float(value)
    except ValueError:
        raise BadLease(f"{what} {value!r} is not a number") from None
    if not math.isfinite(n) or n < 0:
        raise BadLease(f"{what} {value!r} is not a non-negative number")
    return n


def _whole_second(ts: float) -> float:
    return float(math.floor(ts))


# dnsmasq actions that are no lease change: init (lease database dump), tftp (file sent),
# arp/arp-add/arp-del (neighbour seen), relay-snoop (DHCPv6 prefix via a relay).
DNSMASQ_IGNORED = frozenset({"init", "tftp", "arp", "arp-add", "arp-old", "arp-del", "relay-snoop"})
DNSMASQ_KINDS: dict[str, LeaseKind] = {"add": "new", "old": "renew", "del": "release"}


def parse_dnsmasq(argv: Sequence[str], env: Mapping[str, str], now: float) -> list[LeaseChange]:
    action = argv[0]
    if action in DNSMASQ_IGNORED:
        return []
    if action not in DNSMASQ_KINDS:
        raise BadLease(f"dnsmasq action {action!r} is not add, old or del")
    if len(argv) not in (3, 4):
        raise BadLease(
            f"dnsmasq {action}: expected <mac> <ip> [hostname], got {len(argv) - 1} args"
        )
    mac = check_mac(argv[1])
    ip = check_ip(argv[2])
    expires = _number(env.get("DNSMASQ_LEASE_EXPIRES"), "DNSMASQ_LEASE_EXPIRES")
    remaining = _number(env.get("DNSMASQ_TIME_REMAINING"), "DNSMASQ_TIME_REMAINING")
    kind = DNSMASQ_KINDS[action]
    # `del` is both release and expiry; a released lease still has time left.
    if kind == "release" and expires is not None and 0 < expires <= now:
        kind = "expire"
    server_ts = expires - remaining if expires and remaining is not None else _whole_second(now)
    arch: Arch = "unknown"
    for tag in env.get("DNSMASQ_TAGS", "").split():
        m = _TAG_ARCH_RE.match(tag)
        if m:
            arch = arch_from_code(m.group(1))
            break
    vendor_class = _text(env.get("DNSMASQ_VENDOR_CLASS"), "vendor class")
    if arch == "unknown":
        arch = arch_from_vendor_class(vendor_class)
    hostname = argv[3] if len(argv) == 4 else env.get("DNSMASQ_SUPPLIED_HOSTNAME")
    return [
        LeaseChange(
            source="dnsmasq",
            kind=kind,
            mac=mac,
            ip=ip,
            server_ts=server_ts,
            ts=now,
            hostname=_text(hostname, "hostname"),
            expires=expires or None,  # 0: an infinite lease
            arch=arch,
            user_class=_text(env.get("DNSMASQ_USER_CLASS0"), "user class"),
            vendor_class=vendor_class,
            from_lease_file=action == "old" and bool(env.get("DNSMASQ_DATA_MISSING")),
        )
    ]


# Kea hook points. lease4_renew is followed by leases4_committed for the same request (seen on
# Kea 2.2): only the commit counts, renewal told apart by ciaddr (RFC 2131: set when RENEWING or
# REBINDING). leases4_committed also lists released leases as DELETED_*: lease4_release covers them.
KEA_IGNORED = frozenset({"lease4_renew", "lease4_recover", "lease4_decline"})


def _kea_lease(
    env: Mapping[str, str], prefix: str, kind: LeaseKind, now: float, *, cltt_is_time: bool
) -> LeaseChange:
    hw = env.get(prefix + "HWADDR")
    addr = env.get(prefix + "ADDRESS")
    if not hw or not addr:
        raise BadLease(f"kea: {prefix}HWADDR and {prefix}ADDRESS are required")
    cltt = _number(env.get(prefix + "CLTT"), prefix + "CLTT")
    lifetime = _number(env.get(prefix + "VALID_LIFETIME"), prefix + "VALID_LIFETIME")
    return LeaseChange(
        source="kea",
        kind=kind,
        mac=check_mac(hw),
        ip=check_ip(addr),
        # The CLTT is when Kea handled the request; releases and expiries keep the old CLTT.
        server_ts=cltt if cltt_is_time and cltt is not None else _whole_second(now),
        ts=now,
        hostname=_text(env.get(prefix + "HOSTNAME"), "hostname"),
        expires=cltt + lifetime if cltt is not None and lifetime else None,
    )


def parse_kea(argv: Sequence[str], env: Mapping[str, str], now: float) -> list[LeaseChange]:
    point = argv[0]
    if point in KEA_IGNORED or point.startswith(("lease6_", "leases6_")):
        return []
    if point == "leases4_committed":
        size = _number(env.get("LEASES4_SIZE", "0"), "LEASES4_SIZE") or 0
        ciaddr = env.get("QUERY4_CIADDR", "0.0.0.0")
        kind: LeaseKind = "renew" if ciaddr not in ("", "0.0.0.0") else "new"
        return [
            _kea_lease(env, f"LEASES4_AT{i}_", kind, now, cltt_is_time=True)
            for i in range(int(size))
        ]
    if point == "lease4_release":
        return [_kea_lease(env, "LEASE4_", "release", now, cltt_is_time=False)]
    if point == "lease4_expire":
        return [_kea_lease(env, "LEASE4_", "expire", now, cltt_is_time=False)]
    raise BadLease(f"kea hook point {point!r} is not one nixboot knows")


ISC_KINDS: dict[str, LeaseKind] = {"commit": "new", "release": "release", "expiry": "expire"}


def parse_isc(argv: Sequence[str], now: float) -> list[LeaseChange]:
    if len(argv) < 4 or argv[1] not in ISC_KINDS:
        raise BadLease("isc: expected `isc commit|release|expiry <mac> <ip> ...` (isc-dhcpd.conf)")
    kind = ISC_KINDS[argv[1]]
    extra = list(argv[4:]) + [""] * 6
    hostname, vendor_class, user_class, arch_code, lease_secs, ciaddr = extra[:6]
    if kind == "new" and ciaddr not in ("", "0.0.0.0"):
        kind = "renew"
    vendor = _text(vendor_class, "vendor class")
    arch = arch_from_code(arch_code) if arch_code else arch_from_vendor_class(vendor)
    secs = _number(lease_secs, "lease time")
    server_ts = _whole_second(now)
    return [
        LeaseChange(
            source="isc",
            kind=kind,
            mac=check_mac(argv[2], lenient_octets=True),
            ip=check_ip(argv[3]),
            server_ts=server_ts,
            ts=now,
            hostname=_text(hostname, "hostname"),
            expires=server_ts + secs if secs else None,
            arch=arch,
            user_class=_text(user_class, "user class"),
            vendor_class=vendor,
        )
    ]


def parse_hook(argv: Sequence[str], env: Mapping[str, str], now: float) -> list[LeaseChange]:
    """Parse one hook call (arguments after the program name). An empty list: a call that is no
    lease change (dnsmasq ``tftp``, Kea ``lease4_renew``...). Raise ``BadLease`` on bad input."""
    if not argv:
        raise BadLease("hook called without arguments")
    first = argv[0]
    if first == "isc":
        return parse_isc(argv, now)
    if first.startswith(("lease4_", "leases4_", "lease6_", "leases6_")):
        return parse_kea(argv, env, now)
    if first in DNSMASQ_KINDS or first in DNSMASQ_IGNORED:
        return parse_dnsmasq(argv, env, now)
    raise BadLease(
        f"unrecognised hook call {first[:40]!r}: not dnsmasq, Kea or isc (see deploy/dhcp)"
    )


def from_fields(
    *,
    mac: str,
    ip: str,
    kind: str,
    now: float,
    hostname: str | None = None,
    expires: float | None = None,
    arch: str = "unknown",
    user_class: str | None = None,
    vendor_class: str | None = None,
    server_ts: float | None = None,
) -> LeaseChange:
    """The HTTP payload (already typed) as a lease change, with the same checks as the hook."""
    if kind not in KINDS:
        raise BadLease(f"kind {kind!r} is not one of {sorted(KINDS)}")
    if arch not in ARCHES:
        raise BadLease(f"arch {arch!r} is not one of {sorted(ARCHES)}")
    for what, value in (("expires", expires), ("server_ts", server_ts)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise BadLease(f"{what} {value!r} is not a non-negative number")
    vendor = _text(vendor_class, "vendor class")
    return LeaseChange(
        source="http",
        kind=kind,  # type: ignore[arg-type]  # checked against KINDS above
        mac=check_mac(mac),
        ip=check_ip(ip),
        server_ts=server_ts if server_ts is not None else _whole_second(now),
        ts=now,
        hostname=_text(hostname, "hostname"),
        expires=expires,
        arch=arch if arch != "unknown" else arch_from_vendor_class(vendor),  # type: ignore[arg-type]
        user_class=_text(user_class, "user class"),
        vendor_class=vendor,
    )


def change_id(change: LeaseChange) -> str:
    """Deterministic event id: the same lease change told twice (DHCP retransmit in the same second,
    a spooled copy re-delivered, an HTTP retry) gets the same ``Nats-Msg-Id`` and is stored once."""
    key = f"{change.mac}|{change.ip}|{change.kind}|{change.server_ts:.3f}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def order_key(change: LeaseChange) -> tuple[float, float]:
    """How lease changes of one MAC are ordered: the server's clock, then the hook's."""
    return (change.server_ts, change.ts)


HOOK_MAGIC = b"nixboot-dhcp-hook/1"  # hook.MAGIC (hook.py imports nothing of ours)


@dataclass(frozen=True, slots=True)
class HookCall:
    ts: float
    argv: list[str]
    env: dict[str, str]


def decode_hook_payload(payload: bytes) -> HookCall:
    """Read what hook.capture wrote: ``MAGIC ts argc argv... KEY=VALUE...``, NUL-separated."""
    fields = payload.split(b"\0")
    if len(fields) < 3 or fields[0] != HOOK_MAGIC:
        raise BadLease(f"not a nixboot hook payload ({len(payload)} bytes: {payload[:24]!r}...)")
    try:
        text = [f.decode("utf-8") for f in fields[1:]]
    except UnicodeDecodeError as e:
        raise BadLease(f"hook payload is not UTF-8: {e}") from None
    ts = _number(text[0], "hook timestamp")
    argc = _number(text[1], "hook argument count")
    if ts is None or argc is None or argc != int(argc) or 2 + argc > len(text):
        raise BadLease("hook payload header is damaged")
    argv = text[2 : 2 + int(argc)]
    env: dict[str, str] = {}
    for item in text[2 + int(argc) :]:
        key, eq, value = item.partition("=")
        if not eq:
            raise BadLease(f"hook payload environment entry {item[:40]!r} has no '='")
        env[key] = value
    return HookCall(ts=ts, argv=argv, env=env)


SH_MAGIC = b"nixboot-dhcp-hook/sh1"  # deploy/dhcp/nixboot-dhcp-hook.sh
SH_END = b"nixboot-dhcp-hook/end\n"
# What dash and busybox ash print for `export -p`: export NAME='v'"'"'alue' (a quote inside a
# value closes the quotes, adds "'" and reopens them): one regex. Other shells (bash: double
# quotes, $'...' for control characters) go through a small shell-word splitter, slower.
_EXPORT_LINE_RE = re.compile(r"export ([A-Za-z_][A-Za-z0-9_]*)=((?:'[^']*'|\"'\"|\\')*)\n")
_EXPORT_PIECE_RE = re.compile(r"'([^']*)'|\"(')\"|\\(')")


class IncompleteHookFile(BadLease):
    """A sh hook file without its end marker: still being written, or its writer died."""


def is_sh_payload(payload: bytes) -> bool:
    return payload.startswith(SH_MAGIC + b"\0")


def _exported(text: str, prefixes: tuple[str, ...]) -> dict[str, str]:
    """The variables in ``export -p`` output whose names start with one of ``prefixes``."""
    env: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _EXPORT_LINE_RE.match(text, pos)
        if m is None:
            return _exported_general(text[pos:], prefixes, env)
        pos = m.end()
        if m[1].startswith(prefixes):
            env[m[1]] = "".join(a or b or c for a, b, c in _EXPORT_PIECE_RE.findall(m[2]))
    return env


_ANSI_C = {"a": 7, "b": 8, "e": 27, "E": 27, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
_ANSI_C_NUM_RE = re.compile(r"[0-7]{1,3}|x[0-9A-Fa-f]{1,2}|u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8}")


def _ansi_c(text: str, i: int, out: bytearray) -> int:
    """bash's ``$'...'`` from just after the opening quote; returns the index after the closing
    one. Octal and hex escapes are bytes (bash writes UTF-8 text that way), \\u code points."""
    while i < len(text):
        ch = text[i]
        if ch == "'":
            return i + 1
        if ch != "\\" or i + 1 == len(text):
            out += ch.encode()
            i += 1
            continue
        esc = text[i + 1]
        num = _ANSI_C_NUM_RE.match(text, i + 1)
        if esc in _ANSI_C:
            out.append(_ANSI_C[esc])
            i += 2
        elif num is not None:
            digits = num[0]
            if digits[0] in "uU":
                out += chr(min(int(digits[1:], 16), 0x10FFFF)).encode(errors="replace")
            elif digits[0] == "x":
                out.append(int(digits[1:], 16))
            else:
                out.append(int(digits, 8) & 0xFF)
            i = num.end()
        elif esc == "c" and i + 2 < len(text):
            out.append(ord(text[i + 2]) & 0x1F)
            i += 3
        else:  # \\ \' \" \? and unknown escapes: the character itself
            out += esc.encode()
            i += 2
    raise BadLease("sh hook file: unterminated $'...' in the environment")


def _shell_words(text: str) -> list[str]:
    """Split ``export -p`` / ``declare -x`` output as a shell would: blanks separate words; a word
    joins plain characters, \\-escapes, '...', "..." and bash's $'...'."""
    words: list[str] = []
    cur = bytearray()
    in_word = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in " \t\n":
            if in_word:
                words.append(cur.decode(errors="replace"))
                cur, in_word = bytearray(), False
            i += 1
            continue
        in_word = True
        if ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise BadLease("sh hook file: unterminated '...' in the environment")
            cur += text[i + 1 : end].encode()
            i = end + 1
        elif ch == "$" and text.startswith("$'", i):
            i = _ansi_c(text, i + 2, cur)
        elif ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '"\\$`\n':
                    if text[i + 1] != "\n":  # backslash-newline: a line continuation
                        cur += text[i + 1].encode()
                    i += 2
                else:
                    cur += text[i].encode()
                    i += 1
            if i >= len(text):
                raise BadLease('sh hook file: unterminated "..." in the environment')
            i += 1
        elif ch == "\\" and i + 1 < len(text):
            if text[i + 1] != "\n":
                cur += text[i + 1].encode()
            i += 2
        else:
            cur += ch.encode()
            i += 1
    if in_word:
        words.append(cur.decode(errors="replace"))
    return words


def _exported_general(text: str, prefixes: tuple[str, ...], env: dict[str, str]) -> dict[str, str]:
    for word in _shell_words(text):
        if word in ("export", "declare", "typeset", "-x", "-r", "-rx", "readonly"):
            continue
        key, eq, value = word.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise BadLease(f"sh hook file: environment entry {word[:40]!r} is not NAME=VALUE")
        if eq and key.startswith(prefixes):
            env[key] = value
    return env


def decode_sh_payload(payload: bytes, ts: float, prefixes: tuple[str, ...]) -> HookCall:
    """Read what nixboot-dhcp-hook.sh wrote: ``SH_MAGIC argc argv... <export -p> SH_END``,
    NUL-separated; ``ts`` is the file's mtime (the shell has no clock without a fork)."""
    fields = payload.split(b"\0")
    if fields[0] != SH_MAGIC:
        raise BadLease(f"not a nixboot sh hook file ({len(payload)} bytes: {payload[:24]!r}...)")
    if fields[-1] != SH_END:
        raise IncompleteHookFile(f"sh hook file has no end marker ({len(payload)} bytes)")
    try:
        text = [f.decode("utf-8") for f in fields[1:-1]]
    except UnicodeDecodeError as e:
        raise BadLease(f"hook payload is not UTF-8: {e}") from None
    argc = _number(text[0], "hook argument count") if text else None
    if argc is None or argc != int(argc) or len(text) != int(argc) + 2:
        raise BadLease("sh hook file header is damaged")
    return HookCall(ts=ts, argv=text[1 : 1 + int(argc)], env=_exported(text[-1], prefixes))
