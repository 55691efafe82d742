"""NATS with authentication and TLS, end to end, against a real nats-server configured with
`authorization` and `tls` blocks: the real dhcp-hook and cache services (and `nixboot up`, the
`nixboot events` CLI, the real hook command) work with a password from a file, a user nkey, and
TLS with CA verification and client certificates; wrong credentials or an unknown CA end a service
or a command at once with a clear error; no secret appears in any log line, CLI output or event."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest

import nixboot_dhcp_hook.hook
from nixboot_shared import bus
from nixboot_shared.config import NatsConfig
from tests.conftest import free_port
from tests.harness.proc import OutputProc, write_up_config
from tests.harness.stack import SERVICES

from .natsauth import NatsWithConfig, Pki, Service, base_env, secret_file, user_nkey

SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Secured:
    """A running nats-server with one kind of protection and what a client needs for it."""

    mode: str
    server: NatsWithConfig
    url: str
    env: dict[str, str]  # NIXBOOT_NATS__* for services and CLIs
    secrets: list[str]  # strings that must never appear in any output
    work: Path

    def settings(self) -> NatsConfig:
        prefix = "NIXBOOT_NATS__"
        values = {k[len(prefix) :].lower(): v for k, v in self.env.items() if k.startswith(prefix)}
        return NatsConfig(**values)


def password_block(password: str) -> str:
    return f'authorization {{\n  users = [ {{ user: "nixboot", password: "{password}" }} ]\n}}\n'


def start_secured(mode: str, work: Path) -> Secured:
    work.mkdir(parents=True, exist_ok=True)
    if mode == "password":
        password = os.urandom(18).hex()
        server = NatsWithConfig(work / "nats", password_block(password))
        pw = secret_file(work / "nats-password", password)
        env = {"NIXBOOT_NATS__USER": "nixboot", "NIXBOOT_NATS__PASSWORD_FILE": str(pw)}
        return Secured(mode, server, server.url(), env, [password], work)
    if mode == "nkey":
        seed_file, seed, public = user_nkey(work)
        server = NatsWithConfig(
            work / "nats", f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
        )
        env = {"NIXBOOT_NATS__NKEY_SEED_FILE": str(seed_file)}
        return Secured(mode, server, server.url(), env, [seed], work)
    assert mode == "tls"
    pki = Pki(work / "pki")
    password = os.urandom(18).hex()
    conf = password_block(password) + (
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n  verify: true\n  timeout: 2\n'
        "}\n"
    )
    server = NatsWithConfig(work / "nats", conf)
    pw = secret_file(work / "nats-password", password)
    env = {
        "NIXBOOT_NATS__USER": "nixboot",
        "NIXBOOT_NATS__PASSWORD_FILE": str(pw),
        "NIXBOOT_NATS__TLS_CA_FILE": str(pki.ca),
        "NIXBOOT_NATS__TLS_CERT_FILE": str(pki.client_cert),
        "NIXBOOT_NATS__TLS_KEY_FILE": str(pki.client_key),
    }
    return Secured(mode, server, server.url("tls"), env, [password, pki.key_secret()], work)


@pytest.fixture(params=["password", "nkey", "tls"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    s = start_secured(request.param, tmp_path)
    yield s
    s.server.stop()


def assert_no_secret(texts: dict[str, str], secrets: list[str]) -> None:
    for secret in secrets:
        assert len(secret) >= 16
        for where, text in texts.items():
            assert secret not in text, f"a secret appears in {where}"


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixboot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hook(state: Path, mac: str, ip: str) -> None:
    """The real hook command, as dnsmasq runs it (it talks to dhcp-hook by datagram only)."""
    env = {
        "DNSMASQ_INTERFACE": "lab0",
        "DNSMASQ_TAGS": "lab0",
        "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
    }
    argv = [SYSTEM_PYTHON, "-S", "-I", nixboot_dhcp_hook.hook.__file__, "--state-dir", str(state)]
    p = subprocess.run([*argv, "add", mac, ip, "pc"], env=env, capture_output=True, timeout=10)
    assert p.returncode == 0, p.stderr


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


async def test_anonymous_and_wrong_clients_are_refused_by_the_server(secured: Secured) -> None:
    """The server really requires what the services are given (else the test proves nothing)."""
    plain_tls = ssl.create_default_context(cafile=secured.settings().tls_ca_file or None)
    tls_opts = {"tls": plain_tls} if secured.mode == "tls" else {}
    # The error type varies by mode (authorization error, TLS handshake failure).
    with pytest.raises(Exception) as refused:
        nc = await nats.connect(secured.url, allow_reconnect=False, connect_timeout=3, **tls_opts)
        await nc.close()
    text = str(refused.value).lower()
    if secured.mode == "tls":
        # No client certificate: with TLS 1.3 the server's refusal arrives either as the
        # certificate-required alert or as the connection closed right after the handshake
        # (seen as a reset, a lost connection or a broken pipe, depending on who moves first).
        closed = isinstance(refused.value, (ssl.SSLError, ConnectionError))
        assert closed or "certificate" in text or "connection lost" in text, text
    else:
        assert "authorization" in text, text
    # Our connect path with the right settings gets in.
    nc = await bus.connect(secured.url, "test", settings=secured.settings())
    assert nc.is_connected
    await nc.close()


def test_services_and_the_cli_work_end_to_end_with_auth(secured: Secured) -> None:
    extra = {"NIXBOOT_NATS__URL": secured.url, **secured.env}
    hook_svc = Service("dhcp-hook", secured.work / "hook", extra)
    cache = Service(
        "cache", secured.work / "cache", extra | {"NIXBOOT_CACHE__PUBLIC_URL": "http://127.0.0.1:1"}
    )
    try:
        hook_svc.wait_healthy()
        cache.wait_healthy()
        mac = "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
        hook(hook_svc.state, mac, "10.0.0.5")
        # The cache consumed the lease event from JetStream: it logs the lease.
        wait_until(lambda: f"lease of {mac}" in cache.log(), 20, "cache saw the lease")
        # The CLI reads it through the same connect path, with the configuration's auth.
        cli_env = base_env(secured.work / "cli", extra)
        out = run_cli(["events", "--mac", mac, "--json"], cli_env)
        assert out.returncode == 0, out.stderr
        kinds = [json.loads(line)["type"] for line in out.stdout.splitlines() if line.strip()]
        assert "lease" in kinds, out.stdout
        # Every event in the stream, raw, for the secret grep.
        dump = secured.work / "events.jsonl"
        raw = run_cli(["events", "--since", "1h", "--dump", str(dump)], cli_env)
        assert raw.returncode == 0, raw.stderr
        stream = dump.read_text()
        assert mac in stream
    finally:
        hook_svc.stop()
        cache.stop()
    assert hook_svc.proc.returncode == 0 and cache.proc.returncode == 0
    assert_no_secret(
        {
            "dhcp-hook log": hook_svc.log(),
            "cache log": cache.log(),
            "events output": out.stdout + out.stderr,
            "event stream": stream,
            "nats log": secured.server.log.read_text(errors="replace"),
        },
        secured.secrets,
    )


def test_wrong_password_ends_services_and_commands_with_a_clear_error(tmp_path: Path) -> None:
    s = start_secured("password", tmp_path)
    wrong = secret_file(tmp_path / "wrong-password", os.urandom(18).hex())
    extra = {"NIXBOOT_NATS__URL": s.url, **s.env, "NIXBOOT_NATS__PASSWORD_FILE": str(wrong)}
    try:
        started = time.monotonic()
        svc = Service("cache", tmp_path / "cache", extra)
        assert svc.proc.wait(30) != 0
        assert time.monotonic() - started < 30
        assert re.search(r"refused the connection: .*authorization violation", svc.log(), re.I), (
            svc.log()
        )
        out = run_cli(["events", "--since", "1m"], base_env(tmp_path / "cli", extra))
        assert out.returncode != 0 and "refused the connection" in out.stderr, out.stderr
        status = run_cli(["status", "--json"], base_env(tmp_path / "cli", extra))
        assert status.returncode != 0
        assert json.loads(status.stdout)["nats"]["connected"] is False
        # `nixboot up` against it stops before starting any service.
        up = run_cli(["up"], base_env(tmp_path / "up", extra))
        assert up.returncode == 2, up.stdout + up.stderr
        assert "error: NATS at" in up.stdout and "refused" in up.stdout
        assert "healthy" not in up.stdout
        texts = {
            "cache log": svc.log(),
            "events output": out.stdout + out.stderr,
            "status output": status.stdout + status.stderr,
            "up output": up.stdout + up.stderr,
        }
        assert_no_secret(texts, [*s.secrets, wrong.read_text().strip()])
    finally:
        s.server.stop()


def test_a_server_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    s = start_secured("tls", tmp_path)
    pki_dir = tmp_path / "pki"
    extra = {
        "NIXBOOT_NATS__URL": s.url,
        **s.env,
        "NIXBOOT_NATS__TLS_CA_FILE": str(pki_dir / "other-ca.pem"),
    }
    try:
        svc = Service("dhcp-hook", tmp_path / "hook", extra)
        assert svc.proc.wait(30) != 0
        assert "certificate verify failed" in svc.log(), svc.log()
        # And without a client certificate the server (verify: true) refuses us.
        no_cert = {k: v for k, v in extra.items() if "TLS_CERT" not in k and "TLS_KEY" not in k}
        no_cert["NIXBOOT_NATS__TLS_CA_FILE"] = str(pki_dir / "ca.pem")
        out = run_cli(["events", "--since", "1m"], base_env(tmp_path / "cli", no_cert))
        # The error is in a box that wraps at 80 columns: match on its words, not its lines.
        said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out.stderr).split())
        assert out.returncode != 0 and "cannot use NATS" in said, out.stderr
        assert out.stdout == "", out.stdout
        # With TLS 1.3 the server checks the client certificate after the handshake: the client
        # sees either the certificate-required alert (a refusal: the CLI stops at once) or the
        # connection closed under it (a reset or broken pipe, which bus.connect retries as it
        # would a restarting server, until the CLI gives up on the connect timeout).
        wording = r"certificate required|reset|broken pipe|connection lost|no connection within"
        assert re.search(wording, said, re.I), out.stderr
    finally:
        s.server.stop()


class Up(OutputProc):
    """`nixboot up` as a process, its output collected line by line."""

    def __init__(self, tmp: Path, nats_table: str, env: dict[str, str]) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.state = tmp / "state"
        self.config = tmp / "nixboot.toml"
        write_up_config(self.config, self.state, self.ports, free_port(), nats_table)
        self.env = base_env(self.state, {}) | env
        self.env.pop("NIXBOOT_STATE_DIR")
        super().__init__(
            [sys.executable, "-m", "nixboot", "up", "--config", str(self.config)], self.env
        )

    def healthy(self) -> bool:
        for port in self.ports.values():
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True

    def wait_healthy(self, timeout: float = 40) -> None:
        try:
            wait_until(self.healthy, timeout, "all four services healthy")
        except AssertionError:
            raise AssertionError("\n".join(self.lines[-40:])) from None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.env | {"NIXBOOT_CONFIG": str(self.config)})


def test_up_against_an_external_nats_with_tls_and_an_nkey(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    seed_file, seed, public = user_nkey(tmp_path)
    server = NatsWithConfig(
        tmp_path / "nats",
        f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
        f'tls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n  verify: true\n}}\n',
    )
    table = (
        f'url = "{server.url("tls")}"\nnkey_seed_file = "{seed_file}"\n'
        f'tls_ca_file = "{pki.ca}"\ntls_cert_file = "{pki.client_cert}"\n'
        f'tls_key_file = "{pki.client_key}"\n'
    )
    up = Up(tmp_path, table, {})
    try:
        up.wait_healthy()
        status = up.cli("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["nats"]["connected"] is True
    finally:
        up.stop()
        server.stop()
    assert up.proc.returncode == 0
    assert any(f"nats: using tls://127.0.0.1:{server.port}" in line for line in up.lines)
    logs = {"up output": "\n".join(up.lines), "status": status.stdout + status.stderr}
    assert_no_secret(logs, [seed, pki.key_secret()])


def test_up_embedded_nats_requires_the_generated_password(tmp_path: Path) -> None:
    """Security by default: `nixboot up` with no nats.url runs nats-server with a password it
    generates (0600) in the state directory; the services and the CLIs find it, nobody else."""
    port = free_port()
    up = Up(tmp_path, f"embedded_port = {port}", {})
    try:
        up.wait_healthy()
        password_file = up.state / "nats-password"
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert (up.state / "nats-server.conf").stat().st_mode & 0o777 == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 32

        async def anonymous() -> None:
            nc = await nats.connect(
                f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=3
            )
            await nc.close()

        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            asyncio.run(anonymous())
        status = up.cli("status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        events = up.cli("events", "--since", "10m", "--json")
        assert events.returncode == 0, events.stderr
    finally:
        up.stop()
    assert up.proc.returncode == 0
    assert any("auth on" in line for line in up.lines), up.lines[:5]
    service_logs = "\n".join(up.lines)
    assert_no_secret(
        {"up output": service_logs, "status": status.stdout, "events": events.stdout},
        [password],
    )


@pytest.mark.parametrize("variant", ["generated", "password_file", "nkey", "off"])
async def test_embedded_server_configuration_variants(tmp_path: Path, variant: str) -> None:
    """What `nixboot up` writes for its embedded nats-server, run by the real server: clients
    with the configured secret get in, anonymous ones only with `embedded_auth = false`."""
    from nixboot.supervisor import Supervisor
    from nixboot_shared.config import load

    port = free_port()
    env = {"NIXBOOT_STATE_DIR": str(tmp_path / "state"), "NIXBOOT_NATS__EMBEDDED_PORT": str(port)}
    secret = ""
    if variant == "password_file":
        secret = os.urandom(16).hex()
        pw = secret_file(tmp_path / "pw", secret)
        env |= {"NIXBOOT_NATS__USER": "ops", "NIXBOOT_NATS__PASSWORD_FILE": str(pw)}
    elif variant == "nkey":
        seed_file, secret, _ = user_nkey(tmp_path)
        env["NIXBOOT_NATS__NKEY_SEED_FILE"] = str(seed_file)
    elif variant == "off":
        env["NIXBOOT_NATS__EMBEDDED_AUTH"] = "false"
    cfg = load(None, env)
    lines: list[str] = []
    sup = Supervisor(cfg, lines.append, env={})
    cfg.state_path.mkdir(parents=True)
    url = sup.start_nats()
    try:
        if variant == "generated":
            secret = (cfg.state_path / "nats-password").read_text().strip()
            # The services get the generated password through their environment.
            assert sup.env["NIXBOOT_NATS__PASSWORD_FILE"] == str(cfg.state_path / "nats-password")
        client = load(None, env | sup.env).nats_client()
        nc = await bus.connect(url, "test", settings=client)
        await nc.close()
        if variant == "off":
            nc = await bus.connect(url, "anonymous")
            await nc.close()
        else:
            with pytest.raises(bus.NatsRefused):
                await bus.connect(url, "anonymous")
            conf = (cfg.state_path / "nats-server.conf").stat()
            assert conf.st_mode & 0o777 == 0o600
    finally:
        sup.stop()
    output = "\n".join(lines)
    assert ("auth on" in output) == (variant != "off")
    if secret:
        assert_no_secret({"supervisor output": output}, [secret])
