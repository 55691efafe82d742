"""Events of one simulated boot, as the services publish them, and the stages they must give."""

from __future__ import annotations

from nixboot_shared import events as ev


def boot_events(
    mac: str, t0: float, gaps: list[float], boot_id: str, report_seconds: bool = True
) -> tuple[list[ev.AnyEvent], dict[str, float]]:
    """One boot from 11 increasing gaps: lease, boot program, menu, kernel, initrd, stage 1,
    disk, closure, booted. Returns the events and the expected stage durations."""
    t = [t0]
    for g in gaps:
        t.append(t[-1] + g)
    (lease, bp_req, bp_end, menu, k_req, k_end, i_req, i_end, s1, disk, closure, booted) = t

    def transfer(kind: str, req: float, end: float, bid: str | None) -> ev.BootFileRequested:
        proto = "tftp" if kind == "boot-program" else "http"
        if report_seconds:
            return ev.BootFileRequested(
                mac=mac, boot_id=bid, ts=end, seconds=end - req, file=kind, file_kind=kind,
                client="10.0.0.5", protocol=proto, bytes=1000,
            )  # fmt: skip
        return ev.BootFileRequested(
            mac=mac, boot_id=bid, ts=req, file=kind, file_kind=kind, client="10.0.0.5",
            protocol=proto,
        )  # fmt: skip

    events: list[ev.AnyEvent] = [
        ev.LeaseSeen(mac=mac, ts=lease, ip="10.0.0.5", arch="bios"),
        transfer("boot-program", bp_req, bp_end, None),
        ev.MenuServed(mac=mac, boot_id=boot_id, ts=menu, format="pxelinux", client="10.0.0.5"),
        transfer("kernel", k_req, k_end, boot_id),
        transfer("initrd", i_req, i_end, boot_id),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=s1, stage="stage1", status="started"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=disk, stage="disk"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=closure, stage="closure"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=booted, stage="booted"),
    ]
    # Without a duration a transfer lasts until the machine's next event.
    ends = {"kernel": k_end, "initrd": i_end} if report_seconds else {"kernel": i_req, "initrd": s1}
    expected = {
        "dhcp": bp_req - lease,
        "bootloader": menu - bp_req,
        "menu": k_req - menu,
        "kernel": ends["kernel"] - k_req,
        "initrd": ends["initrd"] - i_req,
        "stage1": disk - s1,
        "closure": closure - disk,
        "activation": booted - closure,
        "total": booted - lease,
    }
    return events, expected


def ipxe_boot_events(
    mac: str, t0: float, boot_id: str, lease_at: float = -0.02
) -> tuple[list[ev.AnyEvent], dict[str, float]]:
    """One boot on the iPXE path (the NIC's iPXE ROM): DHCP, ``boot.ipxe`` and the menu from the
    cache over HTTP, kernel and initrd, reports. ``lease_at``: when the lease event is stamped,
    relative to the boot.ipxe request at ``t0`` (the DHCP server's script may run after iPXE
    already asked: positive). Returns the events and the expected stage durations."""
    bp_req, bp_end = t0, t0 + 0.004
    menu, k_req, k_end, i_req, i_end = t0 + 0.3, t0 + 1.4, t0 + 2.0, t0 + 2.1, t0 + 5.0
    s1, disk, closure, booted = t0 + 9.0, t0 + 10.0, t0 + 14.0, t0 + 20.0
    ip = "10.0.0.7"

    def http(kind: str, file: str, req: float, end: float, bid: str | None) -> ev.AnyEvent:
        return ev.BootFileRequested(
            mac=mac, boot_id=bid, ts=end, seconds=end - req, file=file, file_kind=kind,  # type: ignore[arg-type]
            client=ip, protocol="http", bytes=1000,
        )  # fmt: skip

    events: list[ev.AnyEvent] = [
        ev.LeaseSeen(mac=mac, ts=t0 + lease_at, ip=ip, arch="bios", user_class="iPXE"),
        http("boot-program", "boot.ipxe", bp_req, bp_end, None),
        ev.MenuServed(mac=mac, boot_id=boot_id, ts=menu, format="ipxe", client=ip),
        http("kernel", "boot/x/kernel", k_req, k_end, None),
        http("initrd", "boot/x/initrd", i_req, i_end, None),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=s1, stage="stage1", status="started"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=disk, stage="disk"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=closure, stage="closure"),
        ev.StageReported(mac=mac, boot_id=boot_id, ts=booted, stage="booted"),
    ]
    lease = min(t0 + lease_at, bp_req)  # a late lease was granted no later than the request
    expected = {
        "dhcp": bp_req - lease,
        "bootloader": menu - bp_req,
        "menu": k_req - menu,
        "kernel": k_end - k_req,
        "initrd": i_end - i_req,
        "stage1": disk - s1,
        "closure": closure - disk,
        "activation": booted - closure,
        "total": booted - lease,
    }
    return events, expected
