"""DHCP hook benchmark: what a lease change costs the DHCP server, and how fast it becomes an event.

1. Hook command latency, p50/p99 over N calls (default 1000), and CPU per call (user+sys of the
   hook's processes), exactly as a DHCP server runs it: the sh hook (deploy/dhcp/
   nixboot-dhcp-hook.sh: a spool file the service sees by inotify) and the Python hook
   (nixboot-dhcp-hook-python.sh: /bin/sh exec python3 -S -I hook.py, datagram), each with the
   service up and down. Side by side: the cheapest possible hook (a shell script doing nothing),
   a bare `python3 -S -I`, and the venv's `nixboot-dhcp-hook` console script.
2. Lease -> event latency under 200 leases/s: Python hook payloads (hook.capture + hook.send, the
   hook's own code, in-process: 200 Python start-ups per second do not fit on 2 cores) into the
   running service; latency from the hook's timestamp to the LeaseSeen event reaching a NATS
   subscriber.
3. Lease -> event latency with the real hook commands (sh, then Python), one call at a time as
   dnsmasq runs its script, at up to --sh-rate calls/s from a separate process: from just before
   the hook is started to the event at a NATS subscriber (includes the process start-up; sh:
   the file, inotify, the service; Python: the datagram, the service).

Targets (issue 6): hook p99 <= 50 ms; lease -> event p99 <= 20 ms.
Run: .venv/bin/python bench/dhcp_hook_bench.py [--calls 1000] [--rate 200] [--leases 1000]
     [--sh-rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
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


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_calls(argv: list[str], n: int, env: dict[str, str]) -> tuple[list[float], float]:
    """Latencies (ms) and CPU per call (ms, the hook's processes: user + sys)."""
    out = []
    cpu0 = children_cpu()
    for i in range(n):
        mac = f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        t0 = time.perf_counter()
        subprocess.run([*argv, "add", mac, "10.1.0.1"], env=env, stderr=subprocess.DEVNULL)
        out.append((time.perf_counter() - t0) * 1000)
    return out, (children_cpu() - cpu0) * 1000 / n


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


class LeaseArrivals:
    """When each MAC's first LeaseSeen reached a subscriber: (arrival time, the event's ts)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen: dict[str, tuple[float, float]] = {}
        self.done = asyncio.Event()
        self.nc: nats.aio.client.Client | None = None

    async def start(self, nats_url: str) -> None:
        self.nc = await nats.connect(nats_url)

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            ev = events.decode(msg.data)
            assert isinstance(ev, events.LeaseSeen) and ev.mac is not None
            self.seen.setdefault(ev.mac, (time.time(), ev.ts))
            if len(self.seen) >= self.count:
                self.done.set()

        await self.nc.subscribe("nixboot.evt.lease.>", cb=on_msg)

    async def finish(self, timeout: float = 30) -> int:
        """Wait for all of them (at most ``timeout``); how many never came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        assert self.nc is not None
        await self.nc.close()
        return self.count - len(self.seen)


async def lease_to_event(stack: Stack, rate: float, count: int) -> tuple[list[float], int]:
    arrivals = LeaseArrivals(count)
    await arrivals.start(stack.nats_url)
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
    lost = await arrivals.finish()
    return [(got - ts) * 1000 for got, ts in arrivals.seen.values()], lost


# The caller of the sh hook, in its own process (as the DHCP server is): in a thread of this one,
# the GIL delayed the subscriber's clock by milliseconds. Prints "mac start-time" per call.
SH_CALLER = """
import subprocess, sys, time
hook_cmd, rate, count, tag = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
out = []
for i in range(count):
    delay = start + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    mac = f"52:54:{tag}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    now = time.time()
    env = {
        "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
        "DNSMASQ_LEASE_EXPIRES": str(int(now) + 3600),
        "DNSMASQ_TIME_REMAINING": "3600",
    }
    t = time.time()
    subprocess.run([hook_cmd, "add", mac, f"10.3.{i >> 8 & 255}.{i & 255}"], env=env)
    out.append(f"{mac} {t!r}")
print("\\n".join(out))
"""


async def command_lease_to_event(
    stack: Stack, hook_cmd: Path, rate: float, count: int, tag: str
) -> tuple[list[float], int]:
    """A real hook command, one call at a time (dnsmasq serialises its script); latency from just
    before the call starts to the event at a subscriber."""
    arrivals = LeaseArrivals(count)
    await arrivals.start(stack.nats_url)
    caller = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SH_CALLER,
        str(hook_cmd),
        str(rate),
        str(count),
        tag,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await caller.communicate()
    started = {mac: float(t) for mac, t in (line.split() for line in stdout.decode().splitlines())}
    lost = await arrivals.finish()
    return [(got - started[m]) * 1000 for m, (got, _) in arrivals.seen.items()], lost


def install_hook(template: str, dest: Path, state: Path) -> Path:
    text = (REPO / "deploy/dhcp" / template).read_text()
    text = text.replace("@PYTHON@", "/usr/bin/python3").replace("@HOOK_PY@", hook.__file__)
    dest.write_text(text.replace("@STATE_DIR@", str(state)))
    dest.chmod(0o755)
    return dest


def spool_count(stack: Stack) -> int:
    return len(list((stack.state / "spool").glob("*" + hook.SPOOL_SUFFIX)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--leases", type=int, default=1000)
    ap.add_argument("--sh-rate", type=float, default=50.0)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="nb-dhcp-bench-"))
    stack = Stack(root)
    try:
        py_hook = install_hook("nixboot-dhcp-hook-python.sh", root / "hook-python", stack.state)
        sh_hook = install_hook("nixboot-dhcp-hook.sh", root / "hook-sh", stack.state)
        noop = root / "noop-hook"
        noop.write_text("#!/bin/sh\nexit 0\n")
        noop.chmod(0o755)
        env = {"PATH": "/usr/bin:/bin"}  # Kea gives its script less than this; dnsmasq more

        rows: list[tuple[str, tuple[list[float], float]]] = []
        n = args.calls
        rows.append(("peer: /bin/sh no-op hook script", time_calls([str(noop)], n, env)))
        rows.append(
            (
                "peer: python3 -S -I -c pass",
                time_calls(["/usr/bin/python3", "-S", "-I", "-c", "pass"], n, env),
            )
        )
        stack.start_service()
        rows.append(("sh hook, service up (file+inotify)", time_calls([str(sh_hook)], n, env)))
        rows.append(("python hook, service up (datagram)", time_calls([str(py_hook)], n, env)))
        console = shutil.which("nixboot-dhcp-hook", path=str(VENV_BIN))
        if console:
            env_c = {**env, "NIXBOOT_STATE_DIR": str(stack.state)}
            rows.append(
                ("console script nixboot-dhcp-hook, up", time_calls([console], min(n, 200), env_c))
            )
        stack.stop_service()
        rows.append(("sh hook, service down (spool)", time_calls([str(sh_hook)], n, env)))
        rows.append(("python hook, service down (spool)", time_calls([str(py_hook)], n, env)))
        spooled = spool_count(stack)

        print(f"\nHook command latency (ms), {n} calls each; target p99 <= 50 ms")
        print(f"{'':42} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'CPU/call':>9}")
        for name, (values, cpu) in rows:
            print(
                f"{name:42} {pct(values, 0.5):7.1f} {pct(values, 0.9):7.1f} "
                f"{pct(values, 0.99):7.1f} {max(values):7.1f} {cpu:9.2f}"
            )
        print(f"spool files written while down: {spooled}")

        t0 = time.perf_counter()
        stack.start_service()  # drains the spool at start
        while spool_count(stack):
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
        print(
            f"\nLease -> event latency (ms) with the hook command, {args.leases} calls each at up "
            f"to {args.sh_rate:.0f}/s one at a time, from the call's start; target p99 <= 20 ms"
        )
        print(f"{'':20} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  lost")
        for name, cmd, tag in (("sh hook", sh_hook, "02"), ("python hook", py_hook, "03")):
            lat, lost = asyncio.run(
                command_lease_to_event(stack, cmd, args.sh_rate, args.leases, tag)
            )
            print(
                f"{name:20} {pct(lat, 0.5):7.2f} {pct(lat, 0.9):7.2f} {pct(lat, 0.99):7.2f} "
                f"{max(lat):7.2f}  {lost}"
            )
        print(f"\nload average during run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
