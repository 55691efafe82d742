"""Test material for NATS authentication and TLS: a throwaway CA with server and client
certificates, user nkeys, a real nats-server started from a configuration file, and nixboot
services as real processes whose output is kept for the secret grep."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nkeys  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import VENV_BIN, free_port, wait_port


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as files."""

    dir: Path
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)
    other_ca: Path = field(init=False)  # a CA that signed nothing here: verification must fail

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = _key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nixboot test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )

        def leaf(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[bytes, bytes]:
            key = _key()
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
            )
            if san:
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(
                        [
                            x509.DNSName("localhost"),
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        ]
                    ),
                    critical=False,
                )
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

        self.ca = self._write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        cert, key = leaf("nats", ExtendedKeyUsageOID.SERVER_AUTH, san=True)
        self.server_cert = self._write("server.pem", cert)
        self.server_key = self._write("server-key.pem", key)
        cert, key = leaf("nixboot-client", ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
        self.client_cert = self._write("client.pem", cert)
        self.client_key = self._write("client-key.pem", key)
        # Only the certificate matters for "another CA": a self-signed one.
        other_key = _key()
        other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not our CA")])
        other = (
            x509.CertificateBuilder()
            .subject_name(other_name)
            .issuer_name(other_name)
            .public_key(other_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(other_key, hashes.SHA256())
        )
        self.other_ca = self._write("other-ca.pem", other.public_bytes(serialization.Encoding.PEM))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def key_secret(self) -> str:
        """A line from the middle of the client's private key PEM: must never appear in logs."""
        lines = self.client_key.read_text().splitlines()
        return lines[len(lines) // 2]


def user_nkey(directory: Path, name: str = "nkey.seed") -> tuple[Path, str, str]:
    """A new user nkey: (seed file, seed, public key)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    path = directory / name
    path.write_text(seed + "\n")
    path.chmod(0o600)
    return path, seed, public


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


class NatsWithConfig:
    """A real nats-server with JetStream, started from a configuration file (auth, tls)."""

    def __init__(self, work: Path, conf: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = work / "nats.conf"
        self.conf.write_text(conf)
        self.log = work / "nats.log"
        argv = [str(VENV_BIN / "nats-server"), "-c", str(self.conf), "-js"]
        argv += ["-sd", str(work / "js"), "-a", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def base_env(state: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
    env |= {"NIXBOOT_STATE_DIR": str(state), "NIXBOOT_CONFIG": ""}
    return env | extra


class Service:
    """`nixboot serve <name>` as a process, output to a file (grepped for secrets later)."""

    def __init__(self, name: str, state: Path, env: dict[str, str]) -> None:
        self.name = name
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        section = name.replace("-", "_").upper()
        self.env = base_env(
            state,
            env
            | {
                f"NIXBOOT_{section}__HTTP__HOST": "127.0.0.1",
                f"NIXBOOT_{section}__HTTP__PORT": str(self.port),
            },
        )
        self.log_path = state / f"{name}.log"
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nixboot", "serve", name],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
