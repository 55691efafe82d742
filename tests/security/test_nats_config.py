"""NATS authentication and TLS settings: bad ones fail at load (and `nixboot check-config`,
`nixboot serve`) with a message naming the key, never with the secret, and nothing is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nixboot_shared import bus
from nixboot_shared.config import ConfigError, NatsConfig, load

from .natsauth import Pki, base_env, secret_file, user_nkey


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def nats_env(**values: str) -> dict[str, str]:
    return {f"NIXBOOT_NATS__{k.upper()}": v for k, v in values.items()}


def test_good_settings_load(tmp_path: Path, pki: Pki) -> None:
    pw = secret_file(tmp_path / "pw", "s3cret-password-value")
    cfg = load(
        None,
        nats_env(
            url="tls://n1:4222,tls://n2:4222",
            user="nixboot",
            password_file=str(pw),
            tls_ca_file=str(pki.ca),
            tls_cert_file=str(pki.client_cert),
            tls_key_file=str(pki.client_key),
        ),
    )
    assert cfg.nats.tls_enabled()
    opts = bus.client_options(cfg.nats)
    assert opts["user"] == "nixboot" and opts["password"]() == "s3cret-password-value"
    assert opts["tls"].verify_mode.name == "CERT_REQUIRED"
    seed_file, _, _ = user_nkey(tmp_path)
    cfg = load(None, nats_env(url="nats://n1:4222", nkey_seed_file=str(seed_file)))
    assert bus.client_options(cfg.nats) == {"nkeys_seed": str(seed_file)}
    assert not cfg.nats.tls_enabled()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"user": "nixboot"}, "nats.user and nats.password_file: set both or neither"),
        ({"password_file": "PW"}, "nats.user and nats.password_file: set both or neither"),
        (
            {"user": "u", "password_file": "/nonexistent/pw"},
            "nats.password_file: /nonexistent/pw does not exist",
        ),
        ({"user": "u", "password_file": "EMPTY"}, "nats.password_file: .* is empty"),
        ({"user": "u", "password_file": "DIR"}, "nats.password_file: .* cannot be read"),
        ({"nkey_seed_file": "PW"}, "nats.nkey_seed_file: .* does not hold a user nkey seed"),
        ({"credentials_file": "PW"}, "nats.credentials_file: .* is not a NATS .creds file"),
        ({"user": "u", "password_file": "PW", "nkey_seed_file": "SEED"}, "choose one of"),
        ({"tls_cert_file": "CERT"}, "nats.tls_cert_file and nats.tls_key_file: set both"),
        ({"tls_key_file": "KEY"}, "nats.tls_cert_file and nats.tls_key_file: set both"),
        (
            {"tls_ca_file": "/nonexistent/ca.pem"},
            "nats.tls_ca_file: /nonexistent/ca.pem does not exist",
        ),
        ({"tls_ca_file": "PW"}, "nats.tls_\\*: the certificate files do not load"),
        (
            {"tls_cert_file": "CERT", "tls_key_file": "CA"},
            "nats.tls_\\*: the certificate files do not load",
        ),
        (
            {"url": "nats://nixboot:hunter2hunter2@n1:4222"},
            "credentials inside the URL are refused",
        ),
        ({"url": "nats://tok3n@n1:4222"}, "credentials inside the URL are refused"),
        ({"url": "http://n1:4222"}, "scheme 'http' is not"),
    ],
)
def test_bad_settings_fail_at_load_naming_the_key(
    tmp_path: Path, pki: Pki, values: dict[str, str], message: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "dir").mkdir()
    seed_file, _, _ = user_nkey(tmp_path)
    files = {
        "PW": str(secret_file(tmp_path / "pw", "hunter2hunter2-not-a-seed")),
        "EMPTY": str(tmp_path / "empty"),
        "DIR": str(tmp_path / "dir"),
        "SEED": str(seed_file),
        "CERT": str(pki.client_cert),
        "KEY": str(pki.client_key),
        "CA": str(pki.ca),
    }
    env = nats_env(**{k: files.get(v, v) for k, v in values.items()})
    with pytest.raises(ConfigError, match=message) as e:
        load(None, env)
    assert "hunter2hunter2" not in str(e.value)


def test_check_config_and_serve_refuse_a_missing_password_file(tmp_path: Path) -> None:
    env = base_env(
        tmp_path,
        nats_env(url="nats://127.0.0.1:1", user="nixboot", password_file=str(tmp_path / "nope")),
    )
    for args in (["check-config"], ["serve", "cache"], ["up"]):
        r = subprocess.run(
            [sys.executable, "-m", "nixboot", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "nats.password_file" in r.stderr and "does not exist" in r.stderr
    # Nothing was started or written: no state, no sockets.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_check_config_shows_paths_never_secrets(tmp_path: Path, pki: Pki) -> None:
    pw = secret_file(tmp_path / "pw", "a-password-that-must-not-show")
    env = base_env(
        tmp_path,
        nats_env(
            url="tls://127.0.0.1:1",
            user="nixboot",
            password_file=str(pw),
            tls_ca_file=str(pki.ca),
            tls_cert_file=str(pki.client_cert),
            tls_key_file=str(pki.client_key),
        ),
    )
    r = subprocess.run(
        [sys.executable, "-m", "nixboot", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert str(pw) in r.stdout and "a-password-that-must-not-show" not in r.stdout
    assert pki.key_secret() not in r.stdout


def test_redact_strips_user_and_password_from_urls() -> None:
    assert bus.redact("nats://u:p@h:4222, tls://tok@h2:4222") == "nats://h:4222,tls://h2:4222"
    assert bus.redact("nats://h:4222") == "nats://h:4222"
    assert NatsConfig(url="tls://h:1").tls_enabled()
