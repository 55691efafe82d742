"""The whole boot, for real: QEMU (TCG) PXE-boots through dnsmasq and nixboot's services (dhcp-hook,
tftp, cache, builder on NATS/JetStream) in a network namespace; stage1.sh partitions the disk and
fetches the closure with real Nix from the cache; stage 2 reports `booted`.

The tests run in order on one VM disk (a lab machine keeps its disk between boots):
first boot -> same generation again -> new generation -> one-shot rollback -> pxelinux path ->
a disk with a foreign layout. What happened is read from the JetStream event stream and the
cache's metrics, as an operator would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from nixboot.vmlab.lab import BootResult, console_lines, new_disk
from tests.e2e.conftest import E2E, MAC

BOOT_TIMEOUT = 120.0  # per boot (TCG, a shared 2-core machine); a boot takes ~15-25 s here
MARKERS = ("NIXBOOT-INITRD", "NIXBOOT-STAGE2", "NIXBOOT-BOOTED")
ARTIFACTS = Path("/tmp/nixboot-e2e-artifacts")
SNPONLY = "/usr/lib/ipxe/snponly.efi"
STAGE_ORDER = ["stage1", "disk", "closure", "stage2", "booted"]
NAR_BYTES = "nixboot_cache_nar_bytes_total"

_state: dict[str, Any] = {}


class Boot:
    """One boot as the event stream tells it: the menu the VM booted from and its reports."""

    def __init__(self, result: BootResult, evts: list[dict[str, Any]], mac: str = MAC) -> None:
        self.result = result
        self.events = evts
        menus = [e for e in evts if e["type"] == "menu"]
        assert menus, f"no menu served for {mac}: {[e['type'] for e in evts]}"
        self.menu = menus[-1]
        self.boot_id: str = self.menu["boot_id"]
        self.reports = [
            e for e in evts if e["type"] == "stage" and e.get("boot_id") == self.boot_id
        ]

    def stage(self, stage: str, status: str = "done") -> dict[str, Any]:
        found = [r for r in self.reports if r["stage"] == stage and r["status"] == status]
        assert found, (
            f"no {stage}/{status} report among {[(r['stage'], r['status']) for r in self.reports]}"
        )
        return found[-1]


def _disk(e2e: E2E) -> Path:
    if "disk" not in _state:
        _state["disk"] = new_disk(e2e.work / "vm-disk.qcow2", "512M")
    path: Path = _state["disk"]
    return path


def _boot(
    e2e: E2E,
    name: str,
    expect_generation: int | None,
    disk: Path | None = None,
    *,
    uefi: bool = False,
    mac: str = MAC,
    expect_version: str | None = None,
) -> Boot:
    seq0 = e2e.stack.last_seq(mac)
    t0 = time.time()
    result = e2e.lab.boot(name, mac, disk or _disk(e2e), BOOT_TIMEOUT, MARKERS, uefi=uefi)
    ok = result.has("NIXBOOT-BOOTED") and not result.timed_out
    if not ok:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(e2e.lab.work / f"{name}.console.log", ARTIFACTS / f"{name}.console.log")
    assert ok, (
        f"{name} did not boot (timed out: {result.timed_out}); console kept in "
        f"{ARTIFACTS / (name + '.console.log')}:\n{result.console[-3000:]}"
    )
    boot = Boot(result, e2e.stack.events(seq0, mac), mac)
    _print_timeline(name, t0, boot)
    stage2 = console_lines(result.console, "NIXBOOT-STAGE2")
    version = expect_version or f"e2e-v{expect_generation}"
    assert stage2 and f"version={version}" in stage2[0], stage2
    if expect_generation is not None:
        assert boot.menu["default_generation"] == expect_generation, boot.menu
    assert boot.menu["fallback"] == (mac != MAC), boot.menu
    return boot


def _print_timeline(name: str, t0: float, boot: Boot) -> None:
    print(f"\n== {name}: {boot.result.seconds:.1f} s from QEMU start to power-off")
    for marker, secs in sorted(boot.result.marks.items(), key=lambda kv: kv[1]):
        print(f"   {secs:7.2f} s  console  {marker}")
    for e in boot.events:
        what = e["type"]
        if what == "stage":
            what = f"stage    {e['stage']:8} {e['status']:8} {e.get('detail', '')[:60]}"
            if e.get("seconds") is not None:
                what += f" took {e['seconds']} s"
            if e.get("bytes") is not None:
                what += f", {e['bytes']} bytes"
        elif what == "boot-file":
            what = f"boot-file {e['file_kind']:12} {e['file']} {e['bytes']} bytes {e['result']}"
        elif what == "menu":
            what = f"menu     {e['format']} default {e['default_generation']} boot {e['boot_id']}"
        elif what == "lease":
            what = f"lease    {e['lease_kind']} {e['ip']}"
        print(f"   {e['ts'] - t0:7.2f} s  event    {what}")
    starts = {r["stage"]: r["ts"] for r in boot.reports if r["status"] == "started"}
    ends = {r["stage"]: r["ts"] for r in boot.reports if r["status"] == "done"}
    per_stage = ", ".join(
        f"{s} {ends[s] - starts[s]:.2f} s" for s in STAGE_ORDER if s in starts and s in ends
    )
    menu_to_booted = ends.get("booted", boot.menu["ts"]) - boot.menu["ts"]
    print(f"   per stage: {per_stage or 'n/a'}; menu -> booted {menu_to_booted:.2f} s")


def _stages_in_order(boot: Boot) -> None:
    seen = [r["stage"] for r in boot.reports]
    firsts = [seen.index(s) for s in STAGE_ORDER if s in seen]
    assert [s for s in STAGE_ORDER if s in seen] == STAGE_ORDER, seen
    assert firsts == sorted(firsts), f"stages out of order: {seen}"


def _granted(lease: dict[str, Any]) -> float:
    """When the DHCP server granted a lease: its own clock when the hook had it, else when the
    hook ran."""
    ts: float = lease.get("server_ts") or lease["ts"]
    return ts


def _served_nar_bytes(e2e: E2E) -> float:
    return e2e.stack.metric(NAR_BYTES)


def test_first_boot_partitions_fetches_and_boots(e2e: E2E) -> None:
    before = _served_nar_bytes(e2e)
    boot = _boot(e2e, "boot1-first", expect_generation=1)
    _stages_in_order(boot)
    disk = boot.stage("disk")
    assert disk["detail"].startswith("created gpt/nixboot/ext4"), disk
    closure = boot.stage("closure")
    assert re.match(rf"fetched {len(e2e.gen1.paths)} paths", closure["detail"]), closure
    # NAR bytes of what was fetched: exactly the closure's size in the store
    assert closure["bytes"] == sum(e2e.gen1.paths.values()), closure
    served = _served_nar_bytes(e2e) - before
    print(f"   cache served {served:.0f} compressed NAR bytes (closure NAR {closure['bytes']})")
    assert 0 < served < closure["bytes"]
    # The machine's story in JetStream, in order: lease, menu, stage reports stage1..booted,
    # all of one boot id (the menu's, carried on the kernel command line).
    # The lease script runs in parallel with the boot (and the dhcp-hook is a Python start-up
    # on a loaded machine): JetStream may store the lease after the menu. The DHCP server's own
    # clock (server_ts, whole seconds) says when the lease was granted.
    kinds = [e["type"] for e in boot.events]
    assert "lease" in kinds, kinds
    assert _granted(boot.events[kinds.index("lease")]) <= boot.menu["ts"], boot.events
    after_menu = boot.events[kinds.index("menu") :]
    stages = [e["stage"] for e in after_menu if e["type"] == "stage"]
    assert [s for s in stages if s in STAGE_ORDER][:1] == ["stage1"], stages
    assert {e["boot_id"] for e in after_menu if e["type"] == "stage"} == {boot.boot_id}
    assert all(e["mac"] == MAC for e in boot.events)
    _timeline_shows(e2e, boot)


# The cache's boot tracker (nixboot_cache.timeline): every stage, on the BIOS iPXE path too, where
# the boot program is the cache's boot.ipxe, asked for over HTTP right after DHCP.
IPXE_TIMELINE = [
    "dhcp",
    "bootloader",
    "menu",
    "kernel",
    "initrd",
    "stage1",
    "closure",
    "activation",
]


def _timeline_shows(e2e: E2E, boot: Boot) -> None:
    """GET <cache>/boots/<mac>/timeline: this boot, booted, every stage in order, one boot id."""
    deadline = time.monotonic() + 15
    while True:  # the tracker consumes the stream asynchronously
        sessions = e2e.stack.timeline(MAC)["boots"]
        last = sessions[-1] if sessions else {}
        if last.get("result") == "booted" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"   timeline: {[(s['stage'], round(s['seconds'], 2)) for s in last['stages']]}")
    assert last["boot_id"] == boot.boot_id and last["result"] == "booted", last
    stages = [s["stage"] for s in last["stages"]]
    assert stages == IPXE_TIMELINE, stages
    starts = [s["start"] for s in last["stages"]]
    assert starts == sorted(starts), last["stages"]
    assert all(s["end"] >= s["start"] for s in last["stages"]), last["stages"]
    ids = {e["boot_id"] for e in last["events"] if e.get("boot_id")}
    assert ids == {boot.boot_id}, ids
    kinds = {e["type"] for e in last["events"]}
    assert {"lease", "menu", "boot-file", "stage"} <= kinds, kinds
    programs = [e for e in last["events"] if e.get("file_kind") == "boot-program"]
    assert [(e["file"], e["protocol"]) for e in programs] == [("boot.ipxe", "http")], programs
    assert last["seconds"] is not None and last["seconds"] > 0, last
    # The operator's view: `nixboot timeline <mac>` (reads the tracker's KV state).
    shown = json.loads(e2e.stack.nixboot("timeline", MAC, "--json"))
    assert shown["boot_id"] == boot.boot_id and shown["result"] == "booted", shown
    assert [s["stage"] for s in shown["stages"]] == IPXE_TIMELINE, shown["stages"]
    assert [s["start"] for s in shown["stages"]] == sorted(s["start"] for s in shown["stages"])
    print(e2e.stack.nixboot("timeline", MAC))


def test_second_boot_keeps_disk_and_store(e2e: E2E) -> None:
    before = _served_nar_bytes(e2e)
    boot = _boot(e2e, "boot2-same", expect_generation=1)
    assert boot.stage("disk")["detail"].startswith("kept gpt/nixboot/ext4"), boot.reports
    closure = boot.stage("closure")
    assert closure["detail"].startswith("fetched 0 paths"), closure
    assert closure["bytes"] == 0
    assert _served_nar_bytes(e2e) - before == 0


def test_new_generation_fetches_only_changed_paths(e2e: E2E) -> None:
    e2e.stack.set_knob("v2")
    gen2 = e2e.stack.build()
    assert gen2.number == 2
    e2e.gen2 = gen2
    changed = set(gen2.paths) - set(e2e.gen1.paths)
    changed_nar = sum(gen2.paths[p] for p in changed)
    before = _served_nar_bytes(e2e)
    boot = _boot(e2e, "boot3-gen2", expect_generation=2)
    assert boot.menu["generations"] == [2, 1], boot.menu
    assert boot.stage("disk")["detail"].startswith("kept"), boot.reports
    closure = boot.stage("closure")
    assert closure["detail"].startswith(f"fetched {len(changed)} paths"), (closure, changed)
    assert closure["bytes"] == changed_nar, (closure, changed_nar)
    served = _served_nar_bytes(e2e) - before
    print(
        f"   changed paths {len(changed)}: NAR {changed_nar} bytes; cache served {served:.0f} "
        f"compressed bytes; full closure NAR {sum(gen2.paths.values())} bytes"
    )
    assert 0 < served <= changed_nar
    assert served < sum(gen2.paths.values()) / 20


def test_one_shot_rollback_then_back_to_newest(e2e: E2E) -> None:
    e2e.stack.pin_once(1)
    assert e2e.stack.generations()["next_boot"] == 1
    _boot(e2e, "boot4-rollback", expect_generation=1)
    assert e2e.stack.generations()["next_boot"] is None
    _boot(e2e, "boot5-after-rollback", expect_generation=2)


def test_pxelinux_path_one_shot_rollback(e2e: E2E) -> None:
    """lpxelinux from the tftp service, menu over TFTP, kernel over HTTP; with a one-shot pin,
    which must survive menu.c32 reading the menu file a second time in the same boot."""
    e2e.stack.restart_dhcp(pxelinux=True)
    try:
        e2e.stack.pin_once(1)
        boot = _boot(e2e, "boot6-pxelinux-rollback", expect_generation=1)
        _stages_in_order(boot)
        assert "PXELINUX" in boot.result.console
        assert boot.menu["format"] == "pxelinux", boot.menu
        assert e2e.stack.generations()["next_boot"] is None
        files = [(e["file_kind"], e["file"]) for e in boot.events if e["type"] == "boot-file"]
        assert ("boot-program", "lpxelinux.0") in files, files
        # lease, boot program, menu, reports: one boot id from the menu file to `booted`
        kinds = [e["type"] for e in boot.events]
        first_program = next(
            i for i, e in enumerate(boot.events) if e.get("file_kind") == "boot-program"
        )
        assert first_program < kinds.index("menu"), kinds
        lease = boot.events[kinds.index("lease")]
        assert _granted(lease) <= boot.events[first_program]["ts"], boot.events
        menu_files = [
            e for e in boot.events if e["type"] == "boot-file" and e["file_kind"] == "menu"
        ]
        assert menu_files and {e["boot_id"] for e in menu_files} == {boot.boot_id}, menu_files
        assert {m["boot_id"] for m in boot.events if m["type"] == "menu"} == {boot.boot_id}
    finally:
        e2e.stack.restart_dhcp(pxelinux=False)


def test_disk_with_another_layout_is_repartitioned(e2e: E2E) -> None:
    """A disk whose layout differs (an MBR table, no filesystem) is made to match; after the
    pxelinux one-shot boot, the newest generation is the default again."""
    raw = e2e.work / "foreign-disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(512 * 1024 * 1024)
    subprocess.run(["sfdisk", "-q", str(raw)], input=b"label: dos\ntype=83\n", check=True)
    boot = _boot(e2e, "boot7-foreign-disk", expect_generation=2, disk=raw)
    disk = boot.stage("disk")
    assert disk["detail"].startswith("created gpt/nixboot/ext4"), disk
    assert "partition table is 'dos', declared 'gpt'" in disk["detail"], disk
    dump = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True, check=True)
    assert "label: gpt" in dump.stdout and 'name="nixboot"' in dump.stdout, dump.stdout


def test_uefi_firmware_pxe_snponly_then_ipxe_over_http(e2e: E2E) -> None:
    """OVMF's own PXE (no NIC option ROM): DHCP says snponly.efi (client arch 7, the shipped
    dnsmasq config), fetched from nixboot's TFTP service (OVMF asks windowsize=4); iPXE then
    gets the cache's boot.ipxe (user class iPXE), its menu and kernel/initrd over HTTP (the EFI
    stub needs ``initrd=<name>`` on the command line). Not observed here: the TFTP options
    OVMF negotiated (the service does not report them)."""
    boot = _boot(e2e, "boot8-uefi", expect_generation=2, uefi=True)
    _stages_in_order(boot)
    console = boot.result.console
    assert 'starting Boot0001 "UEFI PXEv4' in console, console[:2000]
    assert "EFI stub: Loaded initrd from command line option" in console
    leases = [e for e in boot.events if e["type"] == "lease"]
    assert leases and leases[0]["arch"] == "uefi-x64", leases
    files = [
        (e["file_kind"], e["file"], e["protocol"], e["result"])
        for e in boot.events
        if e["type"] == "boot-file"
    ]
    assert ("boot-program", "snponly.efi", "tftp", "ok") in files, files
    # OVMF first asks for the size (tsize) and aborts that transfer, then fetches the file.
    snp = [e for e in boot.events if e["type"] == "boot-file" and e["file"] == "snponly.efi"]
    ok = [e for e in snp if e["result"] == "ok"]
    assert len(ok) == 1 and ok[0]["bytes"] == Path(SNPONLY).stat().st_size, snp
    assert boot.menu["format"] == "ipxe", boot.menu
    # On this path the lease script runs in the same millisecond as OVMF's first TFTP request,
    # so JetStream may store them either way round: order by the events' own times.
    assert _granted(leases[0]) <= ok[0]["ts"] < boot.menu["ts"], (leases, snp, boot.menu)
    http_files = {(f[0], f[2]) for f in files}
    assert {("kernel", "http"), ("initrd", "http")} <= http_files, files


UNKNOWN_MAC = "52:54:00:13:00:99"


def test_unknown_machine_boots_the_fallback(e2e: E2E) -> None:
    """An unregistered MAC gets the deployment's fallback configuration (fallback_attr, built by
    ``nixboot build --all``): its menu, its system (version e2e-fallback), and the event stream
    says so (MenuServed.fallback); the registered machine's generations are untouched."""
    before = e2e.stack.generations()
    e2e.stack.build_all()
    boot = _boot(
        e2e,
        "boot9-unknown",
        expect_generation=None,
        mac=UNKNOWN_MAC,
        expect_version="e2e-fallback",
    )
    assert boot.menu["fallback"] is True and boot.menu["generations"], boot.menu
    assert boot.menu["mac"] == UNKNOWN_MAC
    _stages_in_order(boot)
    assert all(r["mac"] == UNKNOWN_MAC for r in boot.reports)
    assert any(e["type"] == "lease" for e in boot.events), boot.events
    after = e2e.stack.generations()
    assert [g["number"] for g in after["generations"]] == [
        g["number"] for g in before["generations"]
    ], (before, after)
