"""Tokens: the API token for mutations (from a file) and per-boot report tokens (HMAC of the boot
id), so a stage report can only come from the machine whose menu carried that boot id."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
from pathlib import Path


def read_or_create_secret(path: Path) -> str:
    """Read a secret from ``path``; create it (0600) with 32 random bytes when missing."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return value
    if not value:
        raise ValueError(f"secret file {path} is empty")
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
