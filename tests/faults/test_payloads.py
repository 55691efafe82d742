"""Hook payloads and configuration files: tests/dhcp_hook (test_parse, test_bad_hook_input...)
and tests/foundation/test_config cover named cases; these fuzz the same entry points: whatever
the bytes, the only failure is the module's own clear error (BadLease / ConfigError), never a
crash with another exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixboot_dhcp_hook import hook, parse
from nixboot_shared.config import ConfigError, load

ENV_KEYS = st.sampled_from([
    "DNSMASQ_VENDOR_CLASS", "DNSMASQ_LEASE_EXPIRES", "DNSMASQ_TIME_REMAINING", "DNSMASQ_TAGS",
    "DNSMASQ_USER_CLASS0", "DNSMASQ_SUPPLIED_HOSTNAME", "LEASE4_HWADDR", "LEASE4_ADDRESS",
    "KEA_LEASE4_TYPE", "QUERY4_TYPE", "LEASES4_SIZE", "LEASE4_CLTT", "LEASE4_VALID_LIFETIME",
])  # fmt: skip
ARGV0 = st.sampled_from(["add", "old", "del", "init", "tftp", "lease4_select", "leases4_committed",
                         "lease4_release", "commit", "release", "expiry", ""])  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(
    argv=st.lists(st.one_of(ARGV0, TEXT, st.from_regex(r"[0-9a-fA-F:\-]{0,20}")), max_size=6),
    env=st.dictionaries(
        st.one_of(ENV_KEYS, TEXT), st.one_of(TEXT, st.from_regex(r"-?\d{0,12}")), max_size=6
    ),
    now=st.floats(allow_nan=True, allow_infinity=True),
)  # fmt: skip
def test_hook_calls_fail_only_with_bad_lease(
    argv: list[str], env: dict[str, str], now: float
) -> None:
    payload = hook.capture(argv, {k.encode(): v.encode() for k, v in env.items()}, now)
    try:
        call = parse.decode_hook_payload(payload)
        parse.parse_hook(call.argv, call.env, call.ts)
    except parse.BadLease:
        pass


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(payload=st.binary(max_size=300))
def test_raw_hook_datagrams_fail_only_with_bad_lease(payload: bytes) -> None:
    for data in (payload, hook.MAGIC + b"\0" + payload):
        try:
            call = parse.decode_hook_payload(data)
            parse.parse_hook(call.argv, call.env, call.ts)
        except parse.BadLease:
            pass


TOML_PIECES = st.sampled_from([
    "state_dir = ", "log_level = ", "[nats]\n", "url = ", "[cache]\n", "[cache.http]\n",
    "port = ", "[tftp]\n", "max_transfers = ", "[[machines]]\n", "mac = ", "name = ", "attr = ",
    "[builder]\n", "keep_generations = ", "[timeline]\n", "\"x\"", "-1", "70000", "1e400",
    "[]", "{}", "true", "'''", "\n", "= =", "\"52:54:00:00:00:01\"", "[nats.x]\n",
])  # fmt: skip


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(pieces=st.lists(st.one_of(TOML_PIECES, TEXT), max_size=12))
def test_config_files_fail_only_with_config_error(tmp_path: Path, pieces: list[str]) -> None:
    path = tmp_path / "nixboot.toml"
    path.write_text("".join(pieces))
    try:
        load(path, environ={})
    except ConfigError as e:
        assert str(e)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00", b"log_level = '\xc3'\n", None])
def test_unreadable_config_files_fail_cleanly(tmp_path: Path, data: bytes | None) -> None:
    """Found by the fuzz: a non-UTF-8 file raised UnicodeDecodeError (a traceback at start)."""
    path = tmp_path / "nixboot.toml"
    if data is None:
        path.mkdir()  # a directory where the file should be
    else:
        path.write_bytes(data)
    with pytest.raises(ConfigError, match=r"nixboot\.toml"):
        load(path, environ={})
