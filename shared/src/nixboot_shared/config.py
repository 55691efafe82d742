"""Typed configuration: one TOML file, ``NIXBOOT_*`` environment overrides, decoded with msgspec.

Environment overrides name a key by its path with ``__`` between levels:
``NIXBOOT_TFTP__PORT=6969``, ``NIXBOOT_NATS__URL=nats://a:4222,nats://b:4222``,
``NIXBOOT_STATE_DIR=/var/lib/nixboot``. A value is read as TOML when it parses as one (numbers,
booleans, arrays) and as a plain string otherwise. Unknown keys and wrong types fail at start with a
message naming the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Any

import msgspec

ENV_PREFIX = "NIXBOOT_"
CONFIG_ENV = "NIXBOOT_CONFIG"
# The user of the embedded nats-server's generated password.
EMBEDDED_USER = "nixboot"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class NatsConfig(_Section):
    # Empty: `nixboot up` starts an embedded nats-server with JetStream under the state directory.
    url: str = ""
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 4222
    # JetStream replicas for streams and buckets (3 on a 3-node cluster).
    replicas: int = 1
    # Authentication, one of: `user` + `password_file`; `nkey_seed_file` (a user nkey seed, the
    # server lists only its public key); `credentials_file` (a .creds file: JWT + seed). Secrets
    # live in files only: a user or password inside `url` is refused.
    credentials_file: str = ""
    user: str = ""
    password_file: str = ""
    nkey_seed_file: str = ""
    # TLS: `tls://` URLs, or any of these set (then the server must offer TLS). The CA verifies
    # the server; cert + key (both or neither) are the client's certificate for `verify` servers.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # `nixboot up` with no url: the embedded nats-server requires a password generated in the
    # state directory (<state_dir>/nats-password), so no other local user can use the bus.
    embedded_auth: bool = True

    def tls_enabled(self) -> bool:
        urls = [u.strip() for u in self.url.split(",")]
        return any(u.startswith("tls://") for u in urls) or any(
            (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        )


class HttpListen(_Section):
    host: str = "127.0.0.1"
    port: int = 0
    # "granian" (Rust, zero-copy file responses: ~5x uvicorn on NARs here) or "uvicorn".
    server: str = "uvicorn"


# One class per service so a table that sets only `port` keeps that service's default host.
class TftpHttp(HttpListen):
    port: int = 8083


class CacheHttp(HttpListen):
    host: str = "0.0.0.0"  # booting machines fetch kernels, NARs and menus here
    port: int = 8080
    server: str = "granian"


class BuilderHttp(HttpListen):
    port: int = 8081


class DhcpHookHttp(HttpListen):
    port: int = 8082


class TftpConfig(_Section):
    host: str = "0.0.0.0"
    port: int = 69
    # Directory with pxelinux/iPXE boot programs; empty: Debian's package locations.
    boot_programs_dir: str = ""
    max_transfers: int = 256
    http: TftpHttp = msgspec.field(default_factory=TftpHttp)


class CacheConfig(_Section):
    http: CacheHttp = msgspec.field(default_factory=CacheHttp)
    # URL booting machines use to reach this service (kernel command line, menus).
    public_url: str = "http://127.0.0.1:8080"
    max_bytes: int = 20 * 1024**3
    # ed25519 secret key in Nix's `name:base64` form; empty: generated in the state directory.
    secret_key_file: str = ""
    key_name: str = "nixboot-1"
    # A compressed NAR used this recently is never evicted (a client may be about to fetch it).
    evict_grace_seconds: float = 5.0
    # Another nixboot cache (or any Nix binary cache with zstd NARs) to fill this one from, for
    # an instance on a host without the builder's Nix store; empty: serve the local store.
    upstream_url: str = ""
    # The upstream's public key (`name:base64`, what `nixboot cache key` prints there): every
    # narinfo taken from the upstream must carry a valid signature by it.
    upstream_public_key: str = ""
    # Distinguishes cache instances sharing one NATS: each gets its own durable lease consumer
    # (`nixboot-cache-warm-<instance>`) so every instance warms; empty: `nixboot-cache-warm`.
    instance: str = ""


class BuilderConfig(_Section):
    http: BuilderHttp = msgspec.field(default_factory=BuilderHttp)
    # Flake reference (path or git URL); empty: the bundled demo flake.
    flake: str = ""
    poll_seconds: float = 30.0
    keep_generations: int = 5
    # Extra `--option NAME VALUE` pairs passed to nix (remote builders, max-jobs, ...).
    nix_options: dict[str, str] = msgspec.field(default_factory=dict)


class DhcpHookConfig(_Section):
    http: DhcpHookHttp = msgspec.field(default_factory=DhcpHookHttp)
    # Unix datagram socket the hook command hands leases to; empty: <state_dir>/dhcp-hook.sock.
    socket: str = ""
    # Where the hook command spools leases the service could not take; empty: <state_dir>/spool.
    spool_dir: str = ""


class TimelineConfig(_Section):
    """Boot sessions (the cache service's timeline tracker)."""

    # A gap this long between two events of one machine starts a new boot session.
    gap_seconds: float = 900.0
    # A boot with no outcome this long after its last event counts as abandoned.
    abandon_seconds: float = 900.0
    # After booted/failed, wait this long for late transfer events before recording the metrics.
    settle_seconds: float = 30.0
    # Sessions kept per machine (KV nixboot-boots) for /boots/<mac>/timeline.
    keep_sessions: int = 5
    # How often abandoned and settled sessions are looked for.
    tick_seconds: float = 5.0
    # One tracker writes the boots bucket: with several cache instances, enable it in one.
    enabled: bool = True


class MachineEntry(_Section):
    mac: str
    name: str
    attr: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class Config(_Section):
    state_dir: str = ""
    log_level: str = "INFO"
    # File holding the token mutation APIs require; empty: <state_dir>/api-token (generated).
    api_token_file: str = ""
    # What unknown MACs boot: a nixosConfigurations attribute, or "" for the local disk.
    fallback_attr: str = ""
    menu_timeout_seconds: int = 5
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    tftp: TftpConfig = msgspec.field(default_factory=TftpConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    builder: BuilderConfig = msgspec.field(default_factory=BuilderConfig)
    dhcp_hook: DhcpHookConfig = msgspec.field(default_factory=DhcpHookConfig)
    timeline: TimelineConfig = msgspec.field(default_factory=TimelineConfig)
    machines: list[MachineEntry] = msgspec.field(default_factory=list)
    # Set by `nixboot serve <svc> --replay PREFIX` (nixboot_shared.replay), which also moves the
    # state dir and listeners aside: the service consumes and publishes under PREFIX only.
    replay_prefix: str = ""

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def api_token_path(self) -> Path:
        return Path(self.api_token_file) if self.api_token_file else self.state_path / "api-token"

    def embedded_password_path(self) -> Path:
        return self.state_path / "nats-password"

    def nats_client(self) -> NatsConfig:
        """The NATS settings a client uses. With no ``nats.url`` that is the embedded server
        ``nixboot up`` runs: its address, and (``embedded_auth``, no other method configured)
        the user ``nixboot`` with the password generated in the state directory (when it exists:
        otherwise no ``nixboot up`` has run here)."""
        n = self.nats
        if n.url:
            return n
        host = "127.0.0.1" if n.embedded_host in ("0.0.0.0", "") else n.embedded_host
        url = f"nats://{host}:{n.embedded_port}"
        generated = self.embedded_password_path()
        explicit = n.password_file or n.nkey_seed_file or n.credentials_file
        if n.embedded_auth and not explicit and generated.exists():
            return msgspec.structs.replace(
                n, url=url, user=EMBEDDED_USER, password_file=str(generated)
            )
        return msgspec.structs.replace(n, url=url)


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/nixboot"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "nixboot")


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} is not a table")
            node = child
        node[path[-1]] = _parse_env_value(raw)


def _is_public_key(text: str) -> bool:
    name, sep, b64 = text.strip().partition(":")
    try:
        return bool(sep and name) and len(base64.b64decode(b64, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _validate(cfg: Config) -> None:
    from nixboot_shared.subjects import InvalidMac, normalize_mac

    for section, port in (
        ("tftp.port", cfg.tftp.port),
        ("tftp.http.port", cfg.tftp.http.port),
        ("cache.http.port", cfg.cache.http.port),
        ("builder.http.port", cfg.builder.http.port),
        ("dhcp_hook.http.port", cfg.dhcp_hook.http.port),
        ("nats.embedded_port", cfg.nats.embedded_port),
    ):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{section}: port {port} is outside 0..65535")
    for section, listen in (
        ("tftp.http", cfg.tftp.http),
        ("cache.http", cfg.cache.http),
        ("builder.http", cfg.builder.http),
        ("dhcp_hook.http", cfg.dhcp_hook.http),
    ):
        if listen.server not in ("uvicorn", "granian"):
            raise ConfigError(f"{section}.server: {listen.server!r} is not uvicorn or granian")
    if bool(cfg.cache.upstream_url) != bool(cfg.cache.upstream_public_key):
        raise ConfigError(
            "cache.upstream_url and cache.upstream_public_key: set both or neither "
            "(narinfos from an upstream are accepted only with its signature)"
        )
    if cfg.cache.upstream_url and not cfg.cache.upstream_url.startswith(("http://", "https://")):
        raise ConfigError(f"cache.upstream_url: {cfg.cache.upstream_url!r} is not an http(s) URL")
    if cfg.cache.upstream_public_key and not _is_public_key(cfg.cache.upstream_public_key):
        raise ConfigError(
            "cache.upstream_public_key: expected Nix's `name:base64` of a 32-byte ed25519 key "
            "(what `nixboot cache key` prints on the upstream)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]{0,64}", cfg.cache.instance):
        raise ConfigError(
            f"cache.instance: {cfg.cache.instance!r} must match [A-Za-z0-9_-]{{0,64}}"
        )
    if cfg.replay_prefix:
        from nixboot_shared.subjects import InvalidPrefix, check_replay_prefix

        try:
            check_replay_prefix(cfg.replay_prefix)
        except InvalidPrefix as e:
            raise ConfigError(f"replay_prefix: {e}") from None
    if cfg.builder.keep_generations < 1:
        raise ConfigError("builder.keep_generations: must be at least 1")
    if cfg.timeline.keep_sessions < 1:
        raise ConfigError("timeline.keep_sessions: must be at least 1")
    for key in ("gap_seconds", "abandon_seconds", "tick_seconds"):
        if getattr(cfg.timeline, key) <= 0:
            raise ConfigError(f"timeline.{key}: must be positive")
    if cfg.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"log_level: {cfg.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
    _validate_nats(cfg.nats)
    for i, m in enumerate(cfg.machines):
        try:
            m.mac = normalize_mac(m.mac)
        except InvalidMac as e:
            raise ConfigError(f"machines[{i}].mac: {e}") from None


def _readable(key: str, path: str) -> str:
    """The file's text; a clear ConfigError naming the key when it cannot be used. The text is
    never put into a message: these are secrets."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not text") from None
    except OSError as e:
        raise ConfigError(f"{key}: {path} cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise ConfigError(f"{key}: {path} is empty")
    return text


def _validate_nats(n: NatsConfig) -> None:
    from urllib.parse import urlsplit

    for url in (u.strip() for u in n.url.split(",")):
        if not url:
            continue
        try:
            parts = urlsplit(url if "://" in url else f"nats://{url}")
            parts.port  # noqa: B018 -- raises on a bad port
        except ValueError as e:
            raise ConfigError(f"nats.url: {e}") from None
        if parts.scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(f"nats.url: scheme {parts.scheme!r} is not nats://, tls://, ws(s)://")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ConfigError(
                "nats.url: credentials inside the URL are refused (they end up in logs and "
                "process lists): use nats.user + nats.password_file, nats.nkey_seed_file or "
                "nats.credentials_file"
            )
    if bool(n.user) != bool(n.password_file):
        raise ConfigError("nats.user and nats.password_file: set both or neither")
    methods = [
        key
        for key, value in (
            ("nats.user/password_file", n.password_file),
            ("nats.nkey_seed_file", n.nkey_seed_file),
            ("nats.credentials_file", n.credentials_file),
        )
        if value
    ]
    if len(methods) > 1:
        raise ConfigError(f"NATS authentication: choose one of {', '.join(methods)}")
    if n.password_file:
        _readable("nats.password_file", n.password_file)
    if n.nkey_seed_file:
        seed = _readable("nats.nkey_seed_file", n.nkey_seed_file).strip()
        if not seed.startswith("SU"):
            raise ConfigError(
                f"nats.nkey_seed_file: {n.nkey_seed_file} does not hold a user nkey seed "
                "(a line starting with SU, as `nk -gen user` writes)"
            )
    if n.credentials_file:
        creds = _readable("nats.credentials_file", n.credentials_file)
        if "BEGIN NATS USER JWT" not in creds or "BEGIN USER NKEY SEED" not in creds:
            raise ConfigError(
                f"nats.credentials_file: {n.credentials_file} is not a NATS .creds file "
                "(user JWT and nkey seed blocks)"
            )
    if bool(n.tls_cert_file) != bool(n.tls_key_file):
        raise ConfigError("nats.tls_cert_file and nats.tls_key_file: set both or neither")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if getattr(n, key):
            _readable(f"nats.{key}", getattr(n, key))
    if n.tls_enabled():
        # Load them now: a wrong PEM is a configuration error at start, not a failed handshake.
        try:
            tls_context(n)
        except ssl.SSLError as e:
            raise ConfigError(f"nats.tls_*: the certificate files do not load: {e}") from None


def tls_context(n: NatsConfig) -> ssl.SSLContext:
    """Client TLS for NATS: verify the server against ``tls_ca_file`` (the system CAs when
    empty), present ``tls_cert_file``/``tls_key_file`` when set."""

    ctx = ssl.create_default_context(cafile=n.tls_ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if n.tls_cert_file:
        ctx.load_cert_chain(n.tls_cert_file, n.tls_key_file)
    return ctx


def load(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load the configuration file (``NIXBOOT_CONFIG`` when ``path`` is None) plus overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path if path is not None else environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
        except OSError as e:  # a directory, no permission, ...
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
    _apply_env(data, environ)
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}: {e}") from None
    if not cfg.state_dir:
        cfg.state_dir = default_state_dir()
    _validate(cfg)
    return cfg
