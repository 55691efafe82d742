"""Fixtures for the builder tests: a real nats-server with JetStream, the real nix client, and a
private copy of the demo flake per test (a ``path:`` flake, so no git is involved)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from nixboot_builder import demo

NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


@pytest.fixture(autouse=True, scope="session")
def _nix_offline() -> None:
    os.environ["NIX_CONFIG"] = NIX_CONFIG
    if shutil.which("nix") is None:
        pytest.fail("the nix client is required (apt-get install nix-bin nix-setup-systemd)")


@pytest.fixture
def nats_url(fresh_nats_url: str) -> str:
    """Every test here gets its own server: builds and warms leave state in the buckets."""
    return fresh_nats_url


@pytest.fixture
def flake_dir(tmp_path: Path) -> Path:
    """A private demo flake; a unique appVersion keeps its store paths this test's own."""
    d = tmp_path / "flake"
    demo.prepare(d)
    demo.set_knob(d, "appVersion", f"t{os.getpid()}-{time.monotonic_ns()}")
    return d
