"""boot.ipxe as the iPXE path's boot program: the cache names the machine that asked (a fresh
lease of the address in the lease map, or the menu request that follows from that address) and
publishes a BootFileRequested for it, stamped with the request's own time. Real nats-server,
the cache service in its own process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nixboot_cache import chain
from nixboot_shared import bus, events, subjects
from nixboot_shared.records import Lease
from tests.cache.cache_helpers import CacheServer

MAC_A = "52:54:00:aa:00:01"
MAC_B = "52:54:00:bb:00:02"
IP = "127.0.0.1"  # where the test's HTTP client comes from


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def put_lease(kv: KeyValue, mac: str, ip: str, kind: str, seen: float) -> None:
    lease = Lease(mac=mac, ip=ip, kind=kind, seen=seen, server_ts=seen, expires=seen + 3600)
    await kv.put(subjects.mac_token(mac), msgspec.json.encode(lease))
    await kv.put(subjects.ip_key(ip), subjects.mac_token(mac).encode())


async def wait_for_count(got: list[events.AnyEvent], n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} events"
        await asyncio.sleep(0.05)


async def test_boot_ipxe_names_its_machine_by_fresh_lease_or_by_its_menu_request(
    cache_server: CacheServer, nc: Client
) -> None:
    js = nc.jetstream()
    leases = (await bus.bootstrap(js))[subjects.KV_LEASES]
    got: list[events.AnyEvent] = []

    async def cb(msg: object) -> None:
        got.append(events.decode(msg.data))  # type: ignore[attr-defined]

    sub = await nc.subscribe("nixboot.evt.boot-file.>", cb=cb)
    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        # 1. The dhcp-hook already recorded the lease that let iPXE ask: named at once.
        await put_lease(leases, MAC_A, IP, "new", time.time())
        asked = time.time()
        r = await http.get("/boot.ipxe")
        assert r.status_code == 200 and r.text.startswith("#!ipxe")
        assert (await http.head("/boot.ipxe")).status_code == 200  # no event for a HEAD
        await wait_for_count(got, 1)
        first = got[0]
        assert isinstance(first, events.BootFileRequested)
        assert (first.mac, first.file, first.file_kind, first.protocol, first.client) == (
            MAC_A,
            "boot.ipxe",
            "boot-program",
            "http",
            IP,
        )
        assert first.bytes == len(r.content) and first.result == "ok"
        assert asked <= first.ts - first.seconds <= first.ts <= time.time()

        # 2. The race: the DHCP server's script has not run yet, the map still holds the
        # address's previous holder (released). The menu request from that address names it.
        await put_lease(leases, MAC_A, IP, "release", time.time())
        asked = time.time()
        assert (await http.get("/boot.ipxe")).status_code == 200
        await asyncio.sleep(2 * chain.POLL_SECONDS)  # it looked at the map meanwhile: in vain
        assert len(got) == 1
        menu_at = time.time()
        r = await http.get(f"/ipxe/{MAC_B}")
        assert r.status_code == 200
        await wait_for_count(got, 2)
        second = got[1]
        assert isinstance(second, events.BootFileRequested)
        assert (second.mac, second.file, second.file_kind) == (MAC_B, "boot.ipxe", "boot-program")
        assert asked <= second.ts < menu_at  # the request's time, not the publish's

        # 3. A lease of the address granted long ago (another boot's): not taken either.
        old = time.time() - 2 * chain.FRESH_LEASE_SECONDS
        await put_lease(leases, MAC_A, IP, "renew", old)
        assert (await http.get("/boot.ipxe")).status_code == 200
        await asyncio.sleep(chain.POLL_SECONDS)
        await put_lease(leases, MAC_B, IP, "new", time.time())  # the hook catches up
        await wait_for_count(got, 3)
        assert got[2].mac == MAC_B
    await asyncio.sleep(0.3)
    assert len(got) == 3
    await sub.unsubscribe()
    via = {v: cache_server.metric("nixboot_cache_ipxe_chain_requesters_total", via=v) for v in
           ("lease", "menu", "unknown")}  # fmt: skip
    assert via == {"lease": 2, "menu": 1, "unknown": 0}


def test_lease_names_requester_only_when_fresh_active_and_of_that_address() -> None:
    now = 1.75e9
    fresh = Lease(mac=MAC_A, ip=IP, kind="new", seen=now - 1, expires=now + 3600)
    assert chain.lease_names_requester(fresh, IP, now)
    for stale in (
        msgspec.structs.replace(fresh, ip="10.0.0.9"),
        msgspec.structs.replace(fresh, kind="release"),
        msgspec.structs.replace(fresh, seen=now - chain.FRESH_LEASE_SECONDS - 1),
        msgspec.structs.replace(fresh, expires=now - 1),
    ):
        assert not chain.lease_names_requester(stale, IP, now), stale


async def test_chain_requests_resolve_forget_and_bound() -> None:
    reqs = chain.ChainRequests(limit=2)
    a = reqs.expect("10.0.0.1")
    b = reqs.expect("10.0.0.1")
    assert a is not None and b is not None and reqs.expect("10.0.0.2") is None  # full
    reqs.forget("10.0.0.1", b)
    assert reqs.resolve("10.0.0.1", MAC_A) == 1 and a.result() == MAC_A
    assert reqs.count == 0 and reqs.waiting == {}
    assert reqs.resolve("10.0.0.1", MAC_A) == 0
