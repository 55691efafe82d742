"""Faults during a storm of simulated machines (tests/faults/client.py), each in its own test:
every machine that started boots (retries allowed), no event lost or duplicated, KV consistent,
nothing corrupt served, every service healthy again. The table is printed at the end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from nixboot_shared import events
from tests.faults import storm
from tests.faults.conftest import CLUSTER_MACHINES, PAYLOAD_KIB, Storms, macs, started_stack
from tests.faults.stack import FaultStack, wait_generations, write_knobs

TABLE: list[storm.Outcome] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> object:
    yield
    print("\n" + storm.HEADER)
    for o in TABLE:
        print(storm.row(o))


def check(o: storm.Outcome, stack: FaultStack) -> None:
    TABLE.append(o)
    print(storm.row(o))
    assert o.ok, (o.problems, o.errors, o.corrupt, stack.logs())


async def test_storm_without_fault(stack: FaultStack, storms: Storms) -> None:
    check(await storm.storm(stack, "none", storms.take(), None), stack)


@pytest.mark.parametrize("service", ["cache", "tftp", "dhcp-hook", "builder"])
async def test_sigkill_mid_storm(stack: FaultStack, storms: Storms, service: str) -> None:
    o = await storm.storm(
        stack, f"SIGKILL {service}", storms.take(), storm.kill_and_restart(service)
    )
    check(o, stack)


async def test_hook_call_taken_by_a_dying_dhcp_hook_is_not_lost(
    stack: FaultStack, storms: Storms
) -> None:
    """The bug the SIGKILL storm found: the hook's datagram sat in the service's socket (or its
    in-memory queue) when the service died, the hook had exited 0, and the lease was gone. Now
    the hook spools first and the service deletes the copy once recorded."""
    import os
    import signal
    import subprocess

    (mac,) = storms.take(1)
    proc = stack.procs["dhcp-hook"]
    os.kill(proc.pid, signal.SIGSTOP)  # alive, socket bound, reading nothing
    try:
        env = {
            "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
            "PATH": os.environ["PATH"],
        }
        hook = stack.hook_argv(python=True)  # the datagram path (the sh hook only spools)
        subprocess.run([*hook, "add", mac, storm.ip_of(mac)], env=env, check=True)
    finally:
        stack.kill("dhcp-hook")
    stack.start_service("dhcp-hook")
    await asyncio.to_thread(stack.wait_healthy, ("dhcp-hook",))
    since = time.time() - 60
    for _ in range(40):
        got = [
            e
            for _, data in await storm.read_stream(stack.nats_url, since)
            if isinstance(e := events.decode(data), events.LeaseSeen) and e.mac == mac
        ]
        if got:
            break
        await asyncio.sleep(0.5)
    assert len(got) == 1, got
    assert not list((stack.state / "spool").glob("*.lease"))


async def test_nats_restart_mid_storm(stack: FaultStack, storms: Storms) -> None:
    check(await storm.storm(stack, "restart nats-server", storms.take(), storm.restart_nats), stack)


@pytest.fixture
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    """Its own stack on a 3-node nats-server cluster (JetStream replicas 3), each service given
    the nodes starting at a different one. Its flake has the session's content, so nix finds
    the generation already built."""
    root = tmp_path_factory.mktemp("faults-cluster")
    yield from started_stack(root, macs(CLUSTER_MACHINES, 1), nats_nodes=3)


async def test_cluster_node_restart_mid_storm(cluster_stack: FaultStack) -> None:
    """SIGKILL of the nats node leading the events stream mid-storm, then the node started again
    on its store: every machine boots, no event lost or doubled, the services reconnect by
    themselves, and afterwards all three nodes hold the same streams."""
    restart = storm.NodeRestart()
    o = await storm.storm(
        cluster_stack, "restart 1 of 3 nats nodes (R3)", cluster_stack.machines, restart
    )
    await storm.check_replicas_agree(cluster_stack, o)
    print(
        f"cluster: killed {restart.node} (services on it: {restart.services_on_node}), "
        f"back {restart.back_seconds} s, caught up {restart.caught_up_seconds} s"
    )
    check(o, cluster_stack)


async def test_lossy_delaying_relay(stack: FaultStack, storms: Storms) -> None:
    """5 % loss and 50 ms delay between the machines and TFTP + the cache (menus name the
    relay, so kernels and closures go through it too)."""
    relay = stack.start_relay(loss=0.05, delay=0.05)
    try:
        o = await storm.storm(stack, "5% loss + 50 ms delay", storms.take(), None)
    finally:
        counts = stack.stop_relay(relay)
    print("relay:", counts)
    assert "udp_dropped=0 " not in counts and "tcp_stalled=0" not in counts, counts
    check(o, stack)


async def test_cache_dir_on_a_full_tmpfs(stack: FaultStack, storms: Storms) -> None:
    """The cache's directory is a tmpfs smaller than one closure (private mount namespace): the
    cache must keep serving (streaming what it cannot keep) and never serve a short file."""
    closure_bytes = await stack.closure_nar_bytes()
    stack.tmpfs_bytes = max(64 * 1024, closure_bytes // 3)
    try:

        async def remount(s: FaultStack) -> None:
            s.kill("cache")
            s.start_service("cache")

        o = await storm.storm(
            stack, f"cache dir full (tmpfs {stack.tmpfs_bytes >> 10} KiB)", storms.take(), remount,
            fault_after=0.0,
        )  # fmt: skip
    finally:
        stack.tmpfs_bytes = 0
        stack.kill("cache")
        stack.start_service("cache")
        await asyncio.to_thread(stack.wait_healthy, ("cache",))
    check(o, stack)


async def test_builder_killed_mid_build(stack: FaultStack, storms: Storms) -> None:
    """A new generation is building (its demo-app sleeps) when the builder is SIGKILLed; the
    restarted builder takes the redelivered request: one BuildSucceeded, one new generation
    per machine, and the storm boots throughout."""
    since = time.time()
    build: dict[str, str] = {}

    async def fault(s: FaultStack) -> None:
        write_knobs(s.flake, PAYLOAD_KIB, delay=4, version="2.0")
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                f"{s.url('builder')}/builds",
                json={"all": True},
                headers={"Authorization": f"Bearer {s.token}"},
            )
        assert r.status_code == 202, r.text
        build["id"] = r.json()["builds"][0]["build_id"]
        await wait_event(s, since, lambda e: isinstance(e, events.BuildStarted), 30)
        await asyncio.sleep(1.5)  # inside demo-app's sleep
        s.kill("builder")
        await asyncio.sleep(1.0)
        s.start_service("builder")
        await wait_event(
            s,
            since,
            lambda e: isinstance(e, events.BuildSucceeded) and e.build_id == build["id"],
            120,
        )

    o = await storm.storm(stack, "builder SIGKILL mid-build", storms.take(), fault)
    stream = [events.decode(data) for _, data in await storm.read_stream(stack.nats_url, since)]
    # The restarted builder's poller may queue its own build of the changed flake: legitimate,
    # but each build succeeds once, ours among them, and no machine gets a second new generation.
    done = Counter(e.build_id for e in stream if isinstance(e, events.BuildSucceeded))
    if done[build["id"]] != 1 or any(n != 1 for n in done.values()):
        o.problems.append(f"BuildSucceeded per build: {dict(done)}")
    gens = await wait_generations(stack.nats_url, stack.machines, 30, number=2)
    if len(gens) != len(stack.machines):
        o.problems.append(f"generation 2 on {len(gens)} of {len(stack.machines)} machines")
    # The builder publishes GenerationCreated after the KV write: wait for every machine's.
    wanted = {(m, 2) for m in stack.machines}
    deadline = time.monotonic() + 30
    while True:
        stream = [events.decode(d) for _, d in await storm.read_stream(stack.nats_url, since)]
        # (Generation 1's events of the session's first build may still trail in.)
        created = Counter(
            (e.mac, e.number)
            for e in stream
            if isinstance(e, events.GenerationCreated) and e.number > 1
        )
        if wanted <= set(created) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if set(created.values()) != {1} or set(created) != wanted:
        numbers = Counter(n for _, n in created)
        o.problems.append(f"GenerationCreated: numbers {dict(numbers)}, {created.most_common(2)}")
    check(o, stack)


async def wait_event(
    stack: FaultStack, since: float, match: Callable[[events.AnyEvent], bool], timeout: float
) -> events.AnyEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, data in await storm.read_stream(stack.nats_url, since):
            e = events.decode(data)
            if match(e):
                return e
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no matching event after {timeout} s")
