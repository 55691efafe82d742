"""``nixboot demo vm`` as a user runs it: its own stack in its own namespace, one VM booted
(QEMU TCG), the timeline table printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import tool

# what the cache's timeline measures on the BIOS iPXE path (see test_boot.IPXE_TIMELINE)
STAGES = ["dhcp", "bootloader", "menu", "kernel", "initrd", "stage1", "closure", "activation"]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_vm_prints_the_boot_timeline() -> None:
    if os.geteuid() != 0:
        pytest.fail("nixboot demo vm needs root (network namespaces, tap devices)")
    for t in ("qemu-system-x86_64", "dnsmasq", "nix", "ip"):
        tool(t)
    before = _netns()
    proc = subprocess.run(
        [sys.executable, "-m", "nixboot", "demo", "vm", "--timeout", "150"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert re.search(r"52:54:00:de:00:01 boot 1 \(\w+\): booted, [\d.]+ s", out), out
    rows = [ln for ln in out.splitlines() if ln.startswith("│")]
    names = [ln.strip("│ ").split()[0] for ln in rows]
    assert names == STAGES, out
    for ln in rows:  # stage, +start, seconds, bar
        cells = [c.strip() for c in ln.strip("│").split("│")]
        assert re.fullmatch(r"\+\d+\.\d\d", cells[1]) and re.fullmatch(r"\d+\.\d{3}", cells[2])
        assert "█" in cells[3], ln
    assert re.search(r"^per stage: dhcp [\d.]+ s, bootloader [\d.]+ s, menu ", out, re.M), out
    assert re.search(r"closure: fetched [1-9]\d* paths \(NAR [1-9]\d* bytes", out), out
    assert "version=e2e-v1" in out, out
    # the demo removed its namespace (and with it the bridge, tap and its processes' sockets)
    assert {ns for ns in _netns() - before if ns.startswith("nb-demo-")} == set()


def test_demo_vm_without_root_says_so_and_does_nothing() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to drop to nobody (setpriv)")
    before = _netns()
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "nixboot",
            "demo",
            "vm",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "HOME": "/tmp"},
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "needs root" in proc.stderr, proc.stderr
    assert _netns() == before
