"""Fixtures every test area shares: a real nats-server with JetStream, free ports, a config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.stack import free_port as free_port  # re-exported for the test areas
from tests.harness.stack import wait_port as wait_port

VENV_BIN = Path(sys.executable).parent


class NatsServer:
    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = VENV_BIN / "nats-server"
        argv = [str(binary), "-js", "-sd", str(self.store), "-a", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server (JetStream on) for the whole test session."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def fresh_nats_url(tmp_path: Path) -> Iterator[str]:
    """A real nats-server with JetStream of this test's own (a fresh stream and buckets)."""
    server = NatsServer(tmp_path / "js")
    server.start()
    yield server.url
    server.stop()


def tool(name: str) -> str:
    """Path of a required external tool; a missing one fails loudly (CI installs them)."""
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if not found:
        pytest.fail(f"required tool {name!r} is not installed (make test installs it)")
    return found


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment without any NIXBOOT_* setting of the developer's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
