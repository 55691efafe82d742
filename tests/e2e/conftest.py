"""e2e fixtures: the test kernel/initrd, two generations built by real Nix, a signed binary
cache, and the lab (network namespace, dnsmasq, boot server) the VMs boot through."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import tool
from tests.e2e import closure, initrd
from tests.e2e.lab import Lab
from tests.e2e.stack import InterimStack


@dataclass
class E2E:
    work: Path
    lab: Lab
    stack: InterimStack
    gen1: closure.BuiltGeneration
    gen2: closure.BuiltGeneration
    boot_files: initrd.TestBootFiles


@pytest.fixture(scope="package")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests need root (network namespaces, tap devices)")
    for t in ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ip", "ss", "nix", "cpio", "depmod"):
        tool(t)
    work = tmp_path_factory.mktemp("e2e")
    files = initrd.build()
    flake_dir = work / "gen1"
    gen1 = closure.build(work, closure.prepare_flake(flake_dir, files.kernel, files.initrd, "v1"))
    gen2 = closure.build(
        work, closure.prepare_flake(work / "gen2", files.kernel, files.initrd, "v2")
    )
    sk, pk = closure.generate_key(work)
    cache = work / "binary-cache"
    for g in (gen1, gen2):
        closure.publish(work, g.toplevel, cache, sk)
    with Lab(work / "lab") as lab:
        stack = InterimStack(lab, cache, pk)
        stack.start()
        yield E2E(work=work, lab=lab, stack=stack, gen1=gen1, gen2=gen2, boot_files=files)
