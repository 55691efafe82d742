from __future__ import annotations

from pathlib import Path

import pytest

from nixboot_shared.config import ConfigError, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nixboot.toml"
    path.write_text(text)
    return path


def test_defaults_and_env_overrides(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, 'state_dir = "/srv/nb"\n[tftp]\nport = 6969\n'),
        environ={"NIXBOOT_CACHE__HTTP__PORT": "9090", "NIXBOOT_NATS__URL": "nats://a:1,nats://b:2"},
    )
    assert (cfg.state_dir, cfg.tftp.port, cfg.cache.http.port) == ("/srv/nb", 6969, 9090)
    assert cfg.nats.url == "nats://a:1,nats://b:2"
    assert cfg.builder.keep_generations == 5


def test_machines_are_normalised(tmp_path: Path) -> None:
    text = '[[machines]]\nmac = "52-54-00-AA-BB-CC"\nname = "pc1"\nattr = "demo"\n'
    cfg = load(write(tmp_path, text), environ={})
    assert cfg.machines[0].mac == "52:54:00:aa:bb:cc"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[tftp]\nprot = 69\n", {}, "unknown field `prot` - at `$.tftp`"),
        ("[tftp]\nport = 'sixty-nine'\n", {}, "$.tftp.port"),
        ("[tftp]\nport = 70000\n", {}, "tftp.port: port 70000 is outside"),
        ("state_dir = \n", {}, "not valid TOML"),
        ("", {"NIXBOOT_BUILDER__KEEP_GENERATIONS": "0"}, "builder.keep_generations"),
        ("", {"NIXBOOT_NOPE": "1"}, "unknown field `nope`"),
        ('[[machines]]\nmac = "52:54"\nname = "x"\nattr = "y"\n', {}, "machines[0].mac"),
        ("log_level = 'LOUD'\n", {}, "log_level"),
        ("[cache]\nupstream_url = 'http://up:8080'\n", {}, "set both or neither"),
        ("", {"NIXBOOT_CACHE__UPSTREAM_PUBLIC_KEY": "k:AAAA"}, "set both or neither"),
        ("[cache]\nupstream_url = 'ftp://x'\nupstream_public_key = 'k:A'\n", {}, "http(s)"),
        ("[cache]\ninstance = 'room b'\n", {}, "cache.instance"),
        (
            "[cache]\nupstream_url = 'http://u'\nupstream_public_key = 'k:AAAA'\n",
            {},
            "cache.upstream_public_key: expected",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, text), environ=env)
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", environ={})


def test_a_partial_listen_table_keeps_the_service_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "[cache.http]\nport = 9080\n"), environ={})
    assert (cfg.cache.http.host, cfg.cache.http.port) == ("0.0.0.0", 9080)
    cfg = load(write(tmp_path, ""), environ={"NIXBOOT_TFTP__HTTP__HOST": "10.0.0.1"})
    assert (cfg.tftp.http.host, cfg.tftp.http.port) == ("10.0.0.1", 8083)


def test_cache_upstream_and_instance(tmp_path: Path) -> None:
    text = (
        "[cache]\nupstream_url = 'http://up:8080'\n"
        "upstream_public_key = 'nixboot-1:6fQ2AmkGQF0tfMBQ5T1GB3g0JgQWq2Fc8QjYYpXB2xU='\n"
        "instance = 'room-b'\n[timeline]\nenabled = false\n"
    )
    cfg = load(write(tmp_path, text), environ={})
    assert (cfg.cache.upstream_url, cfg.cache.instance) == ("http://up:8080", "room-b")
    assert cfg.timeline.enabled is False
    assert load(write(tmp_path, ""), environ={}).timeline.enabled is True
