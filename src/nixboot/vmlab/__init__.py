"""A one-machine PXE lab: a network namespace with a bridge, nixboot's real services and dnsmasq
in it, and QEMU (TCG) VMs that boot through them. ``nixboot demo vm`` and the e2e tests use it.

Root only (network namespaces, tap devices). Nothing touches the host's interfaces or routes;
processes are killed by PID and the namespace is deleted on close.

The lab reads the shipped files under ``deploy/`` (the dnsmasq config, the DHCP hook wrapper,
stage1.sh) from the source tree this package lives in (``uv sync`` installs it editable).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


class VmLabError(RuntimeError):
    """The lab cannot run here; the message says what is missing."""


def deploy_file(*parts: str) -> Path:
    """A file shipped under the repository's ``deploy/`` (the lab uses them unchanged)."""
    path = REPO.joinpath("deploy", *parts)
    if not path.is_file():
        raise VmLabError(
            f"{path} is missing: the VM lab runs from a nixboot source tree "
            "(git clone + uv sync), which ships deploy/"
        )
    return path
