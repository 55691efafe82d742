"""The Python hook command (deploy/dhcp/nixboot-dhcp-hook-python.sh). The default hook is the POSIX
sh one, deploy/dhcp/nixboot-dhcp-hook.sh (~1 ms instead of ~9 ms: no interpreter start); this one
stays for hosts that prefer it, and the service accepts both.

The command a DHCP server runs on every lease change: hand the call to the dhcp-hook service and
exit, fast, whatever happens.

dnsmasq serialises its script calls and ISC dhcpd's ``execute`` blocks the server, so this must
return within milliseconds even when the service or NATS is down. It therefore does no parsing (the
service parses, counts and logs bad input) and imports only the standard library's C-level modules:
it captures argv, the DHCP server's variables and the time, sends that as one datagram to the
service's unix socket, and when that fails writes it atomically to the spool directory, which the
service drains. It always exits 0: a failed hook must never fail a lease.

Start it as ``python3 -S -I /path/to/hook.py`` (no site-packages scan: ~8 ms here instead of ~40 ms
for the venv's console script); see deploy/dhcp/nixboot-dhcp-hook-python.sh. Where to send is
taken from leading options ``--state-dir DIR``, ``--socket PATH``, ``--spool-dir DIR`` (Kea passes
no environment to its scripts, so the wrapper passes them), else ``NIXBOOT_DHCP_HOOK__SOCKET``,
``NIXBOOT_DHCP_HOOK__SPOOL_DIR``, ``NIXBOOT_STATE_DIR``, else the same defaults as the service.
"""

from __future__ import annotations

import os
import sys
import time

# Variables DHCP servers set for their scripts (dnsmasq: DNSMASQ_*; Kea: unprefixed families).
ENV_PREFIXES = (
    "DNSMASQ_",
    "LEASE4_",
    "LEASES4_",
    "DELETED_LEASES4_",
    "QUERY4_",
    "SUBNET4_",
    "PKT4_",
)
OPTIONS = ("--state-dir", "--socket", "--spool-dir")
ENV_PREFIXES_B = tuple(p.encode() for p in ENV_PREFIXES)
SPOOL_SUFFIX = ".lease"
MAGIC = b"nixboot-dhcp-hook/1"
# Last field of a datagram whose call is also in the spool: the spool file's name.
SPOOLED_KEY = b"NIXBOOT_SPOOLED="


def default_state_dir(env: dict[str, str] | os._Environ[str]) -> str:
    """Same rule as nixboot_shared.config.default_state_dir (kept apart: no imports here)."""
    if os.geteuid() == 0:
        return "/var/lib/nixboot"
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "/"), ".local", "state")
    return os.path.join(base, "nixboot")


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``--option value`` pairs for the hook itself; the rest is the DHCP server's call."""
    opts: dict[str, str] = {}
    i = 0
    while i + 1 < len(argv) and argv[i] in OPTIONS:
        opts[argv[i]] = argv[i + 1]
        i += 2
    return opts, argv[i:]


def destinations(opts: dict[str, str], env: dict[str, str] | os._Environ[str]) -> tuple[str, str]:
    state = opts.get("--state-dir") or env.get("NIXBOOT_STATE_DIR") or default_state_dir(env)
    sock = (
        opts.get("--socket")
        or env.get("NIXBOOT_DHCP_HOOK__SOCKET")
        or os.path.join(state, "dhcp-hook.sock")
    )
    spool = (
        opts.get("--spool-dir")
        or env.get("NIXBOOT_DHCP_HOOK__SPOOL_DIR")
        or os.path.join(state, "spool")
    )
    return sock, spool


def capture(argv: list[str], environ: dict[bytes, bytes] | os._Environ[bytes], now: float) -> bytes:
    """The wire format: NUL-separated fields, ``MAGIC ts argc argv... KEY=VALUE...``. Arguments and
    environment strings are C strings, so they cannot hold NUL: no escaping, any byte survives, and
    no json import (~5 ms here)."""
    picked = [k + b"=" + v for k, v in environ.items() if k.startswith(ENV_PREFIXES_B)]
    fields = [MAGIC, repr(now).encode(), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    return b"\0".join(fields + picked)


def send(payload: bytes, sock_path: str) -> None:
    """One datagram; raises OSError when nobody listens or the service's queue is full."""
    import _socket  # the C module: `socket` pulls in enum/selectors (~10 ms)

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        s.setblocking(False)  # a full receive queue must not stall the DHCP server
        s.sendto(payload, sock_path)
    finally:
        s.close()


def spool(payload: bytes, spool_dir: str, now: float) -> str:
    """Write atomically (temp file + rename): the service never reads half a file. The name sorts
    by time so the service replays in order."""
    os.makedirs(spool_dir, mode=0o770, exist_ok=True)
    name = f"{now:017.6f}-{os.getpid()}-{os.urandom(4).hex()}"
    tmp = os.path.join(spool_dir, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        # No fsync: it cost up to ~0.8 s under disk contention (bench), and the DHCP server waits
        # for us. A crash of the whole host can lose the last seconds of spool; the rename still
        # guarantees the service never reads a partial file, and dnsmasq replays its leases
        # (`old`) at start.
        os.write(fd, payload)
    finally:
        os.close(fd)
    final = os.path.join(spool_dir, name + SPOOL_SUFFIX)
    os.rename(tmp, final)
    return final


def log(message: str) -> None:
    """stderr (dnsmasq and ISC dhcpd log it) and syslog (Kea discards the script's output)."""
    try:
        sys.stderr.write(f"nixboot-dhcp-hook: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass
    try:
        import syslog

        syslog.openlog("nixboot-dhcp-hook", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, message)
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    """Deliver one hook call; always 0."""
    now = time.time()
    try:
        opts, call = split_options(list(sys.argv[1:] if argv is None else argv))
        sock_path, spool_dir = destinations(opts, os.environ)
        payload = capture(call, os.environb, now)
        # Spool first, then tell the service: a datagram it took but had not recorded when it
        # was killed would be lost (measured: tests/faults, SIGKILL mid-storm). The service
        # deletes the file once the change is recorded; otherwise its drain delivers it.
        try:
            where = spool(payload, spool_dir, now)
        except OSError as e:
            where = ""
            log(f"cannot spool to {spool_dir} ({e.strerror}): sending only")
        trailer = b"\0" + SPOOLED_KEY + os.path.basename(where).encode() if where else b""
        try:
            send(payload + trailer, sock_path)
            return 0
        except OSError as e:
            sent_error = e
        if not where:
            raise sent_error
        log(f"service not reachable at {sock_path} ({sent_error.strerror}); spooled to {where}")
    except BaseException as e:  # never fail the DHCP server, whatever went wrong
        log(f"lease change lost: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
