"""The dhcp-hook service as a real process, the hook wrapper from deploy/dhcp, a lab network of
namespaces (bridge + veth) and helpers to read lease events and the lease map from NATS."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError

import nixboot_dhcp_hook.hook
from nixboot_shared import events, records, subjects
from tests.conftest import NatsServer, free_port, tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "dhcp"
SYSTEM_PYTHON = "/usr/bin/python3"  # what a DHCP server's host runs the hook with
HOOK_TEMPLATES = {"sh": "nixboot-dhcp-hook.sh", "python": "nixboot-dhcp-hook-python.sh"}
HOOK_KINDS = list(HOOK_TEMPLATES)


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def render(template: Path, dest: Path, values: dict[str, str]) -> Path:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", text)
    assert not left, f"{template.name}: placeholders not filled: {left}"
    dest.write_text(text)
    return dest


class HookService:
    """`nixboot serve dhcp-hook` equivalent: the service's main() in its own process."""

    def __init__(self, nats_url: str, state: Path) -> None:
        self.state = state
        self.port = free_port()
        self.log_path = state / "service.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
        self.env |= {
            "NIXBOOT_NATS__URL": nats_url,
            "NIXBOOT_STATE_DIR": str(state),
            "NIXBOOT_DHCP_HOOK__HTTP__PORT": str(self.port),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = state / "dhcp-hook.sock"
        self.spool = state / "spool"

    def start(self) -> None:
        code = (
            "import sys; from nixboot_shared.config import load; "
            "from nixboot_dhcp_hook.service import main; sys.exit(main(load()))"
        )
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=self.env, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dhcp-hook exited: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz").status_code == 200 and self.socket.exists():
                    return
            time.sleep(0.05)
        raise TimeoutError(f"dhcp-hook did not come up: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        return (self.state / "api-token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        """A sample from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            series, _, lbl = sample.partition("{")
            if series == name and ",".join(sorted(lbl.rstrip("}").split(","))) == want:
                return float(value)
        return 0.0

    def wrapper(self, dest_dir: Path, kind: str = "sh") -> Path:
        """The hook from deploy/dhcp filled in for this service: ``sh`` (nixboot-dhcp-hook.sh, the
        default) or ``python`` (nixboot-dhcp-hook-python.sh, running hook.py)."""
        template = HOOK_TEMPLATES[kind]
        path = render(
            DEPLOY / template,
            dest_dir / template.removesuffix(".sh"),
            {
                "PYTHON": SYSTEM_PYTHON,
                "HOOK_PY": nixboot_dhcp_hook.hook.__file__,
                "STATE_DIR": str(self.state),
            },
        )
        path.chmod(0o755)
        return path


@pytest.fixture
def hook_service(nats_server: NatsServer, tmp_path: Path) -> Iterator[HookService]:
    svc = HookService(nats_server.url, tmp_path / "state")
    svc.state.mkdir()
    svc.start()
    yield svc
    svc.stop()


class Bus:
    """Reads what the service wrote: lease events from the stream, the lease map from KV."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()

    async def lease_events(
        self, mac: str, want: int, timeout: float = 10.0
    ) -> list[events.LeaseSeen]:
        """Every lease event of ``mac`` in the stream, once at least ``want`` are there (plus a
        short grace period, so that a duplicate would be seen too)."""
        subject = subjects.event_subject("lease", mac)
        deadline = time.monotonic() + timeout
        found: list[events.LeaseSeen] = []
        while True:
            found = await self._read_all(subject)
            if len(found) >= want or time.monotonic() > deadline:
                break
            await self._sleep(0.1)
        await self._sleep(0.3)
        return await self._read_all(subject)

    async def _read_all(self, subject: str) -> list[events.LeaseSeen]:
        sub = await self.js.subscribe(
            subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        out: list[events.LeaseSeen] = []
        try:
            info = await self.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
            total = (info.state.subjects or {}).get(subject, 0)
            while len(out) < total:
                msg = await sub.next_msg(timeout=2)
                ev = events.decode(msg.data)
                assert isinstance(ev, events.LeaseSeen)
                out.append(ev)
        finally:
            await sub.unsubscribe()
        return out

    @staticmethod
    async def _sleep(seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    async def lease(self, mac: str) -> records.Lease | None:
        kv = await self.js.key_value(subjects.KV_LEASES)
        try:
            entry = await kv.get(subjects.mac_token(mac))
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value or b"", type=records.Lease)

    async def mac_of_ip(self, ip: str) -> str | None:
        kv = await self.js.key_value(subjects.KV_LEASES)
        try:
            entry = await kv.get(subjects.ip_key(ip))
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None


@pytest.fixture
async def bus_reader(nats_server: NatsServer) -> AsyncIterator[Bus]:
    nc = await nats.connect(nats_server.url)
    yield Bus(nc)
    await nc.close()


def run_hook(
    wrapper: Path, args: list[str], env: dict[str, str] | None = None
) -> tuple[int, float, str]:
    """Run the hook as a DHCP server would; returns (exit code, seconds, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.run([str(wrapper), *args], env=env or {}, capture_output=True, timeout=10)
    return p.returncode, time.perf_counter() - t0, p.stderr.decode(errors="replace")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc event script: configure the address (a release is unicast from it) and log
# what the server offered: the boot file and next-server tell whether PXE was done right.
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
echo "$1 ip=$ip boot_file=$boot_file siaddr=$siaddr" >> "$LOG"
"""


class Client:
    """busybox udhcpc in the client namespace, in the foreground: SIGUSR1 renews, SIGUSR2
    releases (busybox's documented signals)."""

    def __init__(self, lab: Lab, iface: str, mac: str, log: Path, extra: list[str]) -> None:
        self.lab, self.iface, self.mac, self.log = lab, iface, mac, log
        script = lab.dir / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        argv = [
            "ip",
            "netns",
            "exec",
            lab.client_ns,
            tool("busybox"),
            "udhcpc",
            "-f",
            "-i",
            iface,
            "-s",
            str(script),
            "-t",
            "20",
            "-T",
            "1",
            *extra,
        ]
        env = {"PATH": os.environ["PATH"], "LOG": str(log)}
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_line(self, prefix: str, count: int = 1, timeout: float = 20) -> str:
        wait_for(
            lambda: sum(line.startswith(prefix) for line in self.lines()) >= count,
            timeout,
            f"udhcpc {prefix} #{count} on {self.iface}",
        )
        return [line for line in self.lines() if line.startswith(prefix)][count - 1]

    def renew(self) -> None:
        assert self.proc.poll() is None
        # dnsmasq keeps lease times in whole seconds: a renewal within the second of the lease
        # changes nothing there and runs no script. Real renewals come at T1 (half the lease).
        time.sleep(1.1)
        self.proc.send_signal(signal.SIGUSR1)

    def release(self) -> None:
        assert self.proc.poll() is None
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class Lab:
    """Two namespaces: the DHCP server's with a bridge, the clients' with veth ends. Nothing
    touches the host's interfaces; everything is removed at the end."""

    SERVER_IP = "10.77.0.1"
    SUBNET = "10.77.0.0/24"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        tag = f"{os.getpid()}-{random.randrange(1 << 16):04x}"
        self.server_ns = f"nb-dhs-{tag}"
        self.client_ns = f"nb-dhc-{tag}"
        self.bridge = "nbbr0"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[Client] = []
        self.n_ports = 0

    def up(self) -> None:
        sh("ip", "netns", "add", self.server_ns)
        sh("ip", "netns", "add", self.client_ns)
        s = ["ip", "-n", self.server_ns]
        sh(*s, "link", "set", "lo", "up")
        sh("ip", "-n", self.client_ns, "link", "set", "lo", "up")
        sh(*s, "link", "add", self.bridge, "type", "bridge")
        sh(*s, "addr", "add", f"{self.SERVER_IP}/24", "dev", self.bridge)
        sh(*s, "addr", "add", "fd77::1/64", "dev", self.bridge, "nodad")
        sh(*s, "link", "set", self.bridge, "up")

    def port(self, mac: str) -> str:
        """A new veth pair: one end on the bridge, the other (with ``mac``) in the client ns."""
        self.n_ports += 1
        host_end, client_end = f"vs{self.n_ports}", f"vc{self.n_ports}"
        s = ["ip", "-n", self.server_ns]
        sh(
            *s,
            "link",
            "add",
            host_end,
            "type",
            "veth",
            "peer",
            "name",
            client_end,
            "netns",
            self.client_ns,
        )
        sh(*s, "link", "set", host_end, "master", self.bridge)
        sh(*s, "link", "set", host_end, "up")
        c = ["ip", "-n", self.client_ns]
        sh(*c, "link", "set", client_end, "address", mac)
        sh(*c, "link", "set", client_end, "up")
        return client_end

    def server(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as f:
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.server_ns, *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(p)
        return p

    def client(self, mac: str, extra: list[str]) -> Client:
        iface = self.port(mac)
        c = Client(self, iface, mac, self.dir / f"client-{iface}.log", extra)
        self.clients.append(c)
        return c

    def down(self) -> None:
        for c in self.clients:
            c.stop()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        sh("ip", "netns", "del", self.client_ns, check=False)
        sh("ip", "netns", "del", self.server_ns, check=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root (ip netns)")
    lab = Lab(tmp_path)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
