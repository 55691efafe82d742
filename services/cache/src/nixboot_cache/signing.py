"""ed25519 signing of narinfos in Nix's key format.

Secret key file: ``name:base64(seed ‖ public)`` (64 bytes); public key: ``name:base64(public)``;
signature line: ``name:base64(ed25519(fingerprint))``. Ed25519 is deterministic, so our signature
equals ``nix store sign``'s byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nixboot_cache.narinfo import STORE_DIR, NarInfo


class InvalidKey(ValueError):
    """A key that is not ``name:base64`` of the right length."""


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Iterable[str]) -> str:
    """``1;<path>;<sha256:nix32>;<size>;<full reference paths joined by ,>``."""
    refs = ",".join(r if r.startswith("/") else f"{STORE_DIR}/{r}" for r in sorted(references))
    return f"1;{store_path};{nar_hash};{nar_size};{refs}"


def narinfo_fingerprint(info: NarInfo) -> str:
    return fingerprint(info.store_path, info.nar_hash, info.nar_size, info.references)


def _split(text: str, length: int, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    if not sep or not name:
        raise InvalidKey(f"{what} must look like name:base64")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidKey(f"{what} {name!r}: bad base64") from e
    if len(raw) != length:
        raise InvalidKey(f"{what} {name!r}: expected {length} bytes, got {len(raw)}")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        return cls(*_split(text, 32, "public key"))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fp: str, sig: str) -> bool:
        name, sep, b64 = sig.partition(":")
        if not sep or name != self.name:
            return False
        try:
            raw = base64.b64decode(b64, validate=True)
            Ed25519PublicKey.from_public_bytes(self.key).verify(raw, fp.encode())
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    name: str
    seed: bytes

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, 64, "secret key")
        key = cls(name, raw[:32])
        if key.public().key != raw[32:]:
            raise InvalidKey(f"secret key {name!r}: public half does not match the seed")
        return key

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not name or ":" in name:
            raise InvalidKey(f"bad key name {name!r}")
        return cls(name, os.urandom(32))

    def _private(self) -> Ed25519PrivateKey:
        # Loading the key costs more than signing (~170 µs vs ~50 µs here): keep it.
        key: Ed25519PrivateKey | None = self.__dict__.get("_key")
        if key is None:
            key = Ed25519PrivateKey.from_private_bytes(self.seed)
            self.__dict__["_key"] = key
        return key

    def public(self) -> PublicKey:
        raw = self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return PublicKey(self.name, raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.seed + self.public().key).decode()}"

    def sign(self, fp: str) -> str:
        return f"{self.name}:{base64.b64encode(self._private().sign(fp.encode())).decode()}"

    def sign_narinfo(self, info: NarInfo) -> NarInfo:
        """``info`` with our signature replacing any earlier one by the same key name."""
        others = tuple(s for s in info.sigs if not s.startswith(self.name + ":"))
        return info.with_sigs((*others, self.sign(narinfo_fingerprint(info))))


def load_or_create(secret_file: Path, public_file: Path, name: str) -> SecretKey:
    """Read the deployment key; create it (0600, plus the public key beside it) on first start."""
    try:
        return SecretKey.parse(secret_file.read_text())
    except FileNotFoundError:
        pass
    key = SecretKey.generate(name)
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = secret_file.with_name(secret_file.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(key))
    try:
        os.link(tmp, secret_file)  # fails if another process created it first: use theirs
    except FileExistsError:
        os.unlink(tmp)
        return SecretKey.parse(secret_file.read_text())
    os.unlink(tmp)
    public_file.write_text(str(key.public()))
    return key
