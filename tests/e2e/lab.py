"""The e2e lab: a network namespace with a bridge and a tap, dnsmasq for DHCP, servers started
inside it, and QEMU (TCG) VMs that PXE-boot through it.

Everything lives in the namespace ``nb-e2e-<pid>``; nothing touches the host's interfaces or
routes. Processes are killed by PID and the namespace is deleted on close, whatever happened.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0"
SERVER_IP = f"{SUBNET}.1"
IPXE_ROM_DIR = Path("/usr/lib/ipxe/qemu")


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
    def __init__(self, work: Path) -> None:
        self.work = work
        self.ns = f"nb-e2e-{os.getpid()}"
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
    def start_dnsmasq(
        self, ipxe_url: str, pxelinux: bool = False, hook: Path | None = None, extra: str = ""
    ) -> None:
        """DHCP: iPXE chains to ``ipxe_url``; with ``pxelinux`` every client gets lpxelinux.0
        from the TFTP server on the bridge. ``hook``: the lease script."""
        conf = self.work / "dnsmasq.conf"
        lines = [
            f"interface={self.bridge}",
            "bind-interfaces",
            "except-interface=lo",
            "port=0",
            "no-resolv",
            "no-hosts",
            "dhcp-authoritative",
            # no-ping: else ~3 s before the first offer
            "no-ping",
            f"dhcp-range={SUBNET}.100,{SUBNET}.200,255.255.255.0,1h",
            f"dhcp-leasefile={self.work / 'dnsmasq.leases'}",
            "log-dhcp",
            f"log-facility={self.dhcp_log}",
            "user=root",
            "group=root",
            "dhcp-userclass=set:ipxe,iPXE",
            "dhcp-match=set:ipxe,175",
            # tells iPXE not to wait ~2 s for ProxyDHCP offers
            "dhcp-option=tag:ipxe,encap:175,176,1b",
            "enable-ra",
            f"dhcp-range=::,constructor:{self.bridge},ra-only",
        ]
        if hook is not None:
            lines.append(f"dhcp-script={hook}")
        if pxelinux:
            # lpxelinux from the nixboot tftp service (menus over TFTP, kernels over HTTP)
            lines.append(f"dhcp-boot=lpxelinux.0,,{SERVER_IP}")
        else:
            lines.append(f"dhcp-boot=tag:ipxe,{ipxe_url}")
        conf.write_text("\n".join(lines) + "\n" + extra)
        (self.work / "dnsmasq.leases").write_text("")
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
        self, name: str, mac: str, disk: Path, timeout: float, markers: Sequence[str] = ()
    ) -> BootResult:
        """PXE-boot a BIOS VM (iPXE ROM) from the bridge; return when it powers off."""
        console = self.work / f"{name}.console.log"
        console.write_text("")
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
            f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1",
            "-drive",
            f"file={disk},if=virtio,format={'qcow2' if disk.suffix == '.qcow2' else 'raw'},"
            "cache=unsafe",
            "-boot",
            "n",
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
