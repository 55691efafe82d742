"""The NixOS deployment files: every .nix parses, and what the module renders to TOML (and the
NIXBOOT_* overrides its units set) decodes with nixboot's own config loader. No nixpkgs here, so
module.nix itself is parsed, not evaluated; its pure part (settings.nix) is evaluated."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nixboot_shared import bus, config

from .natsproc import NATS_SERVER, free_port, wait_port

REPO = Path(__file__).resolve().parents[2]
NIXOS = REPO / "deploy" / "nixos"
NIX_FILES = sorted(
    p for p in REPO.rglob("*.nix") if ".venv" not in p.parts and ".git" not in p.parts
)


def nix_instantiate() -> str:
    exe = shutil.which("nix-instantiate")
    assert exe, "nix-instantiate is missing: apt-get install nix-bin"
    return exe


def nix_eval(expr: str) -> Any:
    out = subprocess.run(
        [nix_instantiate(), "--eval", "--strict", "--json", "-E", expr],
        capture_output=True,
        text=True,
        cwd=NIXOS,
        timeout=60,
        env={"NIX_CONFIG": "substituters =", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_deployment_nix_files_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in NIX_FILES}
    for f in ("module.nix", "settings.nix", "package.nix", "example-host.nix"):
        assert f"deploy/nixos/{f}" in names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_nix_file_parses(path: Path) -> None:
    out = subprocess.run(
        [nix_instantiate(), "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_a_syntax_error_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nix"
    bad.write_text("{ services.nixboot = { enable = true; ")
    out = subprocess.run([nix_instantiate(), "--parse", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for what the module renders (tables, arrays of tables, scalars, lists):
    the test's stand-in for pkgs.formats.toml, which needs nixpkgs."""
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(scalars) + "\n"
    for key, value in tables:
        out += f"\n[{prefix}{key}]\n" + to_toml(value, f"{prefix}{key}.")
    for key, items in arrays:
        for item in items:
            out += f"\n[[{prefix}{key}]]\n" + to_toml(item, f"{prefix}{key}.")
    return out


SETTINGS = """{
  log_level = "DEBUG";
  cache.public_url = "http://10.0.0.1:8080";
  cache.http.port = 9080;
  builder.flake = "git+https://git.example.org/lab/fleet";
  builder.nix_options = { max-jobs = "4"; };
  tftp.max_transfers = 64;
  machines = [ { mac = "52-54-00-12-34-56"; name = "lab-01"; attr = "lab"; labels.room = "b12"; } ];
}"""


def test_rendered_settings_decode_with_the_config_loader(tmp_path: Path) -> None:
    rendered = nix_eval(
        f"(import ./settings.nix).render {{ settings = {SETTINGS}; "
        'natsUrl = "nats://n1:4222,nats://n2:4222"; replicas = 3; }'
    )
    path = tmp_path / "nixboot.toml"
    path.write_text(to_toml(rendered))
    cfg = config.load(path, environ={})
    assert cfg.nats.url == "nats://n1:4222,nats://n2:4222"
    assert cfg.nats.replicas == 3
    assert cfg.log_level == "DEBUG"
    assert cfg.cache.http.port == 9080 and cfg.cache.http.host == "0.0.0.0"
    assert cfg.builder.nix_options == {"max-jobs": "4"}
    assert cfg.tftp.max_transfers == 64
    assert cfg.machines[0].mac == "52:54:00:12:34:56" and cfg.machines[0].labels == {"room": "b12"}


def test_a_misspelt_setting_fails_at_load(tmp_path: Path) -> None:
    rendered = nix_eval(
        '(import ./settings.nix).render { settings = { cache.publik_url = "x"; }; '
        'natsUrl = "nats://n1:4222"; replicas = 1; }'
    )
    path = tmp_path / "nixboot.toml"
    path.write_text(to_toml(rendered))
    with pytest.raises(config.ConfigError, match="publik_url"):
        config.load(path, environ={})


def test_module_port_defaults_match_the_config_defaults() -> None:
    nix = nix_eval("(import ./settings.nix).ports { }")
    defaults = config.load(None, environ={})
    assert nix == {
        "tftp": defaults.tftp.port,
        "tftpHttp": defaults.tftp.http.port,
        "cache": defaults.cache.http.port,
        "builder": defaults.builder.http.port,
        "dhcpHook": defaults.dhcp_hook.http.port,
    }
    custom = nix_eval(
        "(import ./settings.nix).httpPorts { cache.http.port = 9080; tftp.http.port = 9083; }"
    )
    assert custom == {"cache": 9080, "tftp": 9083, "builder": 8081, "dhcp-hook": 8082}


ALL_CREDENTIALS = """(import ./settings.nix).credentials {
  name = "cache"; apiTokenFile = "/k/api"; cacheSecretKeyFile = "/k/sign";
  nats = { credentialsFile = "/k/creds"; passwordFile = "/k/pw"; nkeySeedFile = "/k/seed";
           tls = { caFile = "/k/ca"; certFile = "/k/cert"; keyFile = "/k/key"; }; };
}"""


def test_every_environment_override_the_module_sets_is_a_config_key() -> None:
    module = (NIXOS / "module.nix").read_text()
    names = set(re.findall(r'"?(NIXBOOT_[A-Z_]+)"?\s*[=;]', module))
    creds = nix_eval(ALL_CREDENTIALS)
    assert len({c["id"] for c in creds}) == len(creds)  # one credential name each
    names |= {c["env"] for c in creds}
    names.discard("NIXBOOT_CONFIG")  # the file itself, not a key
    expected = {
        "NIXBOOT_STATE_DIR": "state_dir",
        "NIXBOOT_API_TOKEN_FILE": "api_token_file",
        "NIXBOOT_NATS__CREDENTIALS_FILE": "nats.credentials_file",
        "NIXBOOT_NATS__PASSWORD_FILE": "nats.password_file",
        "NIXBOOT_NATS__NKEY_SEED_FILE": "nats.nkey_seed_file",
        "NIXBOOT_NATS__TLS_CA_FILE": "nats.tls_ca_file",
        "NIXBOOT_NATS__TLS_CERT_FILE": "nats.tls_cert_file",
        "NIXBOOT_NATS__TLS_KEY_FILE": "nats.tls_key_file",
        "NIXBOOT_CACHE__SECRET_KEY_FILE": "cache.secret_key_file",
        "NIXBOOT_DHCP_HOOK__SOCKET": "dhcp_hook.socket",
    }
    assert names == set(expected)
    # Decode the overrides with the loader's own env mapping and schema (unknown keys fail); the
    # file checks of a full load need real files: test_module_nats_auth_settings_load below.
    data: dict[str, Any] = {}
    config._apply_env(data, {name: f"/run/x/{name}" for name in names})
    cfg = msgspec.convert(data, config.Config, strict=False)
    for name, key in expected.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == f"/run/x/{name}", key
    # Only the cache gets the signing key.
    tftp = nix_eval(ALL_CREDENTIALS.replace('name = "cache"', 'name = "tftp"'))
    assert {c["id"] for c in creds} - {c["id"] for c in tftp} == {"cache-signing-key"}


def test_module_nats_auth_settings_load(tmp_path: Path) -> None:
    """A password set: the module renders the user into the TOML and hands the password file as
    a credential; with the files in place the loader accepts it, and the key never is in TOML."""
    rendered = nix_eval(
        '(import ./settings.nix).render { settings = { }; natsUrl = "nats://n1:4222"; '
        'replicas = 1; natsUser = "nixboot"; }'
    )
    path = tmp_path / "nixboot.toml"
    path.write_text(to_toml(rendered))
    creds = nix_eval(
        '(import ./settings.nix).credentials { name = "dhcp-hook"; nats.passwordFile = "/k/pw"; }'
    )
    assert creds == [{"id": "nats-password", "path": "/k/pw", "env": "NIXBOOT_NATS__PASSWORD_FILE"}]
    credentials_dir = tmp_path / "credentials"  # what systemd's %d holds at run time
    credentials_dir.mkdir()
    (credentials_dir / "nats-password").write_text("pw-from-credential\n")
    env = {c["env"]: str(credentials_dir / c["id"]) for c in creds}
    cfg = config.load(path, environ=env)
    assert (cfg.nats.user, cfg.nats.password_file) == (
        "nixboot",
        env["NIXBOOT_NATS__PASSWORD_FILE"],
    )
    assert "password" not in path.read_text()
    # Without the file (a credential that failed to load) the service refuses to start.
    (credentials_dir / "nats-password").unlink()
    with pytest.raises(config.ConfigError, match=r"nats.password_file: .* does not exist"):
        config.load(path, environ=env)
    # No password file: no user rendered (an external NATS may take nkeys or .creds instead).
    plain = nix_eval(
        '(import ./settings.nix).render { settings = { }; natsUrl = "nats://n1"; replicas = 1; }'
    )
    assert "user" not in plain["nats"]


NKEY = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"


@pytest.mark.parametrize(
    ("nats", "problem"),
    [
        ("{ enableLocal = true; }", "the local NATS requires authentication"),
        (f'{{ enableLocal = true; nkeyPublicKey = "{NKEY}"; }}', "requires authentication"),
        ('{ enableLocal = true; nkeySeedFile = "/s"; nkeyPublicKey = "Ufoo"; }', "not a user nkey"),
        ('{ passwordFile = "/p"; user = ""; }', "passwordFile needs services.nixboot.nats.user"),
        ('{ passwordFile = "/p"; user = "u"; nkeySeedFile = "/s"; }', "choose one of"),
        ('{ credentialsFile = "/c"; nkeySeedFile = "/s"; }', "choose one of"),
        ('{ tls.certFile = "/c"; }', "set both certFile and keyFile"),
        ('{ tls.keyFile = "/k"; }', "set both certFile and keyFile"),
    ],
)
def test_module_refuses_bad_or_open_nats_options(nats: str, problem: str) -> None:
    problems = nix_eval(f"(import ./settings.nix).natsProblems {nats}")
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "nats",
    [
        f'{{ enableLocal = true; nkeySeedFile = "/s"; nkeyPublicKey = "{NKEY}"; }}',
        "{ enableLocal = true; allowUnauthenticated = true; }",
        '{ enableLocal = false; passwordFile = "/p"; user = "nixboot"; }',
        '{ tls = { caFile = "/ca"; certFile = "/c"; keyFile = "/k"; }; credentialsFile = "/c"; }',
        "{ enableLocal = false; }",
    ],
)
def test_module_accepts_good_nats_options(nats: str) -> None:
    assert nix_eval(f"(import ./settings.nix).natsProblems {nats}") == []


async def test_local_nats_authorization_admits_only_the_nkey(tmp_path: Path) -> None:
    """What the module puts in services.nats.settings, run by the real nats-server (as JSON, the
    form nixpkgs writes): nixboot's seed gets in, an anonymous client does not."""
    import nkeys  # type: ignore[import-untyped]

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    authorization = nix_eval(
        f'(import ./settings.nix).natsAuthorization {{ nkeyPublicKey = "{public}"; }}'
    )
    assert nix_eval("(import ./settings.nix).natsAuthorization { }") is None
    port = free_port()
    conf = tmp_path / "nats.json"
    conf.write_text(
        json.dumps(
            {
                "authorization": authorization,
                "listen": f"127.0.0.1:{port}",
                "jetstream": {"store_dir": str(tmp_path / "js")},
            }
        )
    )
    seed_file = tmp_path / "seed"
    seed_file.write_bytes(seed + b"\n")
    proc = subprocess.Popen(
        [str(NATS_SERVER), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        settings = config.NatsConfig(nkey_seed_file=str(seed_file))
        nc = await bus.connect(f"nats://127.0.0.1:{port}", "test", settings=settings)
        await nc.close()
        with pytest.raises(bus.NatsRefused, match=r"(?i)authorization"):
            await bus.connect(f"nats://127.0.0.1:{port}", "anonymous")
    finally:
        proc.terminate()
        proc.wait(10)


def test_example_host_turns_nats_auth_on() -> None:
    host = (NIXOS / "example-host.nix").read_text()
    assert "settings.authorization.users = [ { nkey = natsNkeyPublic; } ];" in host
    assert 'nats.nkeySeedFile = "${secrets}/nats-nkey.seed";' in host
    module = (NIXOS / "module.nix").read_text()
    assert "pure.natsProblems cfg.nats" in module and "pure.natsAuthorization cfg.nats" in module


def test_module_hardening_and_the_one_capability() -> None:
    module = (NIXOS / "module.nix").read_text()
    assert "DynamicUser = true;" in module
    caps = re.findall(r"CAP_[A-Z_]+", module)
    assert set(caps) == {"CAP_NET_BIND_SERVICE"}
    # Granted only inside the tftp block.
    tftp_block = module.split('(mkIf (name == "tftp") {', 1)[1].split("})", 1)[0]
    assert tftp_block.count("CAP_NET_BIND_SERVICE") == 2
    assert module.count("CAP_NET_BIND_SERVICE") == 2
    assert "LoadCredential" in module and "pkgs.formats.toml" in module
    assert "jetstream = true;" in module


def test_module_http_defaults_match_each_services_config_defaults(tmp_path: Path) -> None:
    """An empty `settings` renders exactly config.py's defaults for every HTTP listener."""
    rendered = nix_eval(
        '(import ./settings.nix).render { settings = { }; natsUrl = "nats://n1"; replicas = 1; }'
    )
    path = tmp_path / "nixboot.toml"
    path.write_text(to_toml(rendered))
    cfg = config.load(path, environ={})
    defaults = config.load(None, environ={})
    for section in ("tftp", "cache", "builder", "dhcp_hook"):
        assert getattr(cfg, section).http == getattr(defaults, section).http, section
