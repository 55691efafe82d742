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
