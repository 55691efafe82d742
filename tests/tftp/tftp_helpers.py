"""Helpers for the TFTP tests: a raw packet client (to see error codes and options exactly), the
real clients (tftp-hpa, atftp, curl) as subprocesses, a lossy UDP relay, and a threaded server."""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nixboot_shared.records import Generation
from nixboot_tftp.server import SafeTftpServer, Transfer


def rrq(name: str | bytes, mode: str = "octet", **options: str) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    body = raw + b"\0" + mode.encode() + b"\0"
    for k, v in options.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return struct.pack("!H", 1) + body


def wrq(name: str) -> bytes:
    return struct.pack("!H", 2) + name.encode() + b"\0octet\0"


def parse_oack(pkt: bytes) -> dict[str, str]:
    fields = pkt[2:].split(b"\0")[:-1]
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


@dataclass
class RawResult:
    data: bytes = b""
    error: tuple[int, str] | None = None
    oack: dict[str, str] | None = None
    packets: int = 0


def raw_get(
    port: int,
    name: str | bytes,
    *,
    host: str = "127.0.0.1",
    wait: float = 3.0,
    windowsize_ack: int = 1,
    **options: str,
) -> RawResult:
    """Fetch with a minimal client that ACKs every ``windowsize_ack``-th block (and the last):
    enough to see exactly what the server sends, including errors and OACKs."""
    res = RawResult()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(rrq(name, **options), (host, port))
        blksize = 512
        expect = 1
        peer = None
        chunks: list[bytes] = []
        while True:
            pkt, addr = s.recvfrom(70000)
            res.packets += 1
            peer = peer or addr
            op = struct.unpack("!H", pkt[:2])[0]
            if op == 5:
                code = struct.unpack("!H", pkt[2:4])[0]
                res.error = (code, pkt[4:].rstrip(b"\0").decode(errors="replace"))
                return res
            if op == 6:
                res.oack = parse_oack(pkt)
                blksize = int(res.oack.get("blksize", "512"))
                s.sendto(struct.pack("!HH", 4, 0), peer)
                continue
            assert op == 3, f"unexpected opcode {op}"
            block = struct.unpack("!H", pkt[2:4])[0]
            if block != expect & 0xFFFF:
                continue
            chunks.append(pkt[4:])
            last = len(pkt) - 4 < blksize
            if last or expect % windowsize_ack == 0:
                s.sendto(struct.pack("!HH", 4, block), peer)
            expect += 1
            if last:
                res.data = b"".join(chunks)
                return res


def tftp_hpa(
    port: int, name: str, out: Path, mode: str = "binary"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tftp", "-m", mode, "127.0.0.1", str(port), "-c", "get", name, str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def atftp(
    port: int, name: str, out: Path, *options: str, host: str = "127.0.0.1", timeout: int = 5
) -> subprocess.CompletedProcess[str]:
    cmd = ["atftp", "--tftp-timeout", str(timeout), "-g", "-r", name, "-l", str(out)]
    for opt in options:
        cmd += ["--option", opt]
    return subprocess.run([*cmd, host, str(port)], capture_output=True, text=True, timeout=60)


def curl(port: int, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args, f"tftp://127.0.0.1:{port}/{name}"],
        capture_output=True,
        timeout=30,
    )


@dataclass
class RunningServer:
    server: SafeTftpServer
    port: int
    transfers: list[Transfer] = field(default_factory=list)
    thread: threading.Thread | None = None

    def wait_transfers(self, n: int, timeout: float = 10.0) -> list[Transfer]:
        deadline = time.monotonic() + timeout
        while len(self.transfers) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.transfers)


@contextlib.contextmanager
def running_server(root: Path, **kwargs: object) -> Iterator[RunningServer]:
    server = SafeTftpServer(str(root), **kwargs)  # type: ignore[arg-type]
    run = RunningServer(server, 0)
    server.on_end = run.transfers.append
    _, run.port = server.bind("127.0.0.1", 0)
    run.thread = threading.Thread(target=server.listen, daemon=True)
    run.thread.start()
    server.is_running.wait(5)
    try:
        yield run
    finally:
        server.stop(now=True)
        run.thread.join(5)
        assert not run.thread.is_alive(), "server loop did not stop"


class LossyRelay:
    """A UDP relay between a TFTP client and server that drops a fraction of the datagrams in both
    directions. TFTP changes ports after the request (transfer IDs), so the relay mirrors each
    server-side port with a relay-side one."""

    def __init__(self, server_port: int, loss: float, seed: int = 7) -> None:
        self.server = ("127.0.0.1", server_port)
        self.loss = loss
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.main = self._sock()
        self.port = self.main.getsockname()[1]
        self.sel.register(self.main, selectors.EVENT_READ, ("main", None))
        self.upstream: dict[tuple[str, int], socket.socket] = {}  # client -> socket to server
        self.mirrors: dict[tuple[str, int], socket.socket] = {}  # server tid -> socket to client
        self.dropped = 0
        self.forwarded = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        return s

    def _forward(self, sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        self.forwarded += 1
        sock.sendto(data, dest)

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.05):
                role, info = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data, addr = sock.recvfrom(70000)
                if role == "main":  # a request from a client
                    up = self.upstream.get(addr)
                    if up is None:
                        up = self.upstream[addr] = self._sock()
                        self.sel.register(up, selectors.EVENT_READ, ("up", addr))
                    self._forward(up, data, self.server)
                elif role == "up":  # from the server's transfer port to the client
                    mirror = self.mirrors.get(addr)
                    if mirror is None:
                        mirror = self.mirrors[addr] = self._sock()
                        self.sel.register(mirror, selectors.EVENT_READ, ("mirror", (info, addr)))
                    self._forward(mirror, data, info)
                else:  # from the client to the server's transfer port
                    client, server_tid = info
                    self._forward(self.upstream[client], data, server_tid)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for s in [self.main, *self.upstream.values(), *self.mirrors.values()]:
            s.close()
        self.sel.close()


def gen(n: int, created: float = 0.0) -> Generation:
    h = f"{n:032d}"
    return Generation(
        number=n,
        toplevel=f"/nix/store/{h}-nixos-system-demo-{n}",
        kernel=f"/nix/store/{h}-linux/bzImage",
        initrd=f"/nix/store/{h}-initrd/initrd",
        kernel_params="console=ttyS0",
        init=f"/nix/store/{h}-nixos-system-demo-{n}/init",
        created=created or 1_700_000_000 + n * 3600,
    )
