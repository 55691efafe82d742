"""The Recorder against a real nats-server: two instances writing the same MAC's lease. Each
remembers its own last write (no KV read before publishing), so the other's write in between must
be noticed by the compare-and-set, never overwritten."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from nixboot_dhcp_hook import parse
from nixboot_dhcp_hook.service import Recorder
from nixboot_shared import bus, records, subjects
from tests.dhcp_hook.conftest import Bus

MAC = "52:54:00:aa:bb:01"


@pytest.fixture
async def nc(fresh_nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(fresh_nats_url)
    yield client
    await client.drain()


def change(ip: str, server_ts: float, kind: str = "new") -> parse.LeaseChange:
    return parse.from_fields(mac=MAC, ip=ip, kind=kind, now=server_ts, server_ts=server_ts)


async def stored(nc: Client) -> records.Lease:
    lease = await Bus(nc).lease(MAC)
    assert lease is not None
    return lease


async def lease_events(nc: Client) -> int:
    info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
    return info.state.messages


async def test_other_instances_write_is_not_lost_to_a_remembered_revision(nc: Client) -> None:
    js = nc.jetstream()
    kv = (await bus.bootstrap(js))[subjects.KV_LEASES]
    a, b = Recorder(js, kv), Recorder(js, kv)

    await a.record(change("10.0.0.1", 1000.0))
    assert subjects.mac_token(MAC) in a.written  # a's next change will not read KV first
    await b.record(change("10.0.0.2", 1010.0))  # b knows nothing: reads KV, updates
    # a's memory is stale now: its update must fail the CAS, re-read and apply on top of b's.
    await a.record(change("10.0.0.3", 1020.0))
    assert (await stored(nc)).ip == "10.0.0.3"
    # An older change than the map's (b's view is stale too) is published, not applied.
    await b.record(change("10.0.0.4", 1015.0))
    assert (await stored(nc)).ip == "10.0.0.3"
    assert await lease_events(nc) == 4
    # The same change again (a spool copy re-delivered) is recognised from memory: no event.
    await a.record(change("10.0.0.3", 1020.0))
    assert await lease_events(nc) == 4
    assert await Bus(nc).mac_of_ip("10.0.0.3") == subjects.mac_token(MAC)
