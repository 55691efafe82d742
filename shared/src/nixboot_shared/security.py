"""Tokens: the API token for mutations (from a file) and per-boot report tokens (HMAC of the boot
id), so a stage report can only come from the machine whose menu carried that boot id."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import tempfile
from pathlib import Path


def read_or_create_secret(path: Path) -> str:
    """Read a secret from ``path``; create it (0600) with 32 random bytes when missing.

    Services start together and share some of these files (the API token): the file appears
    whole (written aside, then linked into place), and a service that loses the race to create
    it reads the winner's. Never an empty file, never two different secrets."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = _create_secret(path)
    if not value:
        raise ValueError(f"secret file {path} is empty")
    return value


def _create_secret(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    fd, aside = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        try:
            os.link(aside, path)  # unlike rename, never replaces a secret another process made
        except FileExistsError:
            return path.read_text().strip()
    finally:
        os.unlink(aside)
    return value


# Boot ids need to be unique, not secret: the token is what a forger cannot make, and both travel
# in the clear in the menu anyway. os.urandom (secrets) releases the GIL around its syscall,
# so a menu render on the TFTP thread could wait up to a switch interval (5 ms) to get it back
# from the asyncio thread; a generator seeded from it once draws under the GIL.
_boot_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _boot_ids.seed(os.urandom(32)))


def new_boot_id() -> str:
    return f"{_boot_ids.getrandbits(64):016x}"


def boot_token(secret: str, boot_id: str) -> str:
    return hmac.new(secret.encode(), boot_id.encode(), hashlib.sha256).hexdigest()[:32]


def check_boot_token(secret: str, boot_id: str, token: str) -> bool:
    return hmac.compare_digest(boot_token(secret, boot_id), token)


def check_api_token(expected: str, authorization: str | None) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), authorization[7:].strip().encode())
