"""The compose stack: `docker-compose config` validates it (Debian's docker-compose v1; no engine
runs here, so the containers themselves are not started), and the NATS configuration plus the
secrets make-secrets.sh writes run on a real nats-server and decode with nixboot's config loader."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.errors import NoServersError

from nixboot_shared import bus, config, subjects

from .natsproc import NATS_SERVER, free_port, wait_jetstream, wait_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
SERVICES = {"nats", "builder", "cache", "tftp", "dhcp-hook", "prometheus", "grafana"}


def compose_config() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    assert exe, (
        "docker-compose is missing: apt-get install docker-compose (deploy/packages/deploy.txt)"
    )
    out = subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # docker-compose v1 prints YAML only; Debian's docker-compose brings python3-yaml.
    as_json = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import json,sys,yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=out.stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    data: dict[str, Any] = json.loads(as_json.stdout)
    return data


def test_compose_file_validates_with_pinned_images_and_the_expected_topology() -> None:
    cfg = compose_config()
    services = cfg["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
    env = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert services["nats"]["image"] == env["NATS_IMAGE"]
    assert services["cache"]["image"] == f"{env['NIXBOOT_IMAGE']}:{env['NIXBOOT_TAG']}"
    # PXE needs the host network for TFTP and the DHCP hook.
    assert services["tftp"]["network_mode"] == "host"
    assert services["dhcp-hook"]["network_mode"] == "host"
    # Only tftp gets a capability, and only the one for port 69.
    for name in ("builder", "cache", "tftp", "dhcp-hook"):
        svc = services[name]
        assert svc["command"] == [name]
        assert svc["cap_drop"] == ["ALL"]
        assert svc.get("cap_add", []) == (["NET_BIND_SERVICE"] if name == "tftp" else [])
        assert svc["read_only"] is True
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert Path(svc["build"]["context"]) == REPO
    # Builder and cache share one named volume for the Nix store.
    for name in ("builder", "cache"):
        assert any(v.startswith("nix-store:/nix:") for v in _volumes(services[name])), name
    assert "nix-store" in cfg["volumes"] and "nats-data" in cfg["volumes"]
    assert any(v.startswith("nats-data:/data") for v in _volumes(services["nats"]))
    # Secrets are files, never environment values.
    assert {s for s in cfg["secrets"]} >= {
        "nixboot-config",
        "api-token",
        "cache-signing-key",
        "nats-auth",
        "nats-password",
        "grafana-admin-password",
    }
    for name in ("builder", "cache", "tftp", "dhcp-hook"):
        env_vars = services[name].get("environment", {})
        assert env_vars["NIXBOOT_CONFIG"] == "/run/secrets/nixboot-config"
        assert not any("PASSWORD" in k or "TOKEN" in k for k in env_vars), name
        # Every service that talks to NATS gets the password file the config names.
        assert "nats-password" in [
            x if isinstance(x, str) else x["source"] for x in services[name]["secrets"]
        ], name


def _volumes(svc: dict[str, Any]) -> list[str]:
    return [
        v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}"
        for v in svc.get("volumes", [])
    ]


def test_compose_mounts_the_monitoring_provisioning_paths() -> None:
    services = compose_config()["services"]
    prom = _volumes(services["prometheus"])
    graf = _volumes(services["grafana"])
    assert any(v.startswith(f"{REPO}/deploy/prometheus/prometheus.yml:") for v in prom), prom
    assert any(v.startswith(f"{REPO}/deploy/grafana/provisioning:") for v in graf), graf
    assert any(v.startswith(f"{REPO}/deploy/grafana/dashboards:") for v in graf), graf
    assert any(v.startswith(f"{COMPOSE_DIR}/nats/nats.conf:") for v in _volumes(services["nats"]))
    assert (COMPOSE_DIR / "nats" / "nats.conf").is_file()


def test_compose_file_with_an_unknown_key_is_rejected(tmp_path: Path) -> None:
    """The validation above can fail: the same tool refuses a broken file."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("    restart: unless-stopped\n", "    restartt: no\n", 1)
    )
    out = subprocess.run(
        ["docker-compose", "-f", str(broken), "config"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "restartt" in out.stderr


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """Run make-secrets.sh on a copy of deploy/compose (the host has nix-store for the key)."""
    work = tmp_path / "compose"
    shutil.copytree(COMPOSE_DIR, work, ignore=shutil.ignore_patterns("secrets"))
    env = {"PATH": "/usr/bin:/bin", "NIX_CONFIG": "substituters ="}
    out = subprocess.run(
        [str(work / "make-secrets.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    before = {p.name: p.read_bytes() for p in (work / "secrets").iterdir()}
    # Running it again keeps every credential.
    subprocess.run(
        [str(work / "make-secrets.sh")], check=True, capture_output=True, env=env, timeout=60
    )
    assert {p.name: p.read_bytes() for p in (work / "secrets").iterdir()} == before
    return work / "secrets"


def test_generated_config_decodes_with_nixbooks_loader(secrets: Path) -> None:
    # The config names the password file at its in-container path: point it at the generated one.
    cfg = config.load(
        secrets / "nixboot.toml",
        environ={"NIXBOOT_NATS__PASSWORD_FILE": str(secrets / "nats-password")},
    )
    assert cfg.api_token_file == "/run/secrets/api-token"
    assert cfg.cache.secret_key_file == "/run/secrets/cache-signing-key"
    url = urlsplit(cfg.nats.url)
    assert (url.hostname, url.port, url.username, url.password) == ("nats", 4222, None, None)
    assert cfg.nats.user == "nixboot"
    raw = tomllib.loads((secrets / "nixboot.toml").read_text())
    assert raw["nats"]["password_file"] == "/run/secrets/nats-password"
    password = (secrets / "nats-password").read_text().strip()
    assert len(password) == 48
    assert password in (secrets / "nats-auth.conf").read_text()
    # The configuration itself carries no secret.
    assert password not in (secrets / "nixboot.toml").read_text()
    assert (cfg.tftp.port, cfg.cache.http.port, cfg.builder.http.port) == (69, 8080, 8081)
    assert (cfg.dhcp_hook.http.port, cfg.tftp.http.port) == (8082, 8083)
    # The tftp container's state-dir override wins over the file.
    env_cfg = config.load(
        secrets / "nixboot.toml",
        environ={
            "NIXBOOT_STATE_DIR": "/var/lib/nixboot-tftp",
            "NIXBOOT_NATS__PASSWORD_FILE": str(secrets / "nats-password"),
        },
    )
    assert env_cfg.state_dir == "/var/lib/nixboot-tftp"
    key = (secrets / "cache-signing-key").read_text()
    assert key.startswith("nixboot-1:")
    assert oct((secrets).stat().st_mode & 0o777) == "0o700"


async def test_nats_conf_with_generated_auth_runs_and_rejects_strangers(
    secrets: Path, tmp_path: Path
) -> None:
    """The compose NATS config on the real server: the same file, with only the listen address,
    the monitoring port and the store directory moved to this test's."""
    etc = tmp_path / "etc-nats"
    etc.mkdir()
    shutil.copy(secrets / "nats-auth.conf", etc / "auth.conf")
    port = free_port()
    conf = (COMPOSE_DIR / "nats" / "nats.conf").read_text()
    conf = re.sub(r"(?m)^listen: .*$", f"listen: 127.0.0.1:{port}", conf)
    conf = re.sub(r"(?m)^http: .*$", f"http: 127.0.0.1:{free_port()}", conf)
    conf = re.sub(r"(?m)^  store_dir: .*$", f"  store_dir: {tmp_path / 'data'}", conf)
    (etc / "nats.conf").write_text(conf)
    check = subprocess.run(
        [str(NATS_SERVER), "-c", str(etc / "nats.conf"), "-t"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        [str(NATS_SERVER), "-c", str(etc / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        cfg = config.load(
            secrets / "nixboot.toml",
            environ={
                "NIXBOOT_NATS__URL": f"nats://127.0.0.1:{port}",
                "NIXBOOT_NATS__PASSWORD_FILE": str(secrets / "nats-password"),
            },
        )
        url = cfg.nats.url
        await wait_jetstream(url, cfg.nats)
        nc = await bus.connect(url, "test-compose", settings=cfg.nats)
        try:
            kv = await bus.bootstrap(nc.jetstream(), cfg.nats.replicas)
            assert set(kv) == set(subjects.ALL_BUCKETS)
        finally:
            await nc.close()
        for bad in (f"nats://127.0.0.1:{port}", f"nats://nixboot:wrong@127.0.0.1:{port}"):
            with pytest.raises((NoServersError, nats.errors.Error, OSError)):
                await nats.connect(
                    bad, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
                )
    finally:
        proc.terminate()
        proc.wait(10)
