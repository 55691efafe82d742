"""e2e fixtures: the test kernel/initrd and the lab (network namespace, dnsmasq) with nixboot's
real services in it; the builder builds the first generation from the test flake."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixboot.vmlab import initrd
from nixboot.vmlab.lab import Lab
from nixboot.vmlab.stack import Built, RealStack
from tests.conftest import tool

MAC = "52:54:00:13:00:01"


@dataclass
class E2E:
    work: Path
    lab: Lab
    stack: RealStack
    gen1: Built
    boot_files: initrd.TestBootFiles
    gen2: Built | None = None


@pytest.fixture(scope="package")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests need root (network namespaces, tap devices)")
    for t in ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ip", "ss", "nix", "cpio", "depmod"):
        tool(t)
    for t in ("git", "curl"):
        tool(t)
    work = tmp_path_factory.mktemp("e2e")
    files = initrd.build()
    with Lab(work / "lab") as lab:
        stack = RealStack(lab, work / "stack", files, MAC)
        stack.start()
        gen1 = stack.build()
        yield E2E(work=work, lab=lab, stack=stack, gen1=gen1, boot_files=files)
