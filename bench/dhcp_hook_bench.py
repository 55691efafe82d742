"""DHCP hook benchmark: what a lease change costs the DHCP server, and how fast it becomes an event.

1. Hook command latency, p50/p99 over N calls (default 1000), exactly as a DHCP server runs it (the
   deploy/dhcp wrapper: /bin/sh exec python3 -S -I hook.py), with the service up (datagram) and down
   (spool file, fsync'd). Side by side: the cheapest possible hook (a shell script doing nothing),
   a bare `python3 -S -I`, and the venv's `nixboot-dhcp-hook` console script.
2. Lease -> event latency under 200 leases/s: hook payloads (hook.capture + hook.send, the hook's
   own code, in-process: 200 Python start-ups per second do not fit on 2 cores) into the running
   service; latency from the hook's timestamp to the LeaseSeen event reaching a NATS subscriber.

Targets (issue 6): hook p99 <= 50 ms; lease -> event p99 <= 20 ms.
Run: .venv/bin/python bench/dhcp_hook_bench.py [--calls 1000] [--rate 200] [--leases 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
from cache_common import VENV_BIN, Nats, free_port

import nixboot_dhcp_hook.hook as hook
from nixboot_shared import events

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_calls(argv: list[str], n: int, env: dict[str, str]) -> list[float]:
    out = []
    for i in range(n):
        mac = f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        t0 = time.perf_counter()
        subprocess.run([*argv, "add", mac, "10.1.0.1"], env=env, stderr=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000)
    return out


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir()
        self.http_port = free_port()
        self.nats = Nats(root)
        self.service: subprocess.Popen[bytes] | None = None

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def start_service(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
        env |= {
            "NIXBOOT_NATS__URL": self.nats_url,
            "NIXBOOT_STATE_DIR": str(self.state),
            "NIXBOOT_DHCP_HOOK__HTTP__PORT": str(self.http_port),
            "NIXBOOT_LOG_LEVEL": "WARNING",
        }
        code = (
            "import sys; from nixboot_shared.config import load; "
            "from nixboot_dhcp_hook.service import main; sys.exit(main(load()))"
        )
        log = (self.root / "service.log").open("ab")
        self.service = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{self.http_port}/healthz")
                if r.status_code == 200 and (self.state / "dhcp-hook.sock").exists():
                    return
            time.sleep(0.05)
        raise SystemExit("service did not start: " + (self.root / "service.log").read_text())

    def stop_service(self) -> None:
        if self.service is not None:
            self.service.send_signal(signal.SIGTERM)
            self.service.wait(15)
            self.service = None

    def close(self) -> None:
        self.stop_service()
        self.nats.stop()


async def lease_to_event(stack: Stack, rate: float, count: int) -> tuple[list[float], int]:
    nc = await nats.connect(stack.nats_url)
    seen: dict[str, float] = {}
    done = asyncio.Event()

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        ev = events.decode(msg.data)
        assert isinstance(ev, events.LeaseSeen) and ev.mac is not None
        seen.setdefault(ev.mac, (time.time() - ev.ts) * 1000)
        if len(seen) >= count:
            done.set()

    await nc.subscribe("nixboot.evt.lease.>", cb=on_msg)
    sock_path = str(stack.state / "dhcp-hook.sock")
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        mac = f"52:54:01:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        now = time.time()
        env = {
            b"DNSMASQ_VENDOR_CLASS": b"PXEClient:Arch:00000:UNDI:002001",
            b"DNSMASQ_LEASE_EXPIRES": str(int(now) + 3600).encode(),
            b"DNSMASQ_TIME_REMAINING": b"3600",
        }
        hook.send(hook.capture(["add", mac, f"10.2.{i >> 8 & 255}.{i & 255}"], env, now), sock_path)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30)
    await nc.close()
    return list(seen.values()), count - len(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--leases", type=int, default=1000)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nb-dhcp-bench-"))
    stack = Stack(root)
    try:
        wrapper = root / "nixboot-dhcp-hook"
        text = (REPO / "deploy/dhcp/nixboot-dhcp-hook.sh").read_text()
        text = text.replace("@PYTHON@", "/usr/bin/python3").replace("@HOOK_PY@", hook.__file__)
        wrapper.write_text(text.replace("@STATE_DIR@", str(stack.state)))
        wrapper.chmod(0o755)
        noop = root / "noop-hook"
        noop.write_text("#!/bin/sh\nexit 0\n")
        noop.chmod(0o755)
        env = {"PATH": "/usr/bin:/bin"}  # Kea gives its script less than this; dnsmasq more

        rows: list[tuple[str, list[float]]] = []
        n = args.calls
        rows.append(("peer: /bin/sh no-op hook script", time_calls([str(noop)], n, env)))
        rows.append(
            (
                "peer: python3 -S -I -c pass",
                time_calls(["/usr/bin/python3", "-S", "-I", "-c", "pass"], n, env),
            )
        )
        stack.start_service()
        rows.append(("nixboot hook, service up (datagram)", time_calls([str(wrapper)], n, env)))
        console = shutil.which("nixboot-dhcp-hook", path=str(VENV_BIN))
        if console:
            env_c = {**env, "NIXBOOT_STATE_DIR": str(stack.state)}
            rows.append(
                ("console script nixboot-dhcp-hook, up", time_calls([console], min(n, 200), env_c))
            )
        stack.stop_service()
        rows.append(("nixboot hook, service down (spool)", time_calls([str(wrapper)], n, env)))
        spooled = len(list((stack.state / "spool").glob("*" + hook.SPOOL_SUFFIX)))

        print(f"\nHook command latency (ms), {n} calls each; target p99 <= 50 ms")
        print(f"{'':42} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}")
        for name, values in rows:
            print(
                f"{name:42} {pct(values, 0.5):7.1f} {pct(values, 0.9):7.1f} "
                f"{pct(values, 0.99):7.1f} {max(values):7.1f}"
            )
        print(f"spool files written while down: {spooled}")

        t0 = time.perf_counter()
        stack.start_service()  # drains the spool at start
        while list((stack.state / "spool").glob("*" + hook.SPOOL_SUFFIX)):
            time.sleep(0.05)
        print(
            f"spool drained {spooled} payloads in {time.perf_counter() - t0:.2f} s "
            "(including service start)"
        )

        lat, lost = asyncio.run(lease_to_event(stack, args.rate, args.leases))
        print(
            f"\nLease -> event latency (ms), {args.leases} leases at {args.rate:.0f}/s; "
            "target p99 <= 20 ms"
        )
        print(f"{'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  lost")
        print(
            f"{pct(lat, 0.5):7.2f} {pct(lat, 0.9):7.2f} {pct(lat, 0.99):7.2f} {max(lat):7.2f}  "
            f"{lost}"
        )
        print(f"\nload average during run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
