"""Faults during a storm of simulated machines (tests/faults/client.py), each in its own test:
every machine that started boots (retries allowed), no event lost or duplicated, KV consistent,
nothing corrupt served, every service healthy again. The table is printed at the end."""

from __future__ import annotations

import asyncio
import time

import pytest

from nixboot_shared import events
from tests.faults import storm
from tests.faults.conftest import Storms
from tests.faults.stack import FaultStack

TABLE: list[storm.Outcome] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> object:
    yield
    print("\n" + storm.HEADER)
    for o in TABLE:
        print(storm.row(o))


def kill_and_restart(name: str) -> storm.Fault:
    async def fault(stack: FaultStack) -> None:
        stack.kill(name)
        await asyncio.sleep(1.0)  # a supervisor's restart delay
        stack.start_service(name)

    return fault


def check(o: storm.Outcome, stack: FaultStack) -> None:
    TABLE.append(o)
    print(storm.row(o))
    assert o.ok, (o, stack.logs())


async def test_storm_without_fault(stack: FaultStack, storms: Storms) -> None:
    check(await storm.storm(stack, "none", storms.take(), None), stack)


@pytest.mark.parametrize("service", ["cache", "tftp", "dhcp-hook", "builder"])
async def test_sigkill_mid_storm(stack: FaultStack, storms: Storms, service: str) -> None:
    o = await storm.storm(stack, f"SIGKILL {service}", storms.take(), kill_and_restart(service))
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
        subprocess.run([*stack.hook_argv(), "add", mac, storm.ip_of(mac)], env=env, check=True)
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
