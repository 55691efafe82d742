"""The e2e lab: a network namespace with a bridge and a tap, dnsmasq for DHCP, servers started
inside it, and QEMU (TCG) VMs that PXE-boot through it.

Everything lives in the namespace ``nb-<name>-<pid>``; nothing touches the host's interfaces or
routes. Processes are killed by PID and the namespace is deleted on close, whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nixboot.vmlab import deploy_file

SUBNET = "10.213.0"
SERVER_IP = f"{SUBNET}.1"
IPXE_ROM_DIR = Path("/usr/lib/ipxe/qemu")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass
class BootResult:
    console: str
    seconds: float
    returncode: int | None
    timed_out: bool
    marks: dict[str, float] = field(default_factory=dict)  # console marker -> seconds after start

    def has(self, text: str) -> bool:
        return text in self.console


class Lab:
    def __init__(self, work: Path, name: str = "e2e") -> None:
        self.work = work
        self.ns = f"nb-{name}-{os.getpid()}"
        self.bridge = "nbbr0"
        self.tap = f"nbtap{os.getpid() % 100000}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dhcp_log = work / "dnsmasq.log"
        self.dnsmasq: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ namespace
    def __enter__(self) -> Lab:
        self.work.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.ns)
        try:
            n = ("-n", self.ns)
            _ip(*n, "link", "set", "lo", "up")
            _ip(
                *n,
                "link",
                "add",
                self.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            )
            _ip(*n, "addr", "add", f"{SERVER_IP}/24", "dev", self.bridge)
            # an IPv6 prefix only for dnsmasq's router advertisements (iPXE waits ~16 s without)
            _ip(*n, "addr", "add", "fd13:213::1/64", "dev", self.bridge, "nodad")
            _ip(*n, "link", "set", self.bridge, "up")
            _ip(*n, "tuntap", "add", "dev", self.tap, "mode", "tap")
            _ip(*n, "link", "set", self.tap, "master", self.bridge)
            _ip(*n, "link", "set", self.tap, "up")
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, check=False)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def spawn(
        self,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        fh = log.open("ab")
        p = subprocess.Popen(
            self.exec_argv(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        fh.close()
        self.procs.append(p)
        return p

    def wait_listening(self, port: int, proto: str = "t", timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                self.exec_argv(["ss", f"-ln{proto}H", f"sport = :{port}"]),
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if out.strip():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args!r} exited ({p.returncode}) before listening")
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on {proto} port {port} in {self.ns}")

    # ------------------------------------------------------------------ DHCP
    def start_dnsmasq(self, cache_url: str, hook: Path, pxelinux: bool = False) -> None:
        """The lab's DHCP server: nixboot's shipped dnsmasq config (deploy/dhcp/dnsmasq.conf)
        with its placeholders filled, calling ``hook`` on every lease change. iPXE chains to the
        cache's boot.ipxe; with ``pxelinux`` iPXE is handed lpxelinux.0 from the TFTP service
        on the bridge instead (the pxelinux path)."""
        template = deploy_file("dhcp", "dnsmasq.conf")
        text = template.read_text()
        values = {
            "IFACE": self.bridge,
            "SERVER_IP": SERVER_IP,
            "RANGE_START": f"{SUBNET}.100",
            "RANGE_END": f"{SUBNET}.200",
            "NETMASK": "255.255.255.0",
            "CACHE_URL": cache_url.rstrip("/"),
            "HOOK": str(hook),
            "STATE": str(self.work),
        }
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        left = re.findall(r"@[A-Z_]+@", text)
        if left:
            raise RuntimeError(f"{template}: placeholders not filled: {left}")
        if pxelinux:
            ipxe_line = f"dhcp-boot=tag:ipxe,{values['CACHE_URL']}/boot.ipxe"
            if ipxe_line not in text:
                raise RuntimeError(f"{template} has no line {ipxe_line!r} to replace")
            text = text.replace(ipxe_line, f"dhcp-boot=tag:ipxe,lpxelinux.0,,{SERVER_IP}")
        # test-only: a log file, root (the hook reads the state dir), no DNS files
        text += f"log-dhcp\nlog-facility={self.dhcp_log}\nuser=root\ngroup=root\n"
        text += "no-resolv\nno-hosts\nexcept-interface=lo\n"
        conf = self.work / "dnsmasq.conf"
        conf.write_text(text)
        leases = self.work / "dnsmasq.leases"
        if not leases.exists():  # a restarted DHCP server keeps its leases
            leases.write_text("")
        self.dnsmasq = self.spawn(
            ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"], self.work / "dnsmasq.out"
        )
        self.wait_listening(67, "u")

    def stop_dnsmasq(self) -> None:
        if self.dnsmasq is not None:
            self.dnsmasq.terminate()
            self.dnsmasq.wait(5)
            self.procs.remove(self.dnsmasq)
            self.dnsmasq = None

    # ------------------------------------------------------------------ VMs
    def boot(
        self,
        name: str,
        mac: str,
        disk: Path,
        timeout: float,
        markers: Sequence[str] = (),
        uefi: bool = False,
    ) -> BootResult:
        """PXE-boot a VM from the bridge; return when it powers off.

        BIOS: SeaBIOS runs the NIC's iPXE ROM. ``uefi``: OVMF (q35, read-only code flash and a
        private copy of the variable store) with the NIC's option ROM disabled, so the
        firmware's own PXE stack fetches the boot program (snponly.efi) over TFTP."""
        console = self.work / f"{name}.console.log"
        console.write_text("")
        if uefi:
            vars_copy = self.work / f"{name}.OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            firmware = [
                "-machine",
                "q35",
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={vars_copy}",
            ]
            nic_rom = ",romfile="
        else:
            firmware = ["-boot", "n"]
            nic_rom = ""
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "1",
            "-nographic",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{console}",
            "-netdev",
            f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1{nic_rom}",
            "-drive",
            f"file={disk},if=virtio,format={'qcow2' if disk.suffix == '.qcow2' else 'raw'},"
            "cache=unsafe",
            *firmware,
        ]
        t0 = time.monotonic()
        p = self.spawn(argv, self.work / f"{name}.qemu.out")
        marks: dict[str, float] = {}
        timed_out = False
        while p.poll() is None:
            text = console.read_text(errors="replace")
            for m in markers:
                if m not in marks and m in text:
                    marks[m] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                timed_out = True
                p.kill()
                p.wait(5)
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        text = console.read_text(errors="replace")
        for m in markers:
            if m not in marks and m in text:
                marks[m] = elapsed
        self.procs.remove(p)
        return BootResult(
            console=text, seconds=elapsed, returncode=p.returncode, timed_out=timed_out, marks=marks
        )


def new_disk(path: Path, size: str = "1G") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def console_lines(console: str, prefix: str) -> list[str]:
    return [ln.strip() for ln in re.split(r"[\r\n]+", console) if prefix in ln]
