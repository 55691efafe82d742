"""Hook parsing against the argument lists and environments the real servers produced here
(captured from dnsmasq 2.89, Kea 2.2 and ISC dhcpd 4.4 in a network namespace)."""

from __future__ import annotations

import pytest

from nixboot_dhcp_hook import parse
from nixboot_dhcp_hook.parse import BadLease, parse_hook

NOW = 1795642014.25
MAC = "52:54:00:12:34:56"

DNSMASQ_ADD_ENV = {
    "DNSMASQ_CLIENT_ID": "01:52:54:00:12:34:56",
    "DNSMASQ_INTERFACE": "vs",
    "DNSMASQ_LEASE_EXPIRES": "1795642110",
    "DNSMASQ_SUPPLIED_HOSTNAME": "pc1",
    "DNSMASQ_TAGS": "nb-arch-0 vs",
    "DNSMASQ_TIME_REMAINING": "120",
    "DNSMASQ_USER_CLASS0": "iPXE",
    "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
}


def test_dnsmasq_add_carries_every_field() -> None:
    [c] = parse_hook(["add", MAC.upper(), "10.77.0.111", "pc1"], DNSMASQ_ADD_ENV, NOW)
    assert c.source == "dnsmasq"
    assert c.kind == "new"
    assert c.mac == MAC
    assert c.ip == "10.77.0.111"
    assert c.hostname == "pc1"
    assert c.expires == 1795642110
    assert c.server_ts == 1795642110 - 120  # dnsmasq's own clock
    assert c.arch == "bios"
    assert c.user_class == "iPXE"
    assert c.vendor_class == "PXEClient:Arch:00000:UNDI:002001"
    assert c.ts == NOW


def test_dnsmasq_arch_from_vendor_class_without_tag() -> None:
    env = {"DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00007:UNDI:003016", "DNSMASQ_TAGS": "vs"}
    [c] = parse_hook(["old", MAC, "10.77.0.111"], env, NOW)
    assert (c.kind, c.arch, c.hostname, c.user_class) == ("renew", "uefi-x64", None, None)
    assert c.server_ts == int(NOW)  # no server clock given: the hook's, in whole seconds


def test_dnsmasq_lease_from_its_lease_file_is_marked() -> None:
    # What dnsmasq 2.90 passes for a lease read back from its lease file at start-up.
    env = {
        "DNSMASQ_DATA_MISSING": "1",
        "DNSMASQ_LEASE_EXPIRES": "1795642110",
        "DNSMASQ_TIME_REMAINING": "100",
        "DNSMASQ_INTERFACE": "nbbr0",
    }
    [c] = parse_hook(["old", MAC, "10.77.0.111"], env, NOW)
    assert (c.kind, c.from_lease_file, c.arch, c.vendor_class) == ("renew", True, "unknown", None)
    [real] = parse_hook(["old", MAC, "10.77.0.111"], DNSMASQ_ADD_ENV, NOW)
    assert not real.from_lease_file
    assert not parse_hook(["add", MAC, "10.77.0.111"], env, NOW)[0].from_lease_file


def test_dnsmasq_del_is_release_while_time_is_left_and_expire_after() -> None:
    env = {"DNSMASQ_LEASE_EXPIRES": str(int(NOW) + 100)}
    assert parse_hook(["del", MAC, "10.77.0.111", "pc1"], env, NOW)[0].kind == "release"
    env = {"DNSMASQ_LEASE_EXPIRES": str(int(NOW) - 1)}
    assert parse_hook(["del", MAC, "10.77.0.111"], env, NOW)[0].kind == "expire"


@pytest.mark.parametrize("argv", [["tftp", "1234", "10.0.0.1", "/srv/x"], ["init"]])
def test_dnsmasq_calls_that_are_no_lease_change_are_ignored(argv: list[str]) -> None:
    assert parse_hook(argv, {}, NOW) == []


KEA_COMMIT_ENV = {
    "DELETED_LEASES4_SIZE": "0",
    "LEASES4_AT0_ADDRESS": "10.77.0.100",
    "LEASES4_AT0_CLIENT_ID": "01:52:54:00:12:34:56",
    "LEASES4_AT0_CLTT": "1795642024",
    "LEASES4_AT0_HOSTNAME": "pc2",
    "LEASES4_AT0_HWADDR": MAC,
    "LEASES4_AT0_HWADDR_TYPE": "1",
    "LEASES4_AT0_STATE": "default",
    "LEASES4_AT0_SUBNET_ID": "1",
    "LEASES4_AT0_VALID_LIFETIME": "120",
    "LEASES4_SIZE": "1",
    "QUERY4_CIADDR": "0.0.0.0",
    "QUERY4_TYPE": "DHCPREQUEST",
}


def test_kea_commit_new_and_renew_by_ciaddr() -> None:
    [c] = parse_hook(["leases4_committed"], KEA_COMMIT_ENV, NOW)
    assert (c.source, c.kind, c.mac, c.ip, c.hostname) == ("kea", "new", MAC, "10.77.0.100", "pc2")
    assert c.server_ts == 1795642024
    assert c.expires == 1795642024 + 120
    assert c.arch == "unknown"  # Kea exports no client options
    [r] = parse_hook(["leases4_committed"], {**KEA_COMMIT_ENV, "QUERY4_CIADDR": "10.77.0.100"}, NOW)
    assert r.kind == "renew"


def test_kea_release_expire_and_ignored_points() -> None:
    env = {
        "LEASE4_ADDRESS": "10.77.0.100",
        "LEASE4_HWADDR": MAC,
        "LEASE4_CLTT": "1795642025",
        "LEASE4_VALID_LIFETIME": "120",
        "QUERY4_TYPE": "DHCPRELEASE",
    }
    [rel] = parse_hook(["lease4_release"], env, NOW)
    assert (rel.kind, rel.server_ts) == ("release", int(NOW))
    [exp] = parse_hook(["lease4_expire"], env, NOW)
    assert exp.kind == "expire"
    assert parse_hook(["lease4_renew"], env, NOW) == []
    assert parse_hook(["leases4_committed"], {"LEASES4_SIZE": "0"}, NOW) == []


def test_isc_commit_with_unpadded_mac_and_option_93() -> None:
    argv = "isc commit 52:54:0:12:34:56 10.77.0.100 pc3 PXEClient:Arch:00007:UNDI:003016 iPXE 7 120"
    [c] = parse_hook([*argv.split(), "0.0.0.0"], {}, NOW)
    assert (c.source, c.kind, c.mac, c.ip) == ("isc", "new", MAC, "10.77.0.100")
    assert (c.hostname, c.arch, c.user_class) == ("pc3", "uefi-x64", "iPXE")
    assert c.expires == int(NOW) + 120
    [r] = parse_hook([*argv.split(), "10.77.0.100"], {}, NOW)
    assert r.kind == "renew"
    [rel] = parse_hook(["isc", "release", "52:54:0:12:34:56", "10.77.0.100"], {}, NOW)
    assert (rel.kind, rel.hostname, rel.arch) == ("release", None, "unknown")
    [e] = parse_hook(["isc", "expiry", "52:54:0:12:34:56", "10.77.0.100"], {}, NOW)
    assert e.kind == "expire"


@pytest.mark.parametrize(
    ("code", "arch"),
    [
        (0, "bios"),
        (6, "uefi-ia32"),
        (7, "uefi-x64"),
        (9, "uefi-x64"),
        (11, "uefi-arm64"),
        (2, "unknown"),
    ],
)
def test_arch_codes(code: int, arch: str) -> None:
    assert parse.arch_from_code(code) == arch
    assert parse.arch_from_vendor_class(f"PXEClient:Arch:{code:05d}:UNDI:003000") == arch


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "without arguments"),
        (["rm", "-rf", "/"], {}, "unrecognised hook call"),
        (["add", "52:54:00:12:34", "10.0.0.1"], {}, "invalid MAC"),
        (["add", "52:54:00:12:34:56:78", "10.0.0.1"], {}, "invalid MAC"),
        (["add", MAC, "10.0.0.300"], {}, "not an IPv4 address"),
        (["add", MAC, "fe80::1"], {}, "not an IPv4 address"),
        (["add", MAC], {}, "expected <mac> <ip>"),
        (["add", MAC, "10.0.0.1"], {"DNSMASQ_LEASE_EXPIRES": "soon"}, "not a number"),
        (["add", MAC, "10.0.0.1", "bad\x00name"], {}, "not printable"),
        (["add", MAC, "10.0.0.1"], {"DNSMASQ_VENDOR_CLASS": "x" * 300}, "not printable"),
        (["leases4_committed"], {"LEASES4_SIZE": "1"}, "HWADDR and"),
        (["lease4_frobnicate"], {}, "not one nixboot knows"),
        (["isc", "commit", "zz", "10.0.0.1"], {}, "invalid MAC"),
        (["isc", "party", MAC, "10.0.0.1"], {}, "isc: expected"),
        (["isc", "commit", MAC, "10.0.0.1", "", "", "", "seven"], {}, "not a number"),
    ],
)
def test_bad_input_is_rejected_clearly(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(BadLease, match=message):
        parse_hook(argv, env, NOW)


def test_http_fields_and_ids() -> None:
    c = parse.from_fields(
        mac=MAC, ip="10.0.0.5", kind="new", now=NOW, vendor_class="PXEClient:Arch:00011:UNDI:003016"
    )
    assert (c.source, c.arch, c.server_ts) == ("http", "uefi-arm64", int(NOW))
    with pytest.raises(BadLease, match="kind"):
        parse.from_fields(mac=MAC, ip="10.0.0.5", kind="borrow", now=NOW)
    with pytest.raises(BadLease, match="arch"):
        parse.from_fields(mac=MAC, ip="10.0.0.5", kind="new", arch="risc-v", now=NOW)
    # Same change told twice (later, by another path): same id; any field of the key differs: not.
    again = parse.from_fields(mac=MAC.upper(), ip="10.0.0.5", kind="new", now=NOW + 0.4)
    assert parse.change_id(c) == parse.change_id(again)
    renew = parse.from_fields(mac=MAC, ip="10.0.0.5", kind="renew", now=NOW)
    assert parse.change_id(c) != parse.change_id(renew)
    assert parse.order_key(c) < parse.order_key(again)
