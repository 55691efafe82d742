"""The nixboot stack as separate processes on loopback, the way a supervisor runs it: nats-server
(one node, or a 3-node JetStream cluster) and the four services, each a `nixboot serve` process.
One harness for the benchmark (bench/storm) and the fault tests (tests/faults), which extend it
with their own handles (a cold cache, a relay, a tmpfs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx
import msgspec
import nats
from nats.aio.client import Client

from nixboot_shared import records, subjects

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SERVICES = ("dhcp-hook", "tftp", "builder", "cache")
NIX_ENV_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def _port_range() -> tuple[int, int]:
    """Where free_port looks: below the kernel's ephemeral range. A port from that range (what
    binding port 0 gives) may meanwhile become some client socket's local port, and a service
    restarted on it mid-test (the fault tests restart them) fails with EADDRINUSE."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        ephemeral_low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    high = min(32000, ephemeral_low - 1)
    low = 20000 if high - 20000 >= 2000 else max(1024, high - 8000)
    return low, high


_handed_out: set[int] = set()  # never the same port twice to one test session
_pick = random.Random(os.urandom(8))  # separate sessions on one machine pick different ports


def _bindable(port: int) -> bool:
    """Nobody holds ``port`` on loopback, for TCP or UDP (a service may use either, and this
    bind without SO_REUSEADDR also refuses a port with connections still in TIME_WAIT)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A loopback port free for TCP and UDP, outside the kernel's ephemeral range (so no
    client's socket takes it before or between the runs of the service it is for)."""
    low, high = _port_range()
    tries = (_pick.randint(low, high) for _ in range(200 if high > low else 0))
    for port in tries:
        if _take(port):
            return port
    while True:  # a machine whose ephemeral range starts very low: what the kernel hands out
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if _take(port):  # checked once closed
            return port


def _take(port: int) -> bool:
    """Hand ``port`` out if it is free and was not handed out before."""
    if port in _handed_out or not _bindable(port):
        return False
    _handed_out.add(port)
    return True


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


async def connect(nats_url: str) -> Client:
    """A test's own connection; ``nats_url`` may list several servers (a cluster) by commas."""
    return await nats.connect(servers=[u for u in nats_url.split(",") if u])


@dataclass
class NatsNode:
    """One nats-server. A cluster member restarts on its own store directory and catches up."""

    name: str
    store: Path
    port: int
    monitor_port: int
    cluster_args: list[str]
    log: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [str(VENV_BIN / "nats-server"), "-js", "-sd", str(self.store)]
        argv += ["-a", "127.0.0.1", "-p", str(self.port)]
        if self.cluster_args:
            argv += ["-n", self.name, "-m", str(self.monitor_port), *self.cluster_args]
        return argv

    def jetstream_current(self) -> bool:
        """nats-server's own /healthz: 200 once JetStream has a meta leader and every stream and
        consumer replica on this node is current (a restarted member has caught up)."""
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/healthz"
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Stack:
    """Subclasses say which machines the config lists (``machine_attrs``) and may add ports
    (``allocate_ports``) or a public cache URL other than the cache's own."""

    root: Path
    flake: Path
    # 1: a single nats-server as a supervisor runs it; 3: a JetStream cluster, replicas 3.
    nats_nodes: int = field(default=1, kw_only=True)
    ports: dict[str, int] = field(default_factory=dict, kw_only=True)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, kw_only=True)
    env: dict[str, str] = field(default_factory=dict, kw_only=True)
    nodes: list[NatsNode] = field(default_factory=list, kw_only=True)
    # Set in every service's environment (the faults pin Nix to no substituters).
    service_env: ClassVar[dict[str, str]] = {}

    # -- what a subclass decides

    def machine_attrs(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def allocate_ports(self) -> None:
        self.ports = {name: free_port() for name in (*SERVICES, "nats")}
        self.ports["tftp-udp"] = free_port()

    @property
    def public_cache_url(self) -> str:
        """What menus tell machines."""
        return self.url("cache")

    # -- addresses

    @property
    def state(self) -> Path:
        return self.root / "state"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def cache_url(self) -> str:
        return self.url("cache")

    @property
    def nats_url(self) -> str:
        """Every node, comma-separated (what [nats].url takes, and `connect` here)."""
        return ",".join(n.url for n in self.nodes)

    @property
    def token(self) -> str:
        return (self.state / "api-token").read_text().strip()

    # -- configuration

    def write_config(self) -> Path:
        self.allocate_ports()
        self.nodes = self._nats_nodes()
        machines = "".join(
            f'[[machines]]\nmac = "{mac}"\nname = "pc-{i:03d}"\nattr = "{attr}"\n'
            for i, (mac, attr) in enumerate(self.machine_attrs())
        )
        replicas = f"replicas = {self.nats_nodes}\n" if self.nats_nodes > 1 else ""
        config = self.root / "nixboot.toml"
        config.write_text(
            f'state_dir = "{self.state}"\nlog_level = "WARNING"\nmenu_timeout_seconds = 0\n'
            f'[nats]\nurl = "{self.nats_url}"\n{replicas}'
            f'[tftp]\nhost = "127.0.0.1"\nport = {self.ports["tftp-udp"]}\nmax_transfers = 1024\n'
            f"[tftp.http]\nport = {self.ports['tftp']}\n"
            f'[cache]\npublic_url = "{self.public_cache_url}"\n'
            f'[cache.http]\nhost = "127.0.0.1"\nport = {self.ports["cache"]}\n'
            f'[builder]\nflake = "path:{self.flake}"\npoll_seconds = 3600\n'
            f"[builder.http]\nport = {self.ports['builder']}\n"
            f"[dhcp_hook.http]\nport = {self.ports['dhcp-hook']}\n" + machines
        )
        return config

    def _nats_nodes(self) -> list[NatsNode]:
        if self.nats_nodes == 1:
            # The single node keeps the layout a supervisor gives it: <root>/nats, nats.log.
            store, log = self.root / "nats", self.root / "nats.log"
            return [NatsNode("nats", store, self.ports["nats"], 0, [], log)]
        ports = [self.ports["nats"]] + [free_port() for _ in range(self.nats_nodes - 1)]
        routes = [free_port() for _ in range(self.nats_nodes)]
        all_routes = ",".join(f"nats://127.0.0.1:{p}" for p in routes)
        nodes = []
        for i in range(self.nats_nodes):
            cluster = f"nats://127.0.0.1:{routes[i]}"
            args = ["--cluster_name", "nixboot", "--cluster", cluster, "--routes", all_routes]
            store, log = self.root / f"nats-n{i}", self.root / f"nats-n{i}.log"
            nodes.append(NatsNode(f"n{i}", store, ports[i], free_port(), args, log))
        return nodes

    # -- processes

    def start(self) -> None:
        config = self.write_config()
        self.state.mkdir(parents=True, exist_ok=True)
        self.start_nats()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
        self.env["NIXBOOT_CONFIG"] = str(config)
        self.env.update(self.service_env)
        for name in SERVICES:
            self.start_service(name)
        self.wait_healthy(SERVICES)

    def nats_proc_name(self, node: NatsNode) -> str:
        return "nats" if self.nats_nodes == 1 else f"nats-{node.name}"

    def start_nats(self) -> None:
        """Every node (their routes find each other); then each answers on its client port."""
        for node in self.nodes:
            self.start_nats_node(node, wait=False)
        for node in self.nodes:
            wait_port(node.port)

    def start_nats_node(self, node: NatsNode, *, wait: bool = True) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        log = open(node.log, "ab")  # noqa: SIM115 - owned by the Popen
        self.procs[self.nats_proc_name(node)] = subprocess.Popen(
            node.argv(), stdout=log, stderr=log
        )
        log.close()
        if wait:
            wait_port(node.port)

    def start_service(self, name: str, argv_prefix: tuple[str, ...] = ()) -> None:
        """``nixboot serve <name>``; a cluster's nodes are listed starting at a different one for
        each service, so the services spread over the nodes as a deployment would spread them."""
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the Popen
        env = self.env
        if self.nats_nodes > 1:
            k = SERVICES.index(name) % self.nats_nodes
            urls = [n.url for n in self.nodes]
            env = {**env, "NIXBOOT_NATS__URL": ",".join(urls[k:] + urls[:k])}
        argv = [*argv_prefix, sys.executable, "-m", "nixboot", "serve", name]
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        log.close()

    def healthy(self, name: str) -> bool:
        try:
            return httpx.get(f"{self.url(name)}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, names: tuple[str, ...], timeout: float = 60) -> float:
        """Seconds until every one of ``names`` answers /healthz with 200."""
        start = time.monotonic()
        pending = set(names)
        while pending and time.monotonic() < start + timeout:
            pending = {n for n in pending if not self.healthy(n)}
            if pending:
                time.sleep(0.1)
        if pending:
            raise RuntimeError(f"not healthy: {sorted(pending)}; logs in {self.root}")
        return time.monotonic() - start

    def kill(self, name: str) -> None:
        """SIGKILL: no cleanup, no drain, as a crash or the OOM killer would."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_service(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for name in SERVICES:
            self.stop_service(name)
        for node in self.nodes:
            self.stop_service(self.nats_proc_name(node))

    # -- helpers the benchmark and the tests share

    def hook_argv(self, python: bool = False) -> list[str]:
        """The real hook as a DHCP server runs it: the default sh hook
        (deploy/dhcp/nixboot-dhcp-hook.sh), or the Python one (nixboot-dhcp-hook-python.sh's
        command: spool file, then a datagram)."""
        state = ["--state-dir", str(self.state)]
        if not python:
            return ["/bin/sh", str(REPO / "deploy" / "dhcp" / "nixboot-dhcp-hook.sh"), *state]
        import nixboot_dhcp_hook.hook as hook

        return [hook_interpreter(), "-S", "-I", hook.__file__ or "", *state]

    def public_key(self) -> str:
        return (self.state / "cache-key.pub").read_text().strip()

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def hook_interpreter() -> str:
    """The interpreter binary the Python hook's wrapper names (nixboot-dhcp-hook-python.sh:
    @PYTHON@ = /usr/bin/python3). Never a bare `python3` from PATH: on a pyenv host that is a bash
    shim running `pyenv exec`, ~100 ms per lease instead of ~10 ms (measured), which no DHCP server
    would run and which loaded the storm with work the classic stack never does."""
    system = Path("/usr/bin/python3")
    if system.exists():
        return str(system)
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


async def wait_generations(
    nats_url: str, macs: list[str], timeout: float, number: int = 1, *, poll: float = 0.3
) -> dict[str, records.Generation]:
    """Each machine's default generation once it is ``number`` (or newer). All of them or an
    error for generation 1 (the stack is not usable without); what there is for a later one."""
    nc = await connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_GENERATIONS)
        deadline = time.monotonic() + timeout
        found: dict[str, records.Generation] = {}
        while time.monotonic() < deadline:
            for mac in macs:
                if mac in found:
                    continue
                try:
                    entry = await kv.get(subjects.mac_token(mac))
                except Exception:
                    continue
                mg = msgspec.json.decode(entry.value or b"", type=records.MachineGenerations)
                default = mg.default()
                if default is not None and default.number >= number:
                    found[mac] = default
            if len(found) == len(macs):
                return found
            await asyncio.sleep(poll)
    finally:
        await nc.close()
    if number > 1:
        return found
    raise RuntimeError(
        f"generations missing for {len(macs) - len(found)} machines after {timeout} s"
    )
