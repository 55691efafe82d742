"""A safe TFTP server built on tftpy.

tftpy 0.8.7 gives us the server object, per-transfer contexts (socket, client address, metrics),
the request parser and the state-machine contract (``state.handle(pkt) -> state | None``). What it
gets wrong for network boot is replaced by subclasses here, never by patching it:

- ``listen`` is rewritten: epoll instead of rebuilding a ``select`` list per packet, one bad packet
  never ends the loop (tftpy's dies on a ``struct.error``/``UnicodeDecodeError``), a bounded number
  of transfers, and per-transfer sockets bound to the listening address (tftpy binds 0.0.0.0).
- Requests go through ``names.safe_parts`` and ``files.RootDir`` (tftpy accepts absolute paths under
  the root and follows symlinks out of it); write requests get an access-violation error (tftpy
  accepts uploads by default).
- The sending state implements windowsize (RFC 7440) and timeout (RFC 2349), which tftpy lacks.
- Every transfer ends through one hook with (client, file, bytes, duration, result).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from tftpy.TftpContexts import TftpContextServer
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketRRQ, TftpPacketWRQ
from tftpy.TftpServer import TftpServer
from tftpy.TftpStates import TftpState

from nixboot_shared import metrics as shared_metrics
from nixboot_shared.events import FileKind, TransferResult
from nixboot_tftp import packets
from nixboot_tftp.files import AccessDenied, NotFound, RootDir, memory_file, to_netascii
from nixboot_tftp.names import BadName, file_kind, safe_parts
from nixboot_tftp.options import Negotiated, NegotiationError, negotiate

log = logging.getLogger(__name__)

Result = TransferResult

DEFAULT_TIMEOUT = 1.0  # seconds before a retransmit when the client chose no timeout
DEFAULT_RETRIES = 5
# A request not acknowledged at all (OACK or first block) is given up sooner: firmware answers in
# milliseconds, and half-open transfers must not hold slots.
HALF_OPEN_RETRIES = 3
NETASCII_LIMIT = 16 * 1024 * 1024
_RECV_BURST = 64  # datagrams taken from the listening socket per wake-up


class PortPermissionError(PermissionError):
    """Binding the TFTP port needs privileges."""


@dataclass
class Source:
    """What a name resolves to: an open file (real descriptor) and what to report about it."""

    file: BinaryIO
    kind: FileKind | None = None  # None: derived from the name
    mac: str | None = None
    info: Any = None  # opaque, handed back in the Transfer (e.g. the menu's boot id)


# A dynamic handler gets (validated name, client ip) and returns a Source, or None to fall back to
# the files under the root. It may raise NotFound / AccessDenied. It runs in the transfer loop:
# it must answer from memory, never wait on the network.
Handler = Callable[[str, str], Source | None]


@dataclass(frozen=True)
class Transfer:
    """One finished transfer, as the end hook sees it."""

    client: str
    port: int
    file: str
    kind: FileKind
    bytes: int
    seconds: float
    result: Result
    blksize: int = 512
    windowsize: int = 1
    mac: str | None = None
    info: Any = None
    detail: str = ""


EndHook = Callable[[Transfer], None]


class _Done(Exception):
    """Ends a transfer with a result (raised inside the session, caught by the loop)."""

    def __init__(self, result: Result, detail: str = "") -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


class SendState(TftpState):  # type: ignore[misc]
    """Sending a file: a window of blocks in flight, go-back-N on loss (RFC 7440).

    Blocks are numbered absolutely (1..last) and sent modulo 2^16 (rolling over to 0 like
    tftpd-hpa and iPXE). With windowsize 1 this is plain RFC 1350 lock-step, and a duplicate ACK is
    ignored (RFC 1123: answering duplicates causes Sorcerer's Apprentice syndrome). With a larger
    window, an ACK short of the last block sent means the client saw a gap: resend from there.
    """

    def __init__(self, context: Session, oack: bytes | None) -> None:
        super().__init__(context)
        self.ctx = context
        self.oack = oack  # sent and waiting for ACK 0; None once acknowledged (or never sent)
        self.acked = 0  # highest block acknowledged
        self.sent = 0  # highest block sent
        blksize = context.negotiated.blksize
        self.last = context.size // blksize + 1  # a short (possibly empty) block ends the file

    # tftpy's contract: handle() returns the next state, None when the transfer is complete.
    def handle(self, pkt: bytes, raddress: str, rport: int) -> SendState | None:
        op = packets.opcode(pkt)
        if op == packets.OP_ACK:
            return self._on_ack(packets.block_of(pkt))
        if op == packets.OP_ERROR:
            code = packets.block_of(pkt)
            # A client that read the tsize from the OACK and stops (UEFI firmware probes sizes
            # this way) aborts before any data: that is not a failure.
            raise _Done("aborted" if self.oack is not None else "error", f"client error {code}")
        self.ctx.send(packets.error(packets.ERR_ILLEGAL, "expected an ACK"))
        raise _Done("error", f"unexpected opcode {op} during a read")

    def start(self) -> None:
        if self.oack is not None:
            self.ctx.send(self.oack)
        else:
            self._fill_window()

    def _on_ack(self, block16: int) -> SendState | None:
        if self.oack is not None:
            if block16 != 0:
                return self  # stray; RFC 2347 wants ACK 0 for the OACK
            self.oack = None
            self.ctx.progressed()
            self._fill_window()
            return self
        delta = (block16 - self.acked) & 0xFFFF
        block = self.acked + delta
        if block > self.sent:
            return self  # an ACK for a block we never sent: stray or forged; ignore
        window = self.ctx.negotiated.windowsize
        if delta == 0:
            if window > 1 and self.acked < self.sent:
                self._go_back()  # repeated ACK with a window: the client lost the next block
            return self
        self.acked = block
        self.ctx.progressed()
        if block >= self.last:
            return None
        if block < self.sent and window > 1:
            self._go_back()
        else:
            self._fill_window()
        return self

    def _go_back(self) -> None:
        self.sent = self.acked
        self.ctx.metrics.dupcount += 1
        self._fill_window()

    def _fill_window(self) -> None:
        top = min(self.acked + self.ctx.negotiated.windowsize, self.last)
        while self.sent < top:
            self.sent += 1
            self.ctx.send_block(self.sent)

    def resendLast(self) -> None:
        if self.oack is not None:
            self.ctx.send(self.oack)
        else:
            self.sent = self.acked
            self._fill_window()

    def bytes_acked(self) -> int:
        return min(self.acked * self.ctx.negotiated.blksize, self.ctx.size)


class Session(TftpContextServer):  # type: ignore[misc]
    """One transfer: tftpy's server context with its socket bound to the listening address."""

    def __init__(
        self,
        host: str,
        port: int,
        localip: str,
        root: str,
        timeout: float,
        retries: int,
    ) -> None:
        # flock=False: we never write, and the descriptors we serve are ours alone.
        super().__init__(host, port, timeout, root, None, None, retries=retries, flock=False)
        self.sock.bind((localip, 0))
        self.sock.setblocking(False)
        self.tidport = port
        self.name = ""
        self.kind: FileKind = "other"
        self.negotiated = Negotiated()
        self.size = 0
        self.fd = -1
        self.source: Source | None = None
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.half_open = True
        self.metrics.start_time = time.time()

    # -- sending ------------------------------------------------------------------------------
    def send(self, datagram: bytes) -> None:
        try:
            self.sock.sendto(datagram, (self.host, self.tidport))
        except BlockingIOError:
            pass  # a full socket buffer is a lost packet; the timeout resends it
        except OSError as e:
            raise _Done("error", f"send failed: {e.strerror}") from None

    def send_block(self, block: int) -> None:
        blksize = self.negotiated.blksize
        data = os.pread(self.fd, blksize, (block - 1) * blksize)
        self.send(packets.data_header(block) + data)

    def progressed(self) -> None:
        self.half_open = False
        self.retry_count = 0
        self.deadline = time.monotonic() + self.timeout

    def set_source(self, source: Source, netascii: bool) -> None:
        if netascii:
            raw = source.file.read(NETASCII_LIMIT + 1)
            source.file.close()
            if len(raw) > NETASCII_LIMIT:
                raise _Done("denied", "file too large for netascii mode; use octet")
            source.file = memory_file(to_netascii(raw))
        self.source = source
        self.fileobj = source.file  # tftpy's end() closes it
        self.fd = source.file.fileno()
        self.size = os.fstat(self.fd).st_size
        if source.kind is not None:
            self.kind = source.kind

    def bytes_sent(self) -> int:
        state = self.state
        return state.bytes_acked() if isinstance(state, SendState) else 0


@dataclass
class ServerStats:
    busy: int = 0
    evicted: int = 0
    bad_packets: int = 0
    active: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class SafeTftpServer(TftpServer):  # type: ignore[misc]
    """Read-only TFTP server: files under ``root`` plus names answered by ``handler``."""

    def __init__(
        self,
        root: str,
        *,
        handler: Handler | None = None,
        on_end: EndHook | None = None,
        max_transfers: int = 256,
        max_blksize: int = 65464,
        default_timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        # tftpy checks the root exists and is a readable directory; uploads are refused below,
        # before tftpy's upload path could ever be reached.
        super().__init__(tftproot=root, dyn_file_func=None, upload_open=_refuse_upload, flock=False)
        self.files = RootDir(root)
        self.root = str(self.files.root)
        self.sock: socket.socket | None = None
        self.shutdown_gracefully: bool = False
        self.shutdown_immediately: bool = False
        self.handler = handler
        self.on_end = on_end
        self.max_transfers = max_transfers
        self.max_blksize = max_blksize
        self.default_timeout = default_timeout
        self.retries = retries
        self.sessions: dict[tuple[str, int], Session] = {}
        self.stats = ServerStats()
        self._factory = TftpPacketFactory()
        self._selector: selectors.BaseSelector | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def bind(self, listenip: str = "0.0.0.0", listenport: int = 69) -> tuple[str, int]:
        """Bind the listening socket (separately from ``listen`` so callers learn the port and
        see permission errors before the loop thread starts)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((listenip, listenport))
        except PermissionError:
            sock.close()
            raise PortPermissionError(
                f"cannot bind UDP port {listenport} on {listenip}: ports below 1024 need root "
                "or the CAP_NET_BIND_SERVICE capability (e.g. `setcap cap_net_bind_service=+ep` "
                "on the Python interpreter, or AmbientCapabilities=CAP_NET_BIND_SERVICE in the "
                "systemd unit); or set tftp.port / NIXBOOT_TFTP__PORT to a port above 1023"
            ) from None
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock = sock
        self.listenip, self.listenport = sock.getsockname()
        return self.listenip, self.listenport

    def listen(
        self,
        listenip: str = "0.0.0.0",
        listenport: int = 69,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> None:
        """Serve until ``stop()``. Binds first unless ``bind`` was called."""
        if timeout is not None:
            self.default_timeout = timeout
        if retries is not None:
            self.retries = retries
        if self.sock is None:
            self.bind(listenip, listenport)
        assert self.sock is not None
        listening = self.sock
        sel = selectors.DefaultSelector()
        self._selector = sel
        sel.register(listening, selectors.EVENT_READ, None)
        self.is_running.set()
        next_sweep = 0.0
        try:
            while not self.shutdown_immediately:
                if self.shutdown_gracefully and not self.sessions:
                    break
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        self._read_listening()
                    else:
                        self._read_session(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.02
        finally:
            for session in list(self.sessions.values()):
                self._finish(session, "error", "server stopped")
            sel.close()
            self._selector = None
            listening.close()
            self.sock = None
            self.is_running.clear()
            self.shutdown_gracefully = self.shutdown_immediately = False

    # -- the listening socket -------------------------------------------------------------------
    def _read_listening(self) -> None:
        assert self.sock is not None
        for _ in range(_RECV_BURST):
            try:
                data, (ip, port) = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP errors surfacing on the socket
                log.debug("recvfrom on the listening socket: %s", e)
                continue
            if self.shutdown_gracefully:
                continue
            try:
                self._request(data, ip, port)
            except Exception:  # never let one request end the loop
                log.exception("unexpected error handling a request from %s:%d", ip, port)
                self._bad("tftp-internal")

    def _bad(self, source: str = "tftp") -> None:
        self.stats.bad_packets += 1
        shared_metrics.BAD_INPUT.labels(source).inc()

    def _request(self, data: bytes, ip: str, port: int) -> None:
        op = packets.opcode(data)
        if op not in (packets.OP_RRQ, packets.OP_WRQ):
            self._bad()  # DATA/ACK/garbage to port 69 belongs to no transfer: drop it
            return
        if (ip, port) in self.sessions:
            return  # a retransmitted request: the session's own timer resends its answer
        try:
            pkt = self._factory.parse(data)
        except Exception:  # tftpy raises TftpException, struct.error, UnicodeDecodeError, ...
            self._bad()
            self._reply_once(ip, port, packets.error(packets.ERR_ILLEGAL, "malformed request"))
            return
        if len(self.sessions) >= self.max_transfers and not self._evict_half_open():
            self.stats.busy += 1
            self._reply_once(ip, port, packets.error(packets.ERR_UNDEFINED, "server busy, retry"))
            self._report(ip, port, str(pkt.filename or ""), "other", 0, 0.0, "error", "busy")
            return
        session = Session(ip, port, self.listenip, self.root, self.default_timeout, self.retries)
        self.sessions[(ip, port)] = session
        assert self._selector is not None
        self._selector.register(session.sock, selectors.EVENT_READ, session)
        self.stats.active = len(self.sessions)
        try:
            self._start(session, pkt)
        except _Done as done:
            self._finish(session, done.result, done.detail)
        except Exception as e:
            log.exception("request %r from %s failed", session.name, ip)
            session.send(packets.error(packets.ERR_UNDEFINED, "internal server error"))
            self._finish(session, "error", f"internal: {type(e).__name__}")

    def _reply_once(self, ip: str, port: int, datagram: bytes) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendto(datagram, (ip, port))

    def _evict_half_open(self) -> bool:
        """At capacity, make room by dropping the oldest transfer that never got an ACK: real
        firmware acknowledges within milliseconds, so these are dead or hostile."""
        candidates = [s for s in self.sessions.values() if s.half_open]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda s: s.started)
        self.stats.evicted += 1
        self._finish(oldest, "timeout", "evicted: never acknowledged, server at capacity")
        return True

    def _start(self, session: Session, pkt: Any) -> None:
        session.name = name = str(pkt.filename)
        session.kind = file_kind(name)
        session.file_to_transfer = name
        if isinstance(pkt, TftpPacketWRQ):
            session.send(packets.error(packets.ERR_ACCESS, "read-only server: uploads refused"))
            raise _Done("denied", "write request")
        assert isinstance(pkt, TftpPacketRRQ)
        mode = str(pkt.mode)
        if mode not in ("octet", "netascii"):
            session.send(packets.error(packets.ERR_ILLEGAL, f"unsupported mode {mode[:20]}"))
            raise _Done("error", "unsupported mode")
        try:
            parts = safe_parts(name)
        except BadName as e:
            session.send(packets.error(packets.ERR_ACCESS, str(e)))
            raise _Done("denied", str(e)) from None
        try:
            session.negotiated = negotiate(pkt.options, max_blksize=self.max_blksize)
        except NegotiationError as e:
            session.send(packets.error(packets.ERR_OPTIONS, str(e)))
            raise _Done("error", str(e)) from None
        if session.negotiated.timeout is not None:
            session.timeout = float(session.negotiated.timeout)
        session.options = dict(session.negotiated.accepted)
        try:
            source = self.handler(name, session.host) if self.handler else None
            if source is None:
                source = Source(self.files.open(parts))
            session.set_source(source, netascii=(mode == "netascii"))
        except NotFound as e:
            session.send(packets.error(packets.ERR_NOT_FOUND, "file not found"))
            raise _Done("not-found", str(e)) from None
        except (AccessDenied, BadName) as e:
            session.send(packets.error(packets.ERR_ACCESS, "access violation"))
            raise _Done("denied", str(e)) from None
        oack = None
        if session.negotiated.wants_oack:
            options = dict(session.negotiated.accepted)
            if "tsize" in options:
                options["tsize"] = str(session.size)
            oack = packets.oack(options)
        state = SendState(session, oack)
        session.state = state
        session.deadline = time.monotonic() + session.timeout
        state.start()

    # -- transfer sockets -----------------------------------------------------------------------
    def _read_session(self, session: Session) -> None:
        for _ in range(_RECV_BURST):
            if session.state is None:
                return
            try:
                data, addr = session.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                # ICMP port unreachable: the client is gone.
                self._finish(session, "error", "client unreachable")
                return
            except OSError as e:
                self._finish(session, "error", f"receive failed: {e.strerror}")
                return
            if addr != (session.host, session.tidport):
                # RFC 1350: a packet from another TID gets error 5; the transfer goes on.
                self._bad()
                with contextlib.suppress(OSError):
                    session.sock.sendto(
                        packets.error(packets.ERR_UNKNOWN_TID, "unknown transfer ID"), addr
                    )
                continue
            try:
                session.state = session.state.handle(data, addr[0], addr[1])
            except _Done as done:
                self._finish(session, done.result, done.detail)
                return
            except Exception as e:
                log.exception("transfer of %r to %s failed", session.name, session.host)
                self._finish(session, "error", f"internal: {type(e).__name__}")
                return
            if session.state is None:
                self._finish(session, "ok")
                return

    def _sweep(self, now: float) -> None:
        for session in [s for s in self.sessions.values() if s.deadline <= now]:
            session.retry_count += 1
            limit = HALF_OPEN_RETRIES if session.half_open else session.retries
            if session.retry_count > limit:
                self._finish(session, "timeout", f"no answer after {limit} retries")
                continue
            # Back off (x2, x4): a client that ignores duplicate blocks (atftp does) retransmits
            # its ACK only on its own timeout, so we must still be there when it does.
            # Half-open transfers (never acknowledged) get no back-off: they hold a slot.
            backoff = 1 if session.half_open else min(2**session.retry_count, 4)
            session.deadline = now + session.timeout * backoff
            try:
                if session.state is not None:
                    session.state.resendLast()
            except _Done as done:
                self._finish(session, done.result, done.detail)

    # -- the end of a transfer ------------------------------------------------------------------
    def _finish(self, session: Session, result: Result, detail: str = "") -> None:
        key = (session.host, session.port)
        if self.sessions.get(key) is not session:
            return
        del self.sessions[key]
        self.stats.active = len(self.sessions)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(session.sock)
        sent = session.size if result == "ok" else session.bytes_sent()
        try:
            session.end()  # tftpy: closes the socket and the file, computes its metrics
        except OSError as e:
            if e.errno != errno.EBADF:
                log.warning("closing transfer of %r: %s", session.name, e)
        source = session.source
        seconds = time.monotonic() - session.started
        self._report(
            session.host,
            session.port,
            session.name,
            session.kind,
            sent,
            seconds,
            result,
            detail,
            session.negotiated,
            source,
        )

    def _report(
        self,
        ip: str,
        port: int,
        name: str,
        kind: FileKind,
        sent: int,
        seconds: float,
        result: Result,
        detail: str = "",
        negotiated: Negotiated | None = None,
        source: Source | None = None,
    ) -> None:
        if result != "ok":
            log.info("tftp %s %s:%d %r: %s", result, ip, port, name[:100], detail)
        if self.on_end is None:
            return
        neg = negotiated or Negotiated()
        transfer = Transfer(
            client=ip,
            port=port,
            file=name,
            kind=kind,
            bytes=sent,
            seconds=seconds,
            result=result,
            blksize=neg.blksize,
            windowsize=neg.windowsize,
            mac=source.mac if source else None,
            info=source.info if source else None,
            detail=detail,
        )
        try:
            self.on_end(transfer)
        except Exception:  # a broken hook must not take the loop down
            log.exception("transfer end hook failed")


def _refuse_upload(path: str, context: Any) -> None:
    """tftpy's upload hook: returning None makes it answer 'access violation'."""
    return None
