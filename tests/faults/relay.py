"""A lossy, delaying relay for UDP (TFTP, with its per-transfer ports) and TCP (HTTP): this
kernel has no `tc netem`, so the impairment lives in user space between clients and services.

    python relay.py --udp LPORT:TPORT --tcp LPORT:TPORT [--loss 0.05] [--delay 0.05]

UDP: each datagram, in either direction, is dropped with probability ``loss`` and otherwise
delivered ``delay`` seconds later. TFTP answers from a new port per transfer (its TID): the relay
gives every (client, server port) pair its own client-facing socket, so the client sees the
relay's ports change the way the server's would.
TCP cannot lose bytes above the kernel; a lost segment shows as a retransmission stall, so each
chunk is delayed by ``delay`` and, with probability ``loss``, by a further 200 ms (Linux's minimum
RTO), order kept. Counts go to stdout at SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from typing import Any

RTO = 0.2
LOCAL = "127.0.0.1"


_tasks: set[asyncio.Future[None]] = set()


def spawn(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class Stats:
    udp_sent = 0
    udp_dropped = 0
    tcp_chunks = 0
    tcp_stalled = 0


class Impair:
    def __init__(self, loss: float, delay: float, seed: int) -> None:
        self.loss, self.delay, self.rng = loss, delay, random.Random(seed)

    def later(self, send: Any, *args: Any) -> None:
        if self.rng.random() < self.loss:
            Stats.udp_dropped += 1
            return
        Stats.udp_sent += 1
        asyncio.get_running_loop().call_later(self.delay, send, *args)


class Upstream(asyncio.DatagramProtocol):
    """One per client address: talks to the server, fans answers out by server port."""

    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None
        self.facing: dict[int, asyncio.DatagramTransport] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        spawn(self._deliver(data, addr[1]))

    async def _deliver(self, data: bytes, server_port: int) -> None:
        facing = self.facing.get(server_port)
        if facing is None:
            if server_port == self.relay.target:
                facing = self.relay.transport
            else:  # a transfer port: a relay port of its own, tied to this client
                loop = asyncio.get_running_loop()
                facing, _ = await loop.create_datagram_endpoint(
                    lambda: Facing(self, server_port), local_addr=(LOCAL, 0)
                )
            assert facing is not None
            self.facing[server_port] = facing
        self.relay.impair.later(facing.sendto, data, self.client)

    def to_server(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.relay.impair.later(self.transport.sendto, data, (LOCAL, port))


class Facing(asyncio.DatagramProtocol):
    def __init__(self, up: Upstream, server_port: int) -> None:
        self.up, self.server_port = up, server_port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.up.to_server(data, self.server_port)


class UdpRelay(asyncio.DatagramProtocol):
    def __init__(self, target: int, impair: Impair) -> None:
        self.target, self.impair = target, impair
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[tuple[str, int], Upstream] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        spawn(self._forward(data, addr))

    async def _forward(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self.clients.get(addr)
        if up is None:
            loop = asyncio.get_running_loop()
            up = Upstream(self, addr)
            self.clients[addr] = up
            await loop.create_datagram_endpoint(lambda: up, local_addr=(LOCAL, 0))
        up.to_server(data, self.target)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, imp: Impair) -> None:
    """Copy with delay; chunks keep their order (each waits for the one before it)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def sender() -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()

    task = asyncio.ensure_future(sender())
    last_due = 0.0
    try:
        while True:
            chunk = await reader.read(65536)
            due = loop.time() + imp.delay
            if chunk and imp.rng.random() < imp.loss:
                Stats.tcp_stalled += 1
                due += RTO
            Stats.tcp_chunks += 1
            last_due = max(last_due, due)
            queue.put_nowait((last_due, chunk))
            if not chunk:
                break
        await task
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--udp", action="append", default=[])
    ap.add_argument("--tcp", action="append", default=[])
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    imp = Impair(args.loss, args.delay, args.seed)
    loop = asyncio.get_running_loop()
    for spec in args.udp:
        lport, tport = (int(x) for x in spec.split(":"))
        await loop.create_datagram_endpoint(
            lambda t=tport: UdpRelay(t, imp), local_addr=(LOCAL, lport)
        )
    for spec in args.tcp:
        lport, tport = (int(x) for x in spec.split(":"))

        async def on_client(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, t: int = tport
        ) -> None:
            try:
                ur, uw = await asyncio.open_connection(LOCAL, t)
            except OSError:
                w.close()
                return
            await asyncio.gather(pipe(r, uw, imp), pipe(ur, w, imp))

        await asyncio.start_server(on_client, LOCAL, lport, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    print(
        f"udp_sent={Stats.udp_sent} udp_dropped={Stats.udp_dropped} "
        f"tcp_chunks={Stats.tcp_chunks} tcp_stalled={Stats.tcp_stalled}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
