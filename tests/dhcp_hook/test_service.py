"""The hook command and the dhcp-hook service with a real nats-server: delivery, spooling while the
service is down, deduplication, ordering, bad input over the hook and over HTTP."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from nixboot_shared import subjects
from tests.dhcp_hook.conftest import HOOK_KINDS, Bus, HookService, random_mac, run_hook, wait_for

PXE_ENV = {
    "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00007:UNDI:003016",
    "DNSMASQ_USER_CLASS0": "iPXE",
    "DNSMASQ_TAGS": "nb-arch-7 br0",
    "DNSMASQ_LEASE_EXPIRES": "4000000000",
    "DNSMASQ_TIME_REMAINING": "3600",
}
UNCHANGED = "nixboot_dhcp_unchanged_leases_total"


def tell_unchanged(
    svc: HookService, hook: Path, argv: list[str], env: dict[str, str], what: str
) -> None:
    """Run the hook with a lease change the map already holds: the service skips it as
    unchanged (counted), publishing nothing."""
    before = svc.metric(UNCHANGED, source="dnsmasq")
    assert run_hook(hook, argv, env)[0] == 0
    wait_for(lambda: svc.metric(UNCHANGED, source="dnsmasq") > before, 30, f"{what} skipped")


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_hook_call_becomes_event_and_lease_map(
    kind: str, hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    hook = hook_service.wrapper(tmp_path, kind)
    mac = random_mac()
    code, _, err = run_hook(hook, ["add", mac.upper(), "10.9.0.7", "pc7"], PXE_ENV)
    assert (code, err) == (0, "")
    [ev] = await bus_reader.lease_events(mac, 1)
    assert (ev.mac, ev.ip, ev.lease_kind, ev.source) == (mac, "10.9.0.7", "new", "dnsmasq")
    assert (ev.arch, ev.user_class, ev.hostname) == ("uefi-x64", "iPXE", "pc7")
    assert ev.server_ts == 4000000000 - 3600
    assert ev.expires == 4000000000
    assert await bus_reader.mac_of_ip("10.9.0.7") == subjects.mac_token(mac)
    lease = await bus_reader.lease(mac)
    assert lease is not None
    assert (lease.ip, lease.kind, lease.arch) == ("10.9.0.7", "new", "uefi-x64")
    assert (
        hook_service.metric("nixboot_dhcp_lease_changes_total", source="dnsmasq", kind="new") >= 1
    )


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_service_down_hook_exits_zero_and_spool_delivers_once(
    kind: str, hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    hook = hook_service.wrapper(tmp_path, kind)
    hook_service.stop()
    mac = random_mac()
    calls = [
        ["add", mac, "10.9.1.5", "pcx"],
        ["old", mac, "10.9.1.5", "pcx"],
        ["del", mac, "10.9.1.5", "pcx"],
    ]
    for i, args in enumerate(calls):
        # Distinct server clocks, as dnsmasq gives them (expires - remaining), in the past.
        now = int(time.time())
        env = {"DNSMASQ_LEASE_EXPIRES": str(now - 2 + i + 3600), "DNSMASQ_TIME_REMAINING": "3600"}
        if args[0] == "del":
            env = {"DNSMASQ_LEASE_EXPIRES": str(now + 3600)}  # time left: a release
        # The DHCP server is not held up: the hook spools and exits 0 (run_hook's 10 s subprocess
        # timeout catches a hook that blocks); how fast it does so is measured by
        # bench/dhcp_hook_bench.py ("service down (spool)"), not asserted here.
        code, _, err = run_hook(hook, args, env)
        assert code == 0
        assert "spooled to" in err
    spooled = sorted(hook_service.spool.glob("*.lease"))
    assert len(spooled) == 3
    # A copy of one spool file (a re-delivery) must not produce a second event.
    shutil.copy(spooled[0], hook_service.spool / ("9" + spooled[0].name))
    hook_service.start()
    got = await bus_reader.lease_events(mac, 3)
    assert [e.lease_kind for e in sorted(got, key=lambda e: (e.server_ts or 0, e.ts))] == [
        "new",
        "renew",
        "release",
    ]
    wait_for(lambda: not list(hook_service.spool.glob("*.lease")), 10, "spool drained")
    lease = await bus_reader.lease(mac)
    assert lease is not None and lease.kind == "release"
    assert await bus_reader.mac_of_ip("10.9.1.5") is None  # released: no longer in the IP index


async def test_retransmit_in_same_second_is_one_event(
    hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    hook = hook_service.wrapper(tmp_path)
    mac = random_mac()
    for _ in range(3):
        assert run_hook(hook, ["old", mac, "10.9.2.2"], PXE_ENV)[0] == 0
    got = await bus_reader.lease_events(mac, 1)
    assert len(got) == 1


async def test_lease_file_replay_unknown_to_the_map_opens_no_retransmit_window(
    hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    """dnsmasq's start-up replay (``old`` + DNSMASQ_DATA_MISSING, as dnsmasq 2.90 calls the
    script) of a lease the map does not know (a fresh deployment) is published and applied; the
    client's request a second later (dnsmasq marks it DATA_MISSING too, and moves the expiry) is
    published as well, not taken for a retransmit. Told once more unchanged: nothing."""
    hook = hook_service.wrapper(tmp_path)
    mac = random_mac()
    expires = 4000000000
    replay = {
        "DNSMASQ_DATA_MISSING": "1",
        "DNSMASQ_LEASE_EXPIRES": str(expires),
        "DNSMASQ_TIME_REMAINING": "3600",
    }
    assert run_hook(hook, ["old", mac, "10.9.2.9"], replay)[0] == 0
    [replayed] = await bus_reader.lease_events(mac, 1)
    assert replayed.server_ts == expires - 3600
    lease = await bus_reader.lease(mac)
    assert lease is not None and lease.from_lease_file
    request = {**replay, "DNSMASQ_LEASE_EXPIRES": str(expires + 1)}
    assert run_hook(hook, ["old", mac, "10.9.2.9"], request)[0] == 0
    got = await bus_reader.lease_events(mac, 2)
    assert [e.server_ts for e in got] == [expires - 3600, expires - 3600 + 1]
    assert hook_service.metric("nixboot_dhcp_retransmits_total", source="dnsmasq") == 0
    # dnsmasq restarted again: its file tells the lease as the map has it.
    again = {**request, "DNSMASQ_TIME_REMAINING": "3000"}
    tell_unchanged(hook_service, hook, ["old", mac, "10.9.2.9"], again, "the unchanged lease")
    assert len(await bus_reader.lease_events(mac, 3, timeout=0.5)) == 2
    lease = await bus_reader.lease(mac)
    assert lease is not None and lease.server_ts == expires - 3600 + 1


async def test_replay_of_a_known_lease_opens_no_retransmit_window(
    hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    """The in-window case of tests/dhcp_hook/test_servers.py's dnsmasq restart test, with fixed
    server clocks instead of a real restart racing the clock: a client leased (``add``), dnsmasq
    restarts and replays that lease a second later (``old`` + DATA_MISSING, same expiry: skipped as
    unchanged), and the client's real renewal one second after the replay (DATA_MISSING too, the
    expiry moved) is published, not swallowed as a retransmit of the replay."""
    hook = hook_service.wrapper(tmp_path)
    mac = random_mac()
    expires = 4000000000
    granted = {**PXE_ENV, "DNSMASQ_LEASE_EXPIRES": str(expires), "DNSMASQ_TIME_REMAINING": "3600"}
    assert run_hook(hook, ["add", mac, "10.9.2.7"], granted)[0] == 0
    [new] = await bus_reader.lease_events(mac, 1)
    assert new.server_ts == expires - 3600
    replay = {"DNSMASQ_DATA_MISSING": "1", "DNSMASQ_LEASE_EXPIRES": str(expires)}
    replay["DNSMASQ_TIME_REMAINING"] = "3599"  # told one second after the grant
    tell_unchanged(hook_service, hook, ["old", mac, "10.9.2.7"], replay, "the replay")
    # The renewal: expiry moved, server clock one second after the replay, two after the grant.
    renewal = {
        **replay,
        "DNSMASQ_LEASE_EXPIRES": str(expires + 2),
        "DNSMASQ_TIME_REMAINING": "3600",
    }
    assert run_hook(hook, ["old", mac, "10.9.2.7"], renewal)[0] == 0
    got = await bus_reader.lease_events(mac, 2)
    assert [(e.lease_kind, e.server_ts) for e in got] == [
        ("new", expires - 3600),
        ("renew", expires - 3598),
    ], got
    assert hook_service.metric("nixboot_dhcp_retransmits_total", source="dnsmasq") == 0
    lease = await bus_reader.lease(mac)
    assert lease is not None and lease.server_ts == expires - 3598 and lease.from_lease_file


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_bad_hook_input_is_counted_logged_and_changes_nothing(
    kind: str, hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    hook = hook_service.wrapper(tmp_path, kind)
    before = hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-dnsmasq")
    before_unknown = hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-unknown")
    mac = random_mac()
    bad_calls: list[tuple[list[str], dict[str, str]]] = [
        (["add", "52:54:00:12:34", "10.9.3.1"], {}),  # MAC too short
        (["add", mac, "10.9.3.999"], {}),  # not an IP
        (["add", mac, "10.9.3.1"], {"DNSMASQ_LEASE_EXPIRES": "tomorrow"}),
    ]
    for args, env in bad_calls:
        assert run_hook(hook, args, env)[0] == 0
    assert run_hook(hook, ["--frobnicate", "\x7f\x01"], {"JUNK": "x"})[0] == 0
    assert run_hook(hook, [], {})[0] == 0
    wait_for(
        lambda: (
            hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-dnsmasq") == before + 3
        ),
        5,
        "three rejected dnsmasq payloads counted",
    )
    wait_for(
        lambda: (
            hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-unknown")
            == before_unknown + 2
        ),
        5,
        "two rejected unknown payloads counted",
    )
    log = hook_service.log()
    assert "invalid MAC address '52:54:00:12:34'" in log
    assert "'10.9.3.999' is not an IPv4 address" in log
    assert "unrecognised hook call" in log
    assert await bus_reader.lease_events(mac, 0, timeout=0.5) == []
    # The service is unharmed: a good call still goes through.
    assert run_hook(hook, ["add", mac, "10.9.3.1"], PXE_ENV)[0] == 0
    assert len(await bus_reader.lease_events(mac, 1)) == 1


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_hook_with_nowhere_to_deliver_still_exits_zero(kind: str, tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    svc = HookService("nats://127.0.0.1:1", blocked)  # state dir is a file: spool impossible
    code, _, err = run_hook(svc.wrapper(tmp_path, kind), ["add", random_mac(), "10.0.0.1"])
    assert code == 0
    assert "lease change lost" in err


async def test_http_leases_with_token_ordering_and_bad_input(
    hook_service: HookService, bus_reader: Bus
) -> None:
    url = f"{hook_service.url}/leases"
    auth = {"Authorization": f"Bearer {hook_service.token()}"}
    mac = random_mac()
    newer = {"mac": mac, "ip": "10.9.4.20", "kind": "renew", "server_ts": 2000.0}
    older = {"mac": mac, "ip": "10.9.4.10", "kind": "new", "server_ts": 1000.0, "arch": "bios"}
    r = httpx.post(url, json=newer, headers=auth)
    assert r.status_code == 202, r.text
    first_id = r.json()["id"]
    assert httpx.post(url, json=newer, headers=auth).json()["id"] == first_id  # retry: same id
    assert httpx.post(url, json=older, headers=auth).status_code == 202  # late and out of order
    got = await bus_reader.lease_events(mac, 2)
    assert sorted(e.ip for e in got) == ["10.9.4.10", "10.9.4.20"]  # both events, retry once
    lease = await bus_reader.lease(mac)
    assert lease is not None and lease.ip == "10.9.4.20"  # the older event did not win the map
    assert await bus_reader.mac_of_ip("10.9.4.20") == subjects.mac_token(mac)
    assert await bus_reader.mac_of_ip("10.9.4.10") is None
    assert hook_service.metric("nixboot_dhcp_stale_lease_changes_total", source="http") >= 1

    before = hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-http")
    assert httpx.post(url, json=newer).status_code == 401
    assert httpx.post(url, json=newer, headers={"Authorization": "Bearer nope"}).status_code == 401
    bad_bodies = [
        {**newer, "colour": "blue"},  # unknown field
        {**newer, "mac": "52:54:00:12:34"},
        {**newer, "ip": "not-an-ip"},
        {**newer, "kind": "borrow"},
        {"ip": "10.0.0.1"},
    ]
    for body in bad_bodies:
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == 400, body
        assert r.json()["error"]
    assert httpx.post(url, content=b"{not json", headers=auth).status_code == 400
    assert hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-http") == before + 8
    assert "unknown field `colour`" in hook_service.log() or "colour" in hook_service.log()
    assert len(await bus_reader.lease_events(mac, 2, timeout=0.5)) == 2  # nothing else published


async def test_repeated_grant_within_seconds_is_a_retransmit(
    hook_service: HookService, bus_reader: Bus
) -> None:
    url = f"{hook_service.url}/leases"
    auth = {"Authorization": f"Bearer {hook_service.token()}"}
    mac = random_mac()
    for server_ts in (100.0, 101.0, 102.5, 110.0):  # the second and third: a client repeating
        lease = {"mac": mac, "ip": "10.9.5.5", "kind": "renew", "server_ts": server_ts}
        assert httpx.post(url, json=lease, headers=auth).status_code == 202
    got = await bus_reader.lease_events(mac, 2)
    assert [e.server_ts for e in got] == [100.0, 110.0]
    stored = await bus_reader.lease(mac)
    assert stored is not None and stored.server_ts == 110.0
    assert hook_service.metric("nixboot_dhcp_retransmits_total", source="http") >= 2


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_nats_down_service_spools_and_delivers_after_reconnect(
    kind: str, tmp_path: Path
) -> None:
    import nats as nats_client

    from tests.conftest import NatsServer

    own_nats = NatsServer(tmp_path / "js")  # our own: this test stops it
    own_nats.start()
    svc = HookService(own_nats.url, tmp_path / "state")
    svc.state.mkdir()
    svc.start()
    try:
        hook = svc.wrapper(tmp_path, kind)
        mac = random_mac()
        own_nats.stop()
        # The hook only talks to the service, so NATS being down does not fail it (its latency
        # is bench/dhcp_hook_bench.py's "service up" figure, not asserted here).
        code, _, _ = run_hook(hook, ["add", mac, "10.9.6.6"], PXE_ENV)
        assert code == 0
        # The hook spools before it sends (a crash of the service must not lose the call); the
        # service keeps that copy once NATS refuses it.
        assert list(svc.spool.glob("*.lease"))
        wait_for(
            lambda: svc.metric("nixboot_dhcp_spooled_total") == 1, 15, "service keeps the lease"
        )
        assert len(list(svc.spool.glob("*.lease"))) == 1
        own_nats.start()
        nc = await nats_client.connect(own_nats.url)
        try:
            got = await Bus(nc).lease_events(mac, 1, timeout=20)
        finally:
            await nc.close()
        assert [(e.lease_kind, e.ip) for e in got] == [("new", "10.9.6.6")]
        wait_for(lambda: not list(svc.spool.glob("*.lease")), 10, "spool drained")
    finally:
        svc.stop()
        own_nats.stop()
