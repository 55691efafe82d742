"""Real DHCP servers (dnsmasq, Kea, ISC dhcpd) run with the configurations in deploy/dhcp inside a
network namespace, real busybox udhcpc clients in a second one: a lease, a renewal and a release
each arrive as the right event; the lease map answers IP -> MAC; PXE answers fit the client."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixboot_shared import events, subjects
from tests.conftest import tool
from tests.dhcp_hook.conftest import (
    DEPLOY,
    HOOK_KINDS,
    Bus,
    Client,
    HookService,
    Lab,
    random_mac,
    render,
    run_hook,
    wait_for,
)

CACHE_URL = f"http://{Lab.SERVER_IP}:8080"
RANGE = ("10.77.0.100", "10.77.0.150")
# What iPXE on BIOS sends (pxe-in-qemu.md): option 93 = 0, PXE vendor class, user class "iPXE".
IPXE_BIOS = ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000", "-x", "0x4d:69505845"]
# UEFI firmware's own PXE: option 93 = 7, no user class.
UEFI_PXE = ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"]


@dataclass
class Server:
    name: str
    with_client_options: bool  # Kea's run_script exports no client options


def start_dnsmasq(lab: Lab, hook: Path) -> subprocess.Popen[bytes]:
    conf = render(
        DEPLOY / "dnsmasq.conf",
        lab.dir / "dnsmasq.conf",
        {
            "IFACE": lab.bridge,
            "SERVER_IP": lab.SERVER_IP,
            "RANGE_START": RANGE[0],
            "RANGE_END": RANGE[1],
            "NETMASK": "255.255.255.0",
            "CACHE_URL": CACHE_URL,
            "HOOK": str(hook),
            "STATE": str(lab.dir),
        },
    )
    argv = [
        tool("dnsmasq"),
        "--no-daemon",
        f"--conf-file={conf}",
        "--log-dhcp",
        f"--pid-file={lab.dir / 'dnsmasq.pid'}",
    ]
    return lab.server(argv, lab.dir / "dnsmasq.log")


def start_kea(lab: Lab, hook: Path) -> None:
    conf = render(
        DEPLOY / "kea-dhcp4.conf",
        lab.dir / "kea-dhcp4.conf",
        {
            "IFACE": lab.bridge,
            "SUBNET": lab.SUBNET,
            "SERVER_IP": lab.SERVER_IP,
            "RANGE_START": RANGE[0],
            "RANGE_END": RANGE[1],
            "CACHE_URL": CACHE_URL,
            "HOOK": str(hook),
            "STATE": str(lab.dir),
        },
    )
    check = subprocess.run(
        ["ip", "netns", "exec", lab.server_ns, tool("kea-dhcp4"), "-t", str(conf)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    env = {**os.environ, "KEA_PIDFILE_DIR": str(lab.dir), "KEA_LOCKFILE_DIR": str(lab.dir)}
    lab.server([tool("kea-dhcp4"), "-c", str(conf)], lab.dir / "kea.log", env=env)


def start_isc(lab: Lab, hook: Path) -> None:
    conf = render(
        DEPLOY / "isc-dhcpd.conf",
        lab.dir / "dhcpd.conf",
        {
            "SUBNET_ADDR": "10.77.0.0",
            "NETMASK": "255.255.255.0",
            "SERVER_IP": lab.SERVER_IP,
            "RANGE_START": RANGE[0],
            "RANGE_END": RANGE[1],
            "CACHE_URL": CACHE_URL,
            "HOOK": str(hook),
        },
    )
    leases = lab.dir / "dhcpd.leases"
    leases.write_text("")
    argv = [
        tool("dhcpd"),
        "-f",
        "-d",
        "-4",
        "-cf",
        str(conf),
        "-lf",
        str(leases),
        "-pf",
        str(lab.dir / "dhcpd.pid"),
        lab.bridge,
    ]
    lab.server(argv, lab.dir / "dhcpd.log")


STARTERS = {"dnsmasq": start_dnsmasq, "kea": start_kea, "isc": start_isc}


def offer(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", line))


async def check_client_lifecycle(
    lab: Lab, bus: Bus, client: Client, server: Server, arch: events.Arch, ipxe: bool
) -> None:
    bound = offer(client.wait_line("bound"))
    ip = bound["ip"]
    assert RANGE[0] <= ip <= RANGE[1]
    # PXE done right: iPXE chains to the cache over HTTP, firmware PXE gets its boot program.
    if ipxe:
        assert bound["boot_file"] == f"{CACHE_URL}/boot.ipxe"
    else:
        expected = {"bios": "undionly.kpxe", "uefi-x64": "snponly.efi"}[arch]
        assert (bound["boot_file"], bound["siaddr"]) == (expected, lab.SERVER_IP)

    [new] = await bus.lease_events(client.mac, 1)
    assert (new.lease_kind, new.mac, new.ip, new.source) == ("new", client.mac, ip, server.name)
    assert new.expires is not None and new.server_ts is not None
    if server.with_client_options:
        assert new.arch == arch
        assert new.user_class == ("iPXE" if ipxe else None)
        assert (new.vendor_class or "").startswith("PXEClient:Arch:")
    assert await bus.mac_of_ip(ip) == subjects.mac_token(client.mac)

    client.renew()
    client.wait_line("renew")
    got = await bus.lease_events(client.mac, 2)
    assert [e.lease_kind for e in got] == ["new", "renew"], got
    assert got[1].ip == ip

    client.release()
    client.wait_line("deconfig", 2)
    got = await bus.lease_events(client.mac, 3)
    assert [e.lease_kind for e in got] == ["new", "renew", "release"], got
    lease = await bus.lease(client.mac)
    assert lease is not None and (lease.kind, lease.ip) == ("release", ip)
    assert await bus.mac_of_ip(ip) is None


@pytest.mark.parametrize("kind", HOOK_KINDS)
@pytest.mark.parametrize(
    "server",
    [Server("dnsmasq", True), Server("kea", False), Server("isc", True)],
    ids=lambda s: s.name,
)
async def test_real_server_lease_renew_release(
    server: Server, kind: str, lab: Lab, hook_service: HookService, bus_reader: Bus
) -> None:
    hook = hook_service.wrapper(lab.dir, kind)
    STARTERS[server.name](lab, hook)
    ipxe_bios = lab.client(random_mac(), [*IPXE_BIOS, "-x", "hostname:lab-pc1"])
    uefi = lab.client(random_mac(), UEFI_PXE)
    try:
        await check_client_lifecycle(lab, bus_reader, ipxe_bios, server, "bios", ipxe=True)
        await check_client_lifecycle(lab, bus_reader, uefi, server, "uefi-x64", ipxe=False)
    except Exception:
        for log in sorted(lab.dir.glob("*.log")):
            print(f"==== {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        print("==== service\n" + hook_service.log()[-3000:])
        raise
    if server.with_client_options:
        [first] = (await bus_reader.lease_events(ipxe_bios.mac, 3))[:1]
        assert first.hostname == "lab-pc1"


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_dnsmasq_leases_while_service_is_down_arrive_once_later(
    kind: str, lab: Lab, hook_service: HookService, bus_reader: Bus
) -> None:
    hook = hook_service.wrapper(lab.dir, kind)
    hook_service.stop()
    start_dnsmasq(lab, hook)
    client = lab.client(random_mac(), IPXE_BIOS)
    ip = offer(client.wait_line("bound"))["ip"]  # DHCP unaffected by the missing service
    client.renew()
    client.wait_line("renew")
    client.release()
    client.wait_line("deconfig", 2)
    wait_for(lambda: len(list(hook_service.spool.glob("*.lease"))) >= 3, 10, "3 spooled calls")
    hook_service.start()
    got = await bus_reader.lease_events(client.mac, 3)
    assert [e.lease_kind for e in got] == ["new", "renew", "release"]
    assert all(e.ip == ip for e in got)
    wait_for(lambda: not list(hook_service.spool.glob("*.lease")), 10, "spool drained")


async def test_dnsmasq_restart_replay_does_not_swallow_the_next_request(
    lab: Lab, hook_service: HookService, bus_reader: Bus
) -> None:
    """dnsmasq re-tells its lease file through the hook at start-up (``old``, DNSMASQ_DATA_MISSING
    set). The client's real request right after that (here: a renewal about a second later) must
    still be published; the replay of a lease the map already holds publishes nothing."""
    hook = hook_service.wrapper(lab.dir)
    dnsmasq = start_dnsmasq(lab, hook)
    client = lab.client(random_mac(), IPXE_BIOS)
    ip = offer(client.wait_line("bound"))["ip"]
    [new] = await bus_reader.lease_events(client.mac, 1)
    dnsmasq.terminate()
    dnsmasq.wait(10)

    start_dnsmasq(lab, hook)
    wait_for(
        lambda: hook_service.metric("nixboot_dhcp_unchanged_leases_total", source="dnsmasq") >= 1,
        10,
        "dnsmasq's start-up replay skipped",
    )
    asked = time.time()
    client.renew()
    client.wait_line("renew")
    got = await bus_reader.lease_events(client.mac, 2)
    assert [e.lease_kind for e in got] == ["new", "renew"], got
    renew = got[1]
    assert renew.ip == ip and renew.id != new.id
    # The real request, not the replay (which came before the client asked).
    assert renew.ts >= asked and renew.expires is not None and new.expires is not None
    assert renew.expires > new.expires, (new, renew)
    # Whether this renewal lands within RETRANSMIT_SECONDS of the replay (the case that used to be
    # lost) depends on how fast a loaded machine restarts dnsmasq and runs udhcpc, so it is not
    # asserted here; tests/dhcp_hook/test_service.py::
    # test_replay_of_a_known_lease_opens_no_retransmit_window pins that case with fixed server
    # clocks (replay one second after the grant, renewal one second after the replay).
    assert renew.server_ts is not None
    lease = await bus_reader.lease(client.mac)
    assert lease is not None and lease.server_ts == renew.server_ts
    # dnsmasq marks that renewal DATA_MISSING too: the lease came from its file.
    assert lease.from_lease_file, lease


@pytest.mark.parametrize("kind", HOOK_KINDS)
async def test_dhcp_unaffected_when_the_hook_cannot_deliver_anywhere(
    kind: str, lab: Lab, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    svc = HookService("nats://127.0.0.1:1", blocked)  # no socket, and no spool possible
    hook = svc.wrapper(lab.dir, kind)
    assert run_hook(hook, ["add", random_mac(), "10.0.0.1"])[0] == 0
    start_dnsmasq(lab, hook)
    client = lab.client(random_mac(), UEFI_PXE)
    bound = offer(client.wait_line("bound"))
    assert bound["boot_file"] == "snponly.efi"
    wait_for(
        lambda: "lease change lost" in (lab.dir / "dnsmasq.log").read_text(),
        10,
        "dnsmasq logs the hook's complaint",
    )
