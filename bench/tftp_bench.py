"""TFTP benchmark: nixboot's server vs Debian's tftpd-hpa on the same files, in one run.

  .venv/bin/python bench/tftp_bench.py [--rounds 3]

1. 200 concurrent fetches of a 70 KB boot program (blksize 1468 + tsize, as PXE firmware asks).
2. A 1 MB EFI program at blksize 1468, windowsize 1 vs 4 (tftpd-hpa has no windowsize: it is shown
   at windowsize 1 only).
3. Menu render p50/p99 over 10,000 renders for a machine with 10 generations.

Both servers run as separate processes on 127.0.0.1 (tftpd-hpa in foreground mode, `-L`, on a free
port); the client is one process driving every transfer with non-blocking sockets, so both servers
face the same client.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_CODE = """
import sys
from nixboot_tftp.server import SafeTftpServer
s = SafeTftpServer(sys.argv[1], max_transfers=1024)
s.bind("127.0.0.1", int(sys.argv[2]))
print("ready", flush=True)
s.listen()
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fetch:
    def __init__(self, port: int, name: str, blksize: int, window: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        opts = {"blksize": str(blksize), "tsize": "0"}
        if window > 1:
            opts["windowsize"] = str(window)
        body = name.encode() + b"\0octet\0"
        body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in opts.items())
        self.request = struct.pack("!H", 1) + body
        self.server = ("127.0.0.1", port)
        self.peer: tuple[str, int] | None = None
        self.blksize = 512
        self.window = 1
        self.expect = 1
        self.size = 0
        self.done = False
        self.last_ack = 0
        self.last_rx = time.monotonic()
        self.sock.sendto(self.request, self.server)

    def ack(self, block: int) -> None:
        assert self.peer is not None
        self.last_ack = block
        self.sock.sendto(struct.pack("!HH", 4, block & 0xFFFF), self.peer)

    def on_packet(self, pkt: bytes, addr: tuple[str, int]) -> None:
        self.last_rx = time.monotonic()
        self.peer = self.peer or addr
        op = struct.unpack_from("!H", pkt)[0]
        if op == 6:
            f = pkt[2:].split(b"\0")[:-1]
            opts = {f[i].decode(): f[i + 1].decode() for i in range(0, len(f), 2)}
            self.blksize = int(opts.get("blksize", 512))
            self.window = int(opts.get("windowsize", 1))
            self.ack(0)
        elif op == 3:
            block = struct.unpack_from("!H", pkt, 2)[0]
            if block != self.expect & 0xFFFF:
                if self.window > 1:
                    self.ack(self.expect - 1)  # RFC 7440: tell the sender where the gap is
                return
            self.size += len(pkt) - 4
            last = len(pkt) - 4 < self.blksize
            if last or self.expect % self.window == 0:
                self.ack(self.expect)
            self.expect += 1
            if last:
                self.done = True
        elif op == 5:
            raise RuntimeError(f"server error: {pkt[4:-1]!r}")

    def on_timeout(self) -> None:
        if self.peer is None:
            self.sock.sendto(self.request, self.server)
        else:
            self.ack(self.expect - 1)
        self.last_rx = time.monotonic()


def fetch_many(port: int, name: str, n: int, blksize: int, window: int = 1) -> tuple[float, int]:
    sel = selectors.DefaultSelector()
    started = time.perf_counter()
    fetches = [Fetch(port, name, blksize, window) for _ in range(n)]
    for f in fetches:
        sel.register(f.sock, selectors.EVENT_READ, f)
    pending = n
    while pending:
        for key, _ in sel.select(0.2):
            f = key.data
            while not f.done:
                try:
                    pkt, addr = f.sock.recvfrom(70000)
                except BlockingIOError:
                    break
                f.on_packet(pkt, addr)
            if f.done:
                sel.unregister(f.sock)
                f.sock.close()
                pending -= 1
        now = time.monotonic()
        for f in fetches:
            if not f.done and now - f.last_rx > 1.0:
                f.on_timeout()
    elapsed = time.perf_counter() - started
    sel.close()
    return elapsed, sum(f.size for f in fetches)


def start(cmd: list[str], ready_line: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if ready_line:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    else:
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"tftpd-hpa exited: {proc.stderr.read() if proc.stderr else ''}")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def menu_render_bench(n: int = 10_000) -> tuple[float, float, float, float]:
    from nixboot_shared.records import Generation, Machine, MachineGenerations
    from nixboot_tftp.content import MenuSettings, TftpContent
    from nixboot_tftp.view import LocalView

    mac = "52:54:00:00:00:01"
    view = LocalView()
    view.machines[mac] = Machine(mac=mac, name="pc-01", attr="demo")
    gens = [
        Generation(
            number=i,
            toplevel=f"/nix/store/{i:032d}-nixos-system-demo",
            kernel=f"/nix/store/{i:032d}-linux/bzImage",
            initrd=f"/nix/store/{i:032d}-initrd/initrd",
            kernel_params="console=ttyS0 loglevel=4",
            init=f"/nix/store/{i:032d}-nixos-system-demo/init",
            created=1.7e9 + i,
        )
        for i in range(1, 11)
    ]
    view.generations[mac] = MachineGenerations(mac=mac, generations=gens)
    content = TftpContent(
        view, MenuSettings(cache_url="http://10.0.0.1:8080", secret="s" * 64, public_key="k:x")
    )
    render_only, with_file = [], []
    for i in range(n):
        t0 = time.perf_counter()
        content.render(mac, http=bool(i % 2))
        t1 = time.perf_counter()
        src = content.menu("01-52-54-00-00-00-01", "10.0.0.1")
        t2 = time.perf_counter()
        src.file.close()
        render_only.append(t1 - t0)
        with_file.append(t2 - t1)

    def pct(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))] * 1000

    return pct(render_only, 0.5), pct(render_only, 0.99), pct(with_file, 0.5), pct(with_file, 0.99)


# A LAN's round trip for kernels without netem: a relay process that holds every datagram for half
# the round-trip time in each direction. TFTP answers from a new port (the transfer id), so the
# relay answers the client from its own port and sends the client's ACKs on to that new port.
RELAY_CODE = """
import asyncio, socket, sys
listen_port, server_port, half = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
async def main():
    loop = asyncio.get_running_loop()
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); front.bind(("127.0.0.1", listen_port))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); back.bind(("127.0.0.1", 0))
    front.setblocking(False); back.setblocking(False)
    state = {"client": None, "server": ("127.0.0.1", server_port)}
    def from_client():
        while True:
            try: data, addr = front.recvfrom(70000)
            except BlockingIOError: return
            if data[:2] == b"\\x00\\x01":  # a new read request starts a new transfer
                state["server"] = ("127.0.0.1", server_port)
            state["client"] = addr
            loop.call_later(half, back.sendto, data, state["server"])
    def from_server():
        while True:
            try: data, addr = back.recvfrom(70000)
            except BlockingIOError: return
            state["server"] = addr
            if state["client"]: loop.call_later(half, front.sendto, data, state["client"])
    loop.add_reader(front, from_client); loop.add_reader(back, from_server)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def windowsize_over_relay(server_port: int, rtt_ms: float, rounds: int) -> dict[int, float]:
    """The 1 MB comparison through the delaying relay (``rtt_ms`` round trip)."""
    port = free_udp_port()
    relay = start(
        [sys.executable, "-c", RELAY_CODE, str(port), str(server_port), str(rtt_ms / 2)], True
    )
    try:
        out: dict[int, list[float]] = {1: [], 4: []}
        for _ in range(rounds):
            for w in (1, 4):
                secs, nbytes = fetch_many(port, "big.efi", 1, 1468, w)
                assert nbytes == 1024 * 1024
                out[w].append(secs)
        return {w: statistics.median(v) for w, v in out.items()}
    finally:
        stop(relay)


def windowsize_over_lan(root: Path, rtt_ms: float, rounds: int) -> dict[int, float] | None:
    """The 1 MB comparison again across a link with ``rtt_ms`` round-trip time: loopback inside a
    network namespace of its own with a netem delay (root only; nothing outside it is touched)."""
    if os.geteuid() != 0 or shutil.which("tc") is None:
        return None
    ns = f"nb-tftpbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        run = ["ip", "netns", "exec", ns]
        subprocess.run([*run, "ip", "link", "set", "lo", "up"], check=True)
        netem = subprocess.run(
            [*run, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", f"{rtt_ms / 2}ms"],
            capture_output=True,
        )
        if netem.returncode != 0:  # e.g. a kernel without sch_netem
            return None
        port = 16999
        server = start([*run, sys.executable, "-c", SERVER_CODE, str(root), str(port)], True)
        try:
            out: dict[int, list[float]] = {1: [], 4: []}
            for _ in range(rounds):
                for w in (1, 4):
                    r = subprocess.run(
                        [*run, sys.executable, __file__, "--client-only", str(port), str(w)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    out[w].append(float(r.stdout.strip()))
            return {w: statistics.median(v) for w, v in out.items()}
        finally:
            stop(server)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=200)
    ap.add_argument("--rtt-ms", type=float, default=0.5)
    ap.add_argument("--client-only", nargs=2, type=int, metavar=("PORT", "WINDOW"))
    args = ap.parse_args()
    if args.client_only:
        secs, nbytes = fetch_many(args.client_only[0], "big.efi", 1, 1468, args.client_only[1])
        assert nbytes == 1024 * 1024
        print(secs)
        return 0
    tftpd = shutil.which("in.tftpd")
    if tftpd is None:
        print("in.tftpd not found: apt-get install tftpd-hpa", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="nb-tftp-bench-"))
    os.chmod(root, 0o755)
    (root / "boot.0").write_bytes(os.urandom(70 * 1024))
    (root / "big.efi").write_bytes(os.urandom(1024 * 1024))
    for f in root.iterdir():
        f.chmod(0o644)
    ours_port, hpa_port = free_udp_port(), free_udp_port()
    ours = start([sys.executable, "-c", SERVER_CODE, str(root), str(ours_port)], ready_line=True)
    hpa_cmd = [tftpd, "-L", "-a", f"127.0.0.1:{hpa_port}", "-s", str(root)]
    if os.geteuid() == 0:
        hpa_cmd += ["-u", "nobody"]
    hpa = start(hpa_cmd, ready_line=False)
    try:
        print(f"# TFTP bench, {args.rounds} alternating rounds, median shown")
        n = args.concurrent
        res: dict[str, list[float]] = {"ours": [], "hpa": []}
        for _ in range(args.rounds):
            for label, port in (("ours", ours_port), ("hpa", hpa_port)):
                secs, nbytes = fetch_many(port, "boot.0", n, 1468)
                assert nbytes == n * 70 * 1024, (label, nbytes)
                res[label].append(secs)
        o, h = statistics.median(res["ours"]), statistics.median(res["hpa"])
        print(f"{n} concurrent fetches of 70 KB (blksize 1468):")
        print(
            f"  nixboot  {o * 1000:8.1f} ms   tftpd-hpa {h * 1000:8.1f} ms   ratio {o / h:.2f}x"
            "  (target <= 1.3x)"
        )

        big: dict[str, list[float]] = {"ours-w1": [], "ours-w4": [], "hpa-w1": []}
        for _ in range(max(args.rounds, 5)):
            for label, port, w in (
                ("ours-w1", ours_port, 1),
                ("ours-w4", ours_port, 4),
                ("hpa-w1", hpa_port, 1),
            ):
                secs, nbytes = fetch_many(port, "big.efi", 1, 1468, w)
                assert nbytes == 1024 * 1024, (label, nbytes)
                big[label].append(secs)
        w1, w4, hw1 = (statistics.median(big[k]) for k in ("ours-w1", "ours-w4", "hpa-w1"))
        print("1 MB at blksize 1468:")
        print(
            f"  nixboot windowsize 1 {w1 * 1000:7.1f} ms   windowsize 4 {w4 * 1000:7.1f} ms   "
            f"speed-up {w1 / w4:.2f}x  (target >= 2x)"
        )
        print(f"  tftpd-hpa windowsize 1 {hw1 * 1000:7.1f} ms  (no windowsize support)")
        lan = windowsize_over_lan(root, args.rtt_ms, args.rounds)
        if lan is None:
            lan = windowsize_over_relay(ours_port, args.rtt_ms, args.rounds)
            # The relay's own timer and Python costs add to the nominal delay: report the round
            # trip actually seen (windowsize 1 waits one per block).
            seen_rtt = lan[1] / (1024 * 1024 / 1468) * 1000
            print(
                f"  over a delaying UDP relay (this kernel has no netem; {args.rtt_ms} ms asked, "
                f"{seen_rtt:.1f} ms round trip seen): windowsize 1 {lan[1] * 1000:7.1f} ms   "
                f"windowsize 4 {lan[4] * 1000:7.1f} ms   speed-up {lan[1] / lan[4]:.2f}x"
                "  (target >= 2x)"
            )
        else:
            print(
                f"  over a {args.rtt_ms} ms RTT link (netns + netem): windowsize 1 "
                f"{lan[1] * 1000:7.1f} ms   windowsize 4 {lan[4] * 1000:7.1f} ms   "
                f"speed-up {lan[1] / lan[4]:.2f}x"
            )
    finally:
        stop(ours)
        stop(hpa)
        shutil.rmtree(root, ignore_errors=True)

    p50, p99, fp50, fp99 = menu_render_bench()
    print("menu render, 10 generations, 10,000 renders:")
    print(f"  render only            p50 {p50:.3f} ms   p99 {p99:.3f} ms  (target p99 <= 1 ms)")
    print(f"  render + memfd (as served) p50 {fp50:.3f} ms   p99 {fp99:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
