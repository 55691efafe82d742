"""A small asyncio TFTP client (RFC 1350 + blksize/tsize/windowsize options) so one process can
run hundreds of concurrent fetches the way a room of PXE firmwares does."""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import cast

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


class TftpError(RuntimeError):
    pass


@dataclass
class Fetched:
    data: bytes
    seconds: float
    retransmits: int


class _Transfer(asyncio.DatagramProtocol):
    def __init__(self, blksize: int, windowsize: int) -> None:
        self.blksize = blksize
        self.windowsize = windowsize
        self.transport: asyncio.DatagramTransport | None = None
        self.server: tuple[str, int] | None = None
        self.blocks: dict[int, bytes] = {}
        self.last_block: int | None = None
        self.expected = 1
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.progress = asyncio.Event()
        self.last_sent = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self, packet: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.last_sent = packet
        self.transport.sendto(packet, addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done() or len(data) < 4:
            return
        if self.server is None:
            self.server = addr  # the server's transfer port (TID)
        elif addr != self.server:
            return
        opcode = struct.unpack("!H", data[:2])[0]
        if opcode == ERROR:
            msg = data[4:].split(b"\0", 1)[0].decode(errors="replace")
            self.done.set_exception(TftpError(f"error {struct.unpack('!H', data[2:4])[0]}: {msg}"))
            self.progress.set()
        elif opcode == OACK:
            opts = data[2:].split(b"\0")
            negotiated = dict(zip(opts[0::2], opts[1::2], strict=False))
            self.blksize = int(negotiated.get(b"blksize", b"512"))
            self.windowsize = int(negotiated.get(b"windowsize", b"1"))
            self.send(struct.pack("!HH", ACK, 0), addr)
            self.progress.set()
        elif opcode == DATA:
            block = struct.unpack("!H", data[2:4])[0]
            payload = data[4:]
            if block == self.expected % 65536:
                self.blocks[self.expected] = payload
                self.expected += 1
                if len(payload) < self.blksize:
                    self.last_block = self.expected - 1
                    self.send(struct.pack("!HH", ACK, block), addr)
                    self.done.set_result(None)
                elif (self.expected - 1) % self.windowsize == 0:
                    self.send(struct.pack("!HH", ACK, block), addr)
                self.progress.set()
            else:  # out of order or duplicate: re-ack what we have, the server resends after it
                self.send(struct.pack("!HH", ACK, (self.expected - 1) % 65536), addr)


async def fetch(
    host: str,
    port: int,
    filename: str,
    *,
    blksize: int = 1468,
    tsize: bool = True,
    windowsize: int = 1,
    timeout: float = 1.0,
    retries: int = 5,
) -> Fetched:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    options = b""
    if blksize != 512:
        options += b"blksize\0%d\0" % blksize
    if tsize:
        options += b"tsize\0" + b"0\0"
    if windowsize > 1:
        options += b"windowsize\0%d\0" % windowsize
    rrq = struct.pack("!H", RRQ) + filename.encode() + b"\0octet\0" + options
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Transfer(blksize if options else 512, 1), local_addr=("127.0.0.1", 0)
    )
    retransmits = 0
    silent = 0  # timeouts in a row: like firmware, give up on silence, not on a lossy link
    try:
        proto.send(rrq, (host, port))
        while not proto.done.done():
            proto.progress.clear()
            try:
                await asyncio.wait_for(proto.progress.wait(), timeout)
                silent = 0
            except TimeoutError:
                retransmits += 1
                silent += 1
                if silent > retries:
                    raise TftpError(f"timeout fetching {filename}") from None
                proto.send(proto.last_sent, proto.server or (host, port))
        await proto.done
    finally:
        transport.close()
    data = b"".join(proto.blocks[i] for i in sorted(proto.blocks))
    return Fetched(data, time.perf_counter() - start, retransmits)
