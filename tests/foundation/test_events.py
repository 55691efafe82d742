from __future__ import annotations

import pytest

from nixboot_shared import events, subjects


def test_round_trip_keeps_type_and_fields() -> None:
    e = events.LeaseSeen(mac="52:54:00:AA:BB:CC", ip="10.0.0.9", arch="uefi-x64", boot_id="b1")
    back = events.decode(events.encode(e))
    assert isinstance(back, events.LeaseSeen)
    assert back == e
    assert back.v == events.SCHEMA_VERSION
    assert back.subject == "nixboot.evt.lease.52-54-00-aa-bb-cc"


def test_event_without_mac_uses_placeholder_token() -> None:
    e = events.WarmStarted(toplevel="/nix/store/x-y", paths=3)
    assert e.subject == "nixboot.evt.warm-started._"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"type":"nope"}',
        b'{"type":"lease","mac":"52:54:00:aa:bb:cc"}',
        b'{"type":"lease","mac":"zz:54:00:aa:bb:cc","ip":"10.0.0.1"}',
        b'{"type":"lease","ip":"10.0.0.1","extra":1}',
        b'{"type":"stage","stage":"dancing"}',
    ],
)
def test_bad_payloads_are_rejected_clearly(payload: bytes) -> None:
    with pytest.raises(events.BadEvent, match="undecodable event"):
        events.decode(payload)


@pytest.mark.parametrize(
    ("raw", "token"),
    [("52:54:00:AA:BB:CC", "52-54-00-aa-bb-cc"), ("525400aabbcc", "52-54-00-aa-bb-cc")],
)
def test_mac_tokens(raw: str, token: str) -> None:
    assert subjects.mac_token(raw) == token


@pytest.mark.parametrize("bad", ["", "52:54:00:aa:bb", "52:54:00:aa:bb:cc:dd", "52:54-00:aa:bb:cc"])
def test_invalid_macs(bad: str) -> None:
    with pytest.raises(subjects.InvalidMac):
        subjects.normalize_mac(bad)


def test_kernel_cmdline_mac_forms() -> None:
    from nixboot_shared import menu
    from nixboot_shared.records import Generation

    gen = Generation(
        number=1,
        toplevel="/nix/store/x-t",
        kernel="k",
        initrd="i",
        kernel_params="quiet",
        init="/i",
    )
    params = menu.BootParams(cache_url="http://c", public_key="k:1", boot_id="b", boot_token="t")
    assert "nixboot.mac=52:54:00:aa:bb:cc" in menu.kernel_cmdline(gen, params, "52-54-00-AA-BB-CC")
    unknown = menu.kernel_cmdline(gen, params, "unknown")
    assert "nixboot.mac" not in unknown and unknown.startswith("init=/i quiet ")
