"""A storm of simulated machines with one fault injected mid-way, and the checks after it:
every machine that started booted, no event lost or duplicated (by id), KV consistent, nothing
corrupt served, every service healthy again. Used by the tests and by bench/faults.py."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import msgspec
import nats
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from nixboot_shared import events, records, subjects
from tests.faults import client
from tests.faults.stack import SERVICES, FaultStack
from tests.harness.stack import connect

Fault = Callable[[FaultStack], Awaitable[None]]


def kill_and_restart(name: str) -> Fault:
    """SIGKILL one service, and start it again after a supervisor's restart delay."""

    async def fault(stack: FaultStack) -> None:
        stack.kill(name)
        await asyncio.sleep(1.0)
        stack.start_service(name)

    return fault


async def restart_nats(stack: FaultStack) -> None:
    """The single nats-server stopped (SIGTERM) and started again on its port and store."""
    stack.stop_service("nats")
    await asyncio.sleep(1.0)
    stack.start_nats()


@dataclass
class NodeRestart:
    """SIGKILL the cluster node that leads the events stream (its loss forces a raft election
    while every service publishes), then start it again on its own store; done once the node's
    own /healthz says its JetStream replicas are current again (caught up)."""

    node: str = ""
    services_on_node: list[str] = field(default_factory=list)
    back_seconds: float = 0.0
    caught_up_seconds: float = 0.0

    async def __call__(self, stack: FaultStack) -> None:
        nc = await connect(stack.nats_url)
        try:
            info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
        finally:
            await nc.close()
        assert info.cluster is not None and info.cluster.leader, "not a cluster"
        node = next(n for n in stack.nodes if n.name == info.cluster.leader)
        self.node = node.name
        async with httpx.AsyncClient(timeout=2) as http:
            r = await http.get(f"http://127.0.0.1:{node.monitor_port}/connz")
        names = {str(c.get("name", "")) for c in r.json().get("connections") or []}
        self.services_on_node = [n for n in SERVICES if f"nixboot-{n}" in names]
        t = time.monotonic()
        stack.kill(stack.nats_proc_name(node))
        await asyncio.sleep(1.0)  # a supervisor's restart delay
        await asyncio.to_thread(stack.start_nats_node, node)
        self.back_seconds = round(time.monotonic() - t, 2)
        deadline = t + 90
        while not await asyncio.to_thread(node.jetstream_current):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats node {node.name} not current after 90 s")
            await asyncio.sleep(0.2)
        self.caught_up_seconds = round(time.monotonic() - t, 2)


async def check_replicas_agree(stack: FaultStack, out: Outcome, timeout: float = 30) -> None:
    """Every node holds the same state of every stream (the events and each KV bucket's): the
    restarted node caught up and no node kept a divergent tail."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            states: dict[str, dict[str, tuple[int, int]]] = {}
            for node in stack.nodes:
                url = f"http://127.0.0.1:{node.monitor_port}/jsz?accounts=true&streams=true"
                body = (await http.get(url)).json()
                for account in body.get("account_details") or []:
                    for st in account.get("stream_detail") or []:
                        state = st["state"]
                        states.setdefault(st["name"], {})[node.name] = (
                            int(state["messages"]),
                            int(state["last_seq"]),
                        )
            differ = {
                name: per_node
                for name, per_node in states.items()
                if len(per_node) != len(stack.nodes) or len(set(per_node.values())) != 1
            }
            if not differ and subjects.EVENTS_STREAM in states:
                return
            if time.monotonic() > deadline:
                out.problems.append(f"replicas differ (messages, last seq): {differ}")
                return
            await asyncio.sleep(0.5)


@dataclass
class Outcome:
    fault: str
    attempted: int
    booted: int
    events_expected: int
    events_found: int
    duplicates: int
    recovery_seconds: float
    retries: int
    corrupt: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.booted == self.attempted
            and self.events_found == self.events_expected
            and self.duplicates == 0
            and not self.corrupt
            and not self.problems
        )


def ip_of(mac: str) -> str:
    low = int(mac.replace(":", "")[-4:], 16)
    return f"10.11.{low >> 8}.{low & 255}"  # (a +1 here made 10.11.0.256: rejected, rightly)


async def storm(
    stack: FaultStack,
    name: str,
    macs: list[str],
    fault: Fault | None,
    *,
    fault_after: float = 1.5,
    spread: float = 3.0,
    deadline: float = 90.0,
) -> Outcome:
    since = time.time()
    hook_queue: asyncio.Queue[str] = asyncio.Queue()
    hook_argv = stack.hook_argv()

    async def hook_worker() -> None:
        # dnsmasq runs its script one call at a time, beside the boot.
        while True:
            mac = await hook_queue.get()
            env = {
                "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
                "PATH": os.environ["PATH"],
            }
            p = await asyncio.create_subprocess_exec(*hook_argv, "add", mac, ip_of(mac), env=env)
            await p.wait()
            hook_queue.task_done()

    async def announce(mac: str) -> None:
        hook_queue.put_nowait(mac)

    net = client.Net(("127.0.0.1", stack.ports["tftp-public"]), stack.public_cache_url, deadline)
    worker = asyncio.ensure_future(hook_worker())

    async def power_on(i: int, mac: str) -> client.Boot:
        # A room powers on over a few seconds: the fault meets machines in every stage.
        await asyncio.sleep(spread * i / len(macs))
        return await client.boot(net, mac, announce)

    boots = [asyncio.ensure_future(power_on(i, mac)) for i, mac in enumerate(macs)]
    recovery = 0.0
    if fault is not None:
        await asyncio.sleep(fault_after)
        t = time.monotonic()
        await fault(stack)
        await asyncio.to_thread(stack.wait_healthy, SERVICES, 60)
        recovery = time.monotonic() - t
    results = await asyncio.gather(*boots)
    await asyncio.wait_for(hook_queue.join(), 30)
    worker.cancel()
    out = Outcome(
        fault=name,
        attempted=len(macs),
        booted=sum(r.ok for r in results),
        events_expected=0,
        events_found=0,
        duplicates=0,
        recovery_seconds=round(recovery, 2),
        retries=sum(r.retries for r in results),
        corrupt=[u for r in results for u in r.corrupt],
        errors=sorted({f"{r.mac}: {r.error}" for r in results if not r.ok})[:5],
    )
    await check_events(stack, out, macs, results, since)
    await check_kv(stack, out, macs)
    await check_http_state(stack, out, macs)
    return out


def _decodes(data: bytes) -> bool:
    try:
        events.decode(data)
    except events.BadEvent:
        return False
    return True


async def read_stream(
    nats_url: str, since: float, *, raw: bool = False, timeout: float = 30.0
) -> list[tuple[str, bytes]]:
    """The stream's messages since ``since``, up to its last one when called: all of them or an
    error (a pause in delivery on a loaded machine must not pass for the stream's end).
    Undecodable ones (the bad-input tests put some there on purpose) are left out unless
    ``raw``."""
    nc = await connect(nats_url)
    out: list[tuple[str, bytes]] = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.EVENTS_STREAM)
        last = info.state.last_seq
        sub = await js.subscribe(
            subjects.EVENTS_SUBJECTS,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.fromtimestamp(since - 1, UTC).isoformat(),
            ),
        )
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < last:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                if await _nothing_since(sub, last):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"events stream: read up to sequence {seen} of {last} in {timeout} s"
                    ) from None
                continue
            seen = msg.metadata.sequence.stream
            if raw or _decodes(msg.data):
                out.append((msg.subject, msg.data))
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def _nothing_since(sub: JetStreamContext.PushSubscription, last: int) -> bool:
    """True when no message up to ``last`` is after the consumer's start time: the server
    has nothing pending and never delivered one (its delivered stream sequence starts just
    below the first message it would deliver). Otherwise the message at ``last``, the newest,
    is one to deliver, and reading goes on until it arrives."""
    info = await sub.consumer_info()
    delivered = info.delivered
    return (
        info.num_pending == 0
        and delivered is not None
        and delivered.consumer_seq == 0
        and delivered.stream_seq >= last
    )


async def check_events(
    stack: FaultStack, out: Outcome, macs: list[str], results: list[client.Boot], since: float
) -> None:
    """Leases: one per hook call (one per machine). Stage reports: every one answered 204 was
    stored. Any id twice in the stream is a duplicate (Nats-Msg-Id dedupe failed)."""
    # Reports are published before their 204, leases may still sit in the hook's spool.
    ours = set(macs)
    accepted = {pair for r in results for pair in r.reports_accepted}
    expected = len(macs) + len(accepted)
    deadline = time.monotonic() + 30
    while True:
        raw = await read_stream(stack.nats_url, since)
        decoded = [events.decode(data) for _, data in raw]
        ids = Counter(e.id for e in decoded)
        leases = {e.id for e in decoded if isinstance(e, events.LeaseSeen) and e.mac in ours}
        # A retried POST whose first answer was lost may store a second report with a new id:
        # that is the machine's repetition, so reports count by (boot id, stage).
        reports = {
            (e.boot_id or "", e.stage) for e in decoded if isinstance(e, events.StageReported)
        }
        found = len(leases) + len(accepted & reports)
        if found >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    out.events_expected = expected
    out.events_found = found
    out.duplicates = sum(n - 1 for n in ids.values() if n > 1)
    lease_per_mac = Counter(
        e.mac for e in decoded if isinstance(e, events.LeaseSeen) and e.mac in ours
    )
    extra = {m: n for m, n in lease_per_mac.items() if n != 1}
    if extra:
        out.problems.append(f"lease events per MAC not 1: {dict(list(extra.items())[:3])}")


async def check_kv(stack: FaultStack, out: Outcome, macs: list[str]) -> None:
    nc = await connect(stack.nats_url)
    try:
        js = nc.jetstream()
        leases = await js.key_value(subjects.KV_LEASES)
        gens = await js.key_value(subjects.KV_GENERATIONS)
        for mac in macs:
            token = subjects.mac_token(mac)
            try:
                lease = msgspec.json.decode(
                    (await leases.get(token)).value or b"", type=records.Lease
                )
                if lease.mac != mac or lease.ip != ip_of(mac):
                    out.problems.append(f"lease of {mac} is {lease}")
                by_ip = (await leases.get(subjects.ip_key(ip_of(mac)))).value or b""
                if subjects.normalize_mac(by_ip.decode().strip().strip('"')) != mac:
                    out.problems.append(f"ip index of {mac} holds {by_ip!r}")
                mg = msgspec.json.decode(
                    (await gens.get(token)).value or b"", type=records.MachineGenerations
                )
                numbers = [g.number for g in mg.generations]
                if len(numbers) != len(set(numbers)) or mg.default() is None:
                    out.problems.append(f"generations of {mac}: {numbers}")
            except Exception as e:
                out.problems.append(f"KV of {mac}: {type(e).__name__}: {e}")
    finally:
        await nc.close()


async def check_http_state(stack: FaultStack, out: Outcome, macs: list[str]) -> None:
    """Every service healthy, and the cache's boot tracker knows every machine."""
    async with httpx.AsyncClient(timeout=5) as http:
        for name in SERVICES:
            r = await http.get(f"{stack.url(name)}/healthz")
            if r.status_code != 200:
                out.problems.append(f"{name} unhealthy: {r.status_code}")
        deadline = time.monotonic() + 15
        while True:
            r = await http.get(f"{stack.url('cache')}/boots")
            seen = {m["mac"] for m in r.json()["machines"]} if r.status_code == 200 else set()
            missing = set(macs) - seen
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if missing:
            out.problems.append(f"/boots misses {len(missing)} machines")


HEADER = (
    f"{'fault':34} {'attempted':>9} {'booted':>6} {'events exp/found':>16} {'dups':>4} "
    f"{'recovery s':>10} {'retries':>7}"
)


def row(o: Outcome) -> str:
    ev = f"{o.events_expected}/{o.events_found}"
    return (
        f"{o.fault:34} {o.attempted:>9} {o.booted:>6} {ev:>16} {o.duplicates:>4} "
        f"{o.recovery_seconds:>10} {o.retries:>7}"
    )
