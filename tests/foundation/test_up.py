"""`nixboot up` as a user runs it: a subprocess with the embedded NATS and all four services."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, tool
from tests.harness.proc import OutputProc, write_up_config
from tests.harness.stack import SERVICES


class Stack(OutputProc):
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.tftp_port = free_port()
        self.nats_port = free_port()
        self.state = tmp / "state"
        self.config = tmp / "nixboot.toml"
        nats = f"embedded_port = {self.nats_port}"
        write_up_config(self.config, self.state, self.ports, self.tftp_port, nats)
        super().__init__([sys.executable, "-m", "nixboot", "up", "--config", str(self.config)], env)

    def healthy(self, name: str) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports[name]}/healthz"
            return httpx.get(url, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, predicate: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.05)
        pytest.fail(f"{what} not within {timeout} s; output:\n" + "\n".join(self.lines[-40:]))

    def pid_of(self, name: str) -> int:
        pids = [
            int(m.group(1))
            for line in self.lines
            if (m := re.search(rf"{name}: healthy \(pid (\d+)\)", line))
        ]
        assert pids, f"no healthy line for {name}"
        return pids[-1]

    def token(self) -> str:
        return (self.state / "api-token").read_text().strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture
def stack(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Stack]:
    s = Stack(tmp_path, clean_env)
    yield s
    s.stop(20)


def test_up_supervises_and_serves_the_thin_flow(stack: Stack) -> None:
    # A generous ceiling: on a loaded CI machine four Python services may take a while to import;
    # startup time is a benchmark figure, not something this test asserts.
    stack.wait(lambda: all(stack.healthy(n) for n in SERVICES), 60, "all services healthy")
    status = subprocess.run(
        [sys.executable, "-m", "nixboot", "status", "--json", "--config", str(stack.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    state = json.loads(status.stdout)
    assert all(s["healthy"] for s in state["services"].values())
    assert state["nats"]["connected"] and "NIXBOOT_EVENTS" in state["nats"]["streams"]

    # The thin flow: a lease posted to dhcp-hook -> event in JetStream -> per-MAC menu over TFTP.
    mac = "52:54:00:12:34:56"
    r = httpx.post(
        f"http://127.0.0.1:{stack.ports['dhcp-hook']}/leases",
        json={"mac": mac, "ip": "10.0.0.5", "kind": "new"},
        headers={"Authorization": f"Bearer {stack.token()}"},
    )
    assert r.status_code == 202, r.text
    curl = subprocess.run(
        [
            tool("curl"),
            "-sf",
            "--max-time",
            "10",
            f"tftp://127.0.0.1:{stack.tftp_port}/pxelinux.cfg/01-52-54-00-12-34-56",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert curl.returncode == 0, curl.stderr
    assert "rendered for 52-54-00-12-34-56" in curl.stdout and "LOCALBOOT" in curl.stdout
    status = subprocess.run(
        [sys.executable, "-m", "nixboot", "status", "--json", "--config", str(stack.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)["nats"]["streams"]["NIXBOOT_EVENTS"]["messages"] >= 1
    stack.wait(
        lambda: any("lease of 52:54:00:12:34:56" in line for line in stack.lines),
        30,
        "cache saw the lease",
    )

    # Bad input: an invalid MAC or a missing token changes nothing.
    bad = httpx.post(
        f"http://127.0.0.1:{stack.ports['dhcp-hook']}/leases",
        json={"mac": "52:54:00:12:34", "ip": "10.0.0.6"},
        headers={"Authorization": f"Bearer {stack.token()}"},
    )
    assert bad.status_code == 400 and "invalid MAC" in bad.text
    assert (
        httpx.post(
            f"http://127.0.0.1:{stack.ports['dhcp-hook']}/leases",
            json={"mac": mac, "ip": "10.0.0.6"},
        ).status_code
        == 401
    )

    # SIGKILL one service: the supervisor restarts it and it is healthy again.
    victim = stack.pid_of("tftp")
    os.kill(victim, signal.SIGKILL)
    stack.wait(
        lambda: any("tftp: exited with -9" in line for line in stack.lines), 15, "crash seen"
    )
    stack.wait(lambda: stack.healthy("tftp") and stack.pid_of("tftp") != victim, 30, "tftp back")

    # SIGTERM to `nixboot up` leaves no process behind.
    pids = [stack.pid_of(n) for n in SERVICES]
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(20) == 0
    stack.reader.join(5)  # every line the supervisor printed, up to its exit
    for name in SERVICES:
        assert f"nixboot: {name}: stopped (exit 0)" in stack.lines, "\n".join(stack.lines[-30:])
    stack.wait(lambda: not any(alive(p) for p in pids), 5, "children gone")
    nats_pids = subprocess.run(
        ["pgrep", "-f", "--", f"-p {stack.nats_port}"], capture_output=True, text=True
    )
    assert nats_pids.stdout.strip() == ""


def test_bad_config_fails_at_start(tmp_path: Path, clean_env: dict[str, str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[cache]\nmax_bytez = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "nixboot", "up", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=20,
    )
    assert r.returncode == 2
    assert "unknown field `max_bytez` - at `$.cache`" in r.stderr


def test_serve_without_nats_says_how_to_fix(tmp_path: Path, clean_env: dict[str, str]) -> None:
    env = {**clean_env, "NIXBOOT_STATE_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "nixboot", "serve", "cache"],
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert r.returncode == 2 and "no NATS URL configured" in r.stderr


@pytest.mark.parametrize("service", ["dhcp-hook", "cache"])  # uvicorn and granian
def test_serve_on_a_taken_port_fails_clearly(
    tmp_path: Path, clean_env: dict[str, str], nats_url: str, service: str
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        section = service.replace("-", "_").upper()
        env = {
            **clean_env,
            "NIXBOOT_STATE_DIR": str(tmp_path),
            "NIXBOOT_NATS__URL": nats_url,
            f"NIXBOOT_{section}__HTTP__HOST": "127.0.0.1",
            f"NIXBOOT_{section}__HTTP__PORT": str(port),
        }
        r = subprocess.run(
            [sys.executable, "-m", "nixboot", "serve", service],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    assert r.returncode != 0
    assert "address already in use" in r.stderr.lower()
