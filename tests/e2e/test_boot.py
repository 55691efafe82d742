"""The whole boot, for real: QEMU (TCG) PXE-boots through dnsmasq and the nixboot boot server in
a network namespace, stage1.sh partitions the disk and fetches the closure with real Nix, stage 2
reports `booted`.

The tests run in order on one VM disk (a lab machine keeps its disk between boots):
first boot -> same generation again -> new generation -> one-shot rollback -> pxelinux path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E
from tests.e2e.lab import BootResult, console_lines, new_disk
from tests.e2e.stack import now

MAC = "52:54:00:13:00:01"
BOOT_TIMEOUT = 120.0  # per boot (TCG, a shared 2-core machine); a boot takes ~25 s here
MARKERS = ("NIXBOOT-INITRD", "NIXBOOT-STAGE2", "NIXBOOT-BOOTED")
ARTIFACTS = Path("/tmp/nixboot-e2e-artifacts")
STAGE_ORDER = ["stage1", "disk", "closure", "stage2", "booted"]

_state: dict[str, Any] = {}


def _disk(e2e: E2E) -> Path:
    if "disk" not in _state:
        _state["disk"] = new_disk(e2e.work / "vm-disk.qcow2", "512M")
    path: Path = _state["disk"]
    return path


def _boot(
    e2e: E2E, name: str, expect_generation: int, disk: Path | None = None
) -> tuple[BootResult, list[dict[str, Any]]]:
    t0 = now()
    result = e2e.lab.boot(name, MAC, disk or _disk(e2e), BOOT_TIMEOUT, MARKERS)
    menus = e2e.stack.menus(t0)
    boot_ids = {m["boot_id"] for m in menus}
    reports = [r for b in boot_ids for r in e2e.stack.reports(b)]
    reports.sort(key=lambda r: r["ts"])
    _print_timeline(name, t0, result, reports)
    ok = result.has("NIXBOOT-BOOTED") and not result.timed_out
    if not ok:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(e2e.lab.work / f"{name}.console.log", ARTIFACTS / f"{name}.console.log")
    assert ok, (
        f"{name} did not boot (timed out: {result.timed_out}); console kept in "
        f"{ARTIFACTS / (name + '.console.log')}:\n{result.console[-3000:]}"
    )
    stage2 = console_lines(result.console, "NIXBOOT-STAGE2")
    assert stage2 and f"version=e2e-v{expect_generation}" in stage2[0], stage2
    return result, reports


def _print_timeline(
    name: str, t0: float, result: BootResult, reports: list[dict[str, Any]]
) -> None:
    print(f"\n== {name}: {result.seconds:.1f} s from QEMU start to power-off")
    for marker, secs in sorted(result.marks.items(), key=lambda kv: kv[1]):
        print(f"   {secs:7.2f} s  console  {marker}")
    for r in reports:
        extra = ""
        if r.get("seconds") is not None:
            extra += f" took {r['seconds']} s"
        if r.get("bytes") is not None:
            extra += f", {r['bytes']} bytes"
        print(
            f"   {r['ts'] - t0:7.2f} s  report   {r['stage']:8} {r['status']:8} "
            f"{r.get('detail', '')[:70]}{extra}"
        )


def _stage(reports: list[dict[str, Any]], stage: str, status: str = "done") -> dict[str, Any]:
    found = [r for r in reports if r["stage"] == stage and r["status"] == status]
    assert found, f"no {stage}/{status} report among {[(r['stage'], r['status']) for r in reports]}"
    return found[-1]


def _stages_in_order(reports: list[dict[str, Any]]) -> None:
    seen = [r["stage"] for r in reports]
    firsts = [seen.index(s) for s in STAGE_ORDER if s in seen]
    assert [s for s in STAGE_ORDER if s in seen] == STAGE_ORDER, seen
    assert firsts == sorted(firsts), f"stages out of order: {seen}"


def test_first_boot_partitions_fetches_and_boots(e2e: E2E) -> None:
    e2e.stack.set_generations(MAC, [e2e.gen1.record(1)])
    _, reports = _boot(e2e, "boot1-first", expect_generation=1)
    _stages_in_order(reports)
    disk = _stage(reports, "disk")
    assert disk["detail"].startswith("created gpt/nixboot/ext4"), disk
    closure = _stage(reports, "closure")
    assert re.match(rf"fetched {len(e2e.gen1.paths)} paths", closure["detail"]), closure
    # NAR bytes of what was fetched, exactly the closure's size
    assert closure["bytes"] == sum(e2e.gen1.paths.values()), closure
    assert all(r["token"] == "t" + r["boot_id"] for r in reports)


def test_second_boot_keeps_disk_and_store(e2e: E2E) -> None:
    t0 = now()
    _, reports = _boot(e2e, "boot2-same", expect_generation=1)
    disk = _stage(reports, "disk")
    assert disk["detail"].startswith("kept gpt/nixboot/ext4"), disk
    closure = _stage(reports, "closure")
    assert closure["detail"].startswith("fetched 0 paths"), closure
    assert closure["bytes"] == 0
    assert e2e.stack.nar_bytes(t0) == 0


def test_new_generation_fetches_only_changed_paths(e2e: E2E) -> None:
    e2e.stack.set_generations(MAC, [e2e.gen1.record(1), e2e.gen2.record(2)])
    changed = set(e2e.gen2.paths) - set(e2e.gen1.paths)
    changed_nar = sum(e2e.gen2.paths[p] for p in changed)
    t0 = now()
    _, reports = _boot(e2e, "boot3-gen2", expect_generation=2)
    menus = e2e.stack.menus(t0)
    assert menus and menus[0]["default"] == 2
    assert _stage(reports, "disk")["detail"].startswith("kept"), reports
    closure = _stage(reports, "closure")
    assert closure["detail"].startswith(f"fetched {len(changed)} paths"), (closure, changed)
    assert closure["bytes"] == changed_nar, (closure, changed_nar)
    served = e2e.stack.nar_bytes(t0)
    print(
        f"   changed paths {len(changed)}: NAR {changed_nar} bytes; cache served {served} "
        f"compressed bytes; full closure NAR {sum(e2e.gen2.paths.values())} bytes"
    )
    assert 0 < served <= changed_nar
    assert served < sum(e2e.gen2.paths.values()) / 20


def test_one_shot_rollback_then_back_to_newest(e2e: E2E) -> None:
    e2e.stack.pin_once(MAC, 1)
    t0 = now()
    _boot(e2e, "boot4-rollback", expect_generation=1)
    assert e2e.stack.menus(t0)[0]["default"] == 1
    t1 = now()
    _boot(e2e, "boot5-after-rollback", expect_generation=2)
    assert e2e.stack.menus(t1)[0]["default"] == 2


@pytest.mark.parametrize("path", ["lpxelinux-http"])
def test_pxelinux_path_boots(e2e: E2E, path: str) -> None:
    e2e.stack.restart_dhcp(pxelinux=True)
    try:
        boot_id = e2e.stack.write_pxelinux_menu(MAC)
        result, _ = _boot(e2e, "boot6-pxelinux", expect_generation=2)
        reports = e2e.stack.reports(boot_id)
        _stages_in_order(reports)
        assert "PXELINUX" in result.console
    finally:
        e2e.stack.restart_dhcp(pxelinux=False)


def test_disk_with_another_layout_is_repartitioned(e2e: E2E) -> None:
    """A disk whose layout differs (an MBR table, no filesystem) is made to match."""
    raw = e2e.work / "foreign-disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(512 * 1024 * 1024)
    subprocess.run(["sfdisk", "-q", str(raw)], input=b"label: dos\ntype=83\n", check=True)
    _, reports = _boot(e2e, "boot7-foreign-disk", expect_generation=2, disk=raw)
    disk = _stage(reports, "disk")
    assert disk["detail"].startswith("created gpt/nixboot/ext4"), disk
    assert "partition table is 'dos', declared 'gpt'" in disk["detail"], disk
    dump = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True, check=True)
    assert "label: gpt" in dump.stdout and 'name="nixboot"' in dump.stdout, dump.stdout
