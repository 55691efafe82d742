"""The pure boot-session state machine: stages from events in any order, with duplicates."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixboot_cache.timeline import session as se
from nixboot_shared import events as ev
from tests.observe.observe_bootgen import boot_events, ipxe_boot_events

MAC = "52:54:00:12:34:56"
RULES = se.Rules(gap_seconds=900, abandon_seconds=600)


def boot(
    t0: float, gaps: list[float], boot_id: str, report_seconds: bool
) -> tuple[list[ev.AnyEvent], dict[str, float]]:
    return boot_events(MAC, t0, gaps, boot_id, report_seconds)


gaps_st = st.lists(st.floats(min_value=0.001, max_value=200.0), min_size=11, max_size=11)


def feed(events: list[ev.AnyEvent], keep: int = 5) -> se.MachineBoots:
    state = se.MachineBoots(mac=MAC)
    for e in events:
        se.add_event(state, e, RULES, keep)
    return state


def durations(s: se.Session) -> dict[str, float]:
    d = {iv.stage: iv.seconds for iv in se.stages(s)}
    tot = se.total(s)
    if tot is not None:
        d["total"] = tot.seconds
    return d


@settings(max_examples=150, deadline=None)
@given(
    gaps=gaps_st,
    report_seconds=st.booleans(),
    t0=st.floats(min_value=1.7e9, max_value=1.8e9),
    data=st.data(),
)
def test_any_order_with_duplicates_gives_one_correct_timeline(
    gaps: list[float], report_seconds: bool, t0: float, data: st.DataObject
) -> None:
    events, expected = boot(t0, gaps, "b1", report_seconds)
    order = data.draw(st.permutations(events))
    dups = data.draw(st.lists(st.sampled_from(events), max_size=4))
    state = feed(list(order) + dups)
    sessions = se.segment(state.events, RULES)
    assert len(sessions) == 1
    assert len(sessions[0].events) == len(events)
    got = durations(sessions[0])
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    assert sessions[0].result(now=t0 + 1e6, rules=RULES, superseded=False) == "booted"
    out = se.settled(state, now=t0 + sum(gaps), rules=RULES, settle_seconds=30)
    assert [(o.result, len(o.stages)) for o in out] == [("booted", 8)]
    assert se.settled(state, now=t0 + 1e6, rules=RULES, settle_seconds=30) == []


@settings(max_examples=80, deadline=None)
@given(g1=gaps_st, g2=gaps_st, pause=st.floats(min_value=0.5, max_value=800), data=st.data())
def test_two_boots_in_any_order_are_two_sessions(
    g1: list[float], g2: list[float], pause: float, data: st.DataObject
) -> None:
    t0 = 1.75e9
    first, exp1 = boot(t0, g1, "b1", True)
    second, exp2 = boot(first[-1].ts + pause, g2, "b2", True)
    state = feed(data.draw(st.permutations(first + second)))
    sessions = se.segment(state.events, RULES)
    assert [s.boot_id for s in sessions] == ["b1", "b2"]
    for s, exp in zip(sessions, (exp1, exp2), strict=True):
        assert durations(s) == pytest.approx(exp, abs=1e-6)
    assert [o.result for o in se.settled(state, t0 + 1e5, RULES, 30)] == ["booted", "booted"]


def test_reboot_mid_boot_abandons_the_first_and_moves_its_lease_along() -> None:
    t0 = 1.75e9
    first, _ = boot(t0, [1.0] * 11, "b1", True)
    partial = first[:4]  # got as far as the kernel, then the machine was reset
    second, exp2 = boot(t0 + 60, [2.0] * 11, "b2", True)
    events = partial + second
    random.Random(7).shuffle(events)
    state = feed(events)
    sessions = se.segment(state.events, RULES)
    assert [s.boot_id for s in sessions] == ["b1", "b2"]
    assert len(sessions[1].events) == len(second)
    assert durations(sessions[1]) == pytest.approx(exp2)
    results = [(o.result, o.total is not None) for o in se.settled(state, t0 + 100, RULES, 30)]
    assert results == [("abandoned", False), ("booted", True)]


def test_gap_starts_a_new_session_and_the_stale_one_is_abandoned_only_after_the_timeout() -> None:
    t0 = 1.75e9
    first, _ = boot(t0, [1.0] * 11, "b1", True)
    state = feed(first[:5])
    assert se.settled(state, t0 + 599, RULES, 30) == []
    [out] = se.settled(state, t0 + 700, RULES, 30)
    assert out.result == "abandoned" and out.total is None
    # The machine comes back much later without a boot id on its first events.
    late_lease = ev.LeaseSeen(mac=MAC, ts=t0 + 2000, ip="10.0.0.5")
    se.add_event(state, late_lease, RULES, 5)
    assert len(se.segment(state.events, RULES)) == 2


def test_failed_boot_is_counted_failed_and_a_new_lease_starts_over() -> None:
    t0 = 1.75e9
    first, _ = boot(t0, [1.0] * 11, "b1", True)
    failed = ev.StageReported(mac=MAC, boot_id="b1", ts=t0 + 8.5, stage="closure", status="failed")
    state = feed([*first[:7], failed, ev.LeaseSeen(mac=MAC, ts=t0 + 20, ip="10.0.0.5")])
    sessions = se.segment(state.events, RULES)
    assert len(sessions) == 2
    assert sessions[0].current_stage() == "failed"
    outs = se.settled(state, t0 + 100, RULES, 30)
    assert [o.result for o in outs] == ["failed"]  # the lease alone is no boot yet


def test_lease_renewals_of_a_running_machine_are_not_boots() -> None:
    t0 = 1.75e9
    first, _ = boot(t0, [1.0] * 11, "b1", True)
    renew = ev.LeaseSeen(mac=MAC, ts=t0 + 300, ip="10.0.0.5", lease_kind="renew")
    release = ev.LeaseSeen(mac=MAC, ts=t0 + 301, ip="10.0.0.5", lease_kind="release")
    assert not se.is_boot_event(release)
    state = feed([*first, renew])
    assert [o.result for o in se.settled(state, t0 + 1e5, RULES, 30)] == ["booted"]


def test_old_sessions_are_dropped_and_events_older_than_them_ignored() -> None:
    t0 = 1.75e9
    boots = [boot(t0 + i * 100, [1.0] * 11, f"b{i}", True)[0] for i in range(3)]
    state = feed([e for b in boots for e in b], keep=2)
    assert state.first_boot == 2
    assert {s.boot_id for s in se.segment(state.events, RULES)} == {"b1", "b2"}
    assert not se.add_event(state, boots[0][0], RULES, 2)
    assert not se.add_event(state, boots[2][0], RULES, 2)  # duplicate


def test_settle_waits_for_late_transfers_then_gives_up() -> None:
    t0 = 1.75e9
    events, _ = boot(t0, [1.0] * 11, "b1", True)
    kernel = events.pop(3)  # the kernel transfer event arrives late
    state = feed(events)
    booted_at = events[-1].ts
    assert se.settled(state, booted_at + 5, RULES, settle_seconds=30) == []
    se.add_event(state, kernel, RULES, 5)
    [out] = se.settled(state, booted_at + 6, RULES, settle_seconds=30)
    assert len(out.stages) == 8


def test_current_stage_follows_progress() -> None:
    t0 = 1.75e9
    events, _ = boot(t0, [1.0] * 11, "b1", True)
    seen = [se.segment(events[: i + 1], RULES)[0].current_stage() for i in range(len(events))]
    assert seen == [
        # the initrd's end is stage 1's start
        "dhcp", "bootloader", "menu", "kernel", "stage1", "stage1", "closure", "activation",
        "booted",
    ]  # fmt: skip


def test_menu_fetched_twice_before_the_kernel_is_one_boot() -> None:
    t0 = 1.75e9
    events, expected = boot(t0, [1.0] * 11, "b1", True)
    again = ev.MenuServed(mac=MAC, boot_id="b2", ts=t0 + 3.5, format="pxelinux", client="x")
    # The machine booted from the second menu: its reports carry that menu's boot id.
    later = [
        msgspec.structs.replace(e, boot_id="b2") if e.boot_id == "b1" and e.ts > t0 + 3.5 else e
        for e in events
    ]
    state = feed([*later, again])
    [s] = se.segment(state.events, RULES)
    assert s.boot_ids == ["b1", "b2"]
    got = durations(s)
    assert got == pytest.approx(expected)


def test_an_abandoned_boot_without_boot_id_is_counted_once_despite_a_late_earlier_event() -> None:
    t0 = 1.75e9
    events, _ = boot(t0, [1.0] * 11, "b1", True)
    lease, bp = events[0], events[1]
    state = feed([bp])
    assert [o.result for o in se.settled(state, t0 + 1000, RULES, 30)] == ["abandoned"]
    se.add_event(state, lease, RULES, 5)  # arrives late, becomes the session's first event
    assert se.settled(state, t0 + 1000, RULES, 30) == []


# -- the iPXE path: boot.ipxe over HTTP is the boot program; the lease may be stamped after it --


def ipxe(t0: float, boot_id: str, lease_at: float) -> tuple[list[ev.AnyEvent], dict[str, float]]:
    return ipxe_boot_events(MAC, t0, boot_id, lease_at)


def in_order(s: se.Session) -> list[str]:
    ivs = se.stages(s)
    starts = [iv.start for iv in ivs]
    assert starts == sorted(starts), ivs
    assert all(iv.end >= iv.start for iv in ivs), ivs
    return [iv.stage for iv in ivs]


@settings(max_examples=100, deadline=None)
@given(
    lease_at=st.sampled_from([-0.5, -0.02, 0.0, 0.003, 0.05, 0.4, 1.3]),
    previous=st.booleans(),
    data=st.data(),
)
def test_ipxe_path_any_order_and_a_late_lease_give_every_stage(
    lease_at: float, previous: bool, data: st.DataObject
) -> None:
    """The lease stamped before boot.ipxe, at the same time, after it, even after the menu (the
    DHCP server's script ran late), delivered in any order, with or without a booted boot
    before: one session with all eight stages in boot order."""
    t0 = 1.75e9
    events, expected = ipxe(t0 + 100, "b2", lease_at)
    before = ipxe(t0, "b1", -0.02)[0] if previous else []
    order = data.draw(st.permutations(before + events))
    state = feed(list(order))
    sessions = se.segment(state.events, RULES)
    assert [s.boot_id for s in sessions] == (["b1", "b2"] if previous else ["b2"])
    last = sessions[-1]
    assert len(last.events) == len(events)
    assert in_order(last) == list(se.STAGES)
    assert durations(last) == pytest.approx(expected, abs=1e-6)
    assert durations(last)["dhcp"] == pytest.approx(max(0.0, -lease_at), abs=1e-6)


def test_ipxe_late_lease_wins_over_the_running_systems_renewal() -> None:
    """The system that ran renewed its lease 5 minutes before the reboot: that renewal is not
    the boot's lease, the late one is (dhcp 0 s, not 300 s)."""
    t0 = 1.75e9
    first, _ = ipxe(t0, "b1", -0.02)
    renewal = ev.LeaseSeen(mac=MAC, ts=t0 + 400, ip="10.0.0.7", lease_kind="renew")
    second, expected = ipxe(t0 + 700, "b2", 0.08)
    state = feed([*first, renewal, *second])
    last = se.segment(state.events, RULES)[-1]
    assert last.boot_id == "b2"
    assert in_order(last) == list(se.STAGES)
    assert durations(last) == pytest.approx(expected, abs=1e-6)
    # ...while a boot's own lease a few seconds before its request stays the lease.
    slow_firmware, expected = ipxe(t0 + 2000, "b3", -4.0)
    state = feed([*first, *slow_firmware])
    assert durations(se.segment(state.events, RULES)[-1])["dhcp"] == pytest.approx(4.0)


def test_ipxe_reboot_mid_boot_moves_boot_ipxe_and_its_late_lease_along() -> None:
    """A boot that got as far as the initrd, then a reset: the next boot's boot.ipxe and its late
    lease (no boot id yet) begin the new session, not the abandoned one; also when the lease
    comes after the menu."""
    t0 = 1.75e9
    for lease_at in (0.05, 0.35):
        first, _ = ipxe(t0, "b1", -0.02)
        partial = first[:5]
        second, expected = ipxe(t0 + 60, "b2", lease_at)
        events = partial + second
        random.Random(3).shuffle(events)
        state = feed(events)
        sessions = se.segment(state.events, RULES)
        assert [s.boot_id for s in sessions] == ["b1", "b2"], lease_at
        assert len(sessions[0].events) == len(partial)
        assert in_order(sessions[1]) == list(se.STAGES)
        assert durations(sessions[1]) == pytest.approx(expected, abs=1e-6)
        results = [o.result for o in se.settled(state, t0 + 1000, RULES, 30)]
        assert results == ["abandoned", "booted"]


def test_uefi_snponly_then_boot_ipxe_times_dhcp_from_the_first_boot_program() -> None:
    """UEFI firmware PXE: lease, snponly.efi over TFTP, iPXE's own DHCP (a second lease) and
    boot.ipxe: dhcp ends at snponly.efi, bootloader runs from there to the menu."""
    t0 = 1.75e9
    lease1 = ev.LeaseSeen(mac=MAC, ts=t0, ip="10.0.0.7", arch="uefi-x64")
    snp = ev.BootFileRequested(
        mac=MAC, ts=t0 + 1.5, seconds=1.2, file="snponly.efi", file_kind="boot-program",
        client="10.0.0.7",
    )  # fmt: skip
    rest, _ = ipxe(t0 + 3.0, "b1", 0.05)  # iPXE's lease, stamped after boot.ipxe
    state = feed([lease1, snp, *rest])
    [s] = se.segment(state.events, RULES)
    assert in_order(s) == list(se.STAGES)
    got = durations(s)
    assert got["dhcp"] == pytest.approx(0.3)  # lease -> snponly.efi requested
    assert got["bootloader"] == pytest.approx(3.3 - 0.3)  # snponly.efi -> the iPXE menu


def test_stage1_dhcp_lease_is_not_taken_for_a_late_boot_lease() -> None:
    """Without any lease near boot.ipxe, the initrd's DHCP request (after the kernel was asked
    for) is not the boot's lease: no dhcp stage rather than a wrong one."""
    t0 = 1.75e9
    events, _ = ipxe(t0, "b1", -0.02)
    stage1_lease = ev.LeaseSeen(mac=MAC, ts=t0 + 2.5, ip="10.0.0.7", lease_kind="renew")
    state = feed([*events[1:], stage1_lease])  # the boot's own lease never arrived
    [s] = se.segment(state.events, RULES)
    assert "dhcp" not in durations(s) and "bootloader" in durations(s)


def test_ipxe_late_lease_timeline_view_starts_at_its_first_stage() -> None:
    """The boot.ipxe event is stamped at its transfer's end and the late lease after it: the
    view (HTTP API, ``nixboot timeline``) starts at the first stage, so no stage starts at a
    negative offset in the waterfall."""
    from rich.console import Console

    from nixboot_cache.timeline import views
    from nixboot_cache.timeline.cli import print_waterfall

    t0 = 1.75e9
    events, _ = ipxe(t0, "b1", 0.05)
    [view] = views.machine_timeline(feed(events), t0 + 1000, RULES, boots=1)
    assert view["start"] == view["stages"][0]["start"] == t0 < min(e.ts for e in events)
    console = Console(width=100, record=True)
    print_waterfall(MAC, view, console)
    text = console.export_text()
    assert "+-" not in text and "│ dhcp       │  +0.00 │   0.000 │" in text, text
