"""The ``.narinfo`` text format: render and parse. Pure; no I/O.

Every line is ``Key: value\\n``; the last line ends in a newline (else Nix says "corrupt").
``Compression`` is always written, because a missing one means bzip2 to the client.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace

from nixboot_cache import nix32

STORE_DIR = "/nix/store"


class InvalidNarInfo(ValueError):
    """A narinfo that is missing required fields or has malformed ones."""


@dataclass(frozen=True)
class NarInfo:
    store_path: str
    url: str
    compression: str
    file_hash: str  # "sha256:<nix32>"
    file_size: int
    nar_hash: str  # "sha256:<nix32>"
    nar_size: int
    references: tuple[str, ...] = ()  # basenames, sorted
    deriver: str | None = None  # basename
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def hash_part(self) -> str:
        return store_hash(self.store_path)

    def with_sigs(self, sigs: tuple[str, ...]) -> NarInfo:
        return replace(self, sigs=sigs)

    def render(self) -> str:
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        # Optional for the client (it never checks them): absent while a NAR is not compressed yet.
        if self.file_hash:
            lines += [f"FileHash: {self.file_hash}", f"FileSize: {self.file_size}"]
        lines += [
            f"NarHash: {self.nar_hash}",
            f"NarSize: {self.nar_size}",
            # Nix writes the space even with no references; keep it for byte equality.
            "References: " + " ".join(sorted(self.references)),
        ]
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        lines += [f"Sig: {s}" for s in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"


def store_hash(store_path: str) -> str:
    """``/nix/store/<hash>-name`` -> ``<hash>``."""
    base = store_path.removeprefix(STORE_DIR + "/")
    return base.split("-", 1)[0]


def is_store_path(path: str) -> bool:
    if not path.startswith(STORE_DIR + "/"):
        return False
    base = path[len(STORE_DIR) + 1 :]
    return len(base) > 33 and base[32] == "-" and nix32.is_store_hash(base[:32]) and "/" not in base


def sha256_to_nix32(value: str) -> str:
    """Normalise a sha256 given as ``sha256:<hex|nix32|base64>`` or SRI ``sha256-<base64>`` (what
    the store database and ``nix path-info --json`` use) to ``sha256:<nix32>``."""
    if value.startswith("sha256-"):
        digest = _b64(value[7:])
    elif value.startswith("sha256:"):
        body = value[7:]
        if len(body) == 64:
            try:
                digest = bytes.fromhex(body)
            except ValueError as e:
                raise InvalidNarInfo(f"bad hex sha256 {value!r}") from e
        elif len(body) == 52:
            try:
                digest = nix32.decode(body, 32)
            except nix32.InvalidNix32 as e:
                raise InvalidNarInfo(f"bad nix32 sha256 {value!r}: {e}") from e
        else:
            digest = _b64(body)
    else:
        raise InvalidNarInfo(f"not a sha256 hash: {value!r}")
    if len(digest) != 32:
        raise InvalidNarInfo(f"sha256 of wrong length: {value!r}")
    return "sha256:" + nix32.encode(digest)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidNarInfo(f"bad base64 {text!r}") from e


def parse(text: str) -> NarInfo:
    if not text.endswith("\n"):
        raise InvalidNarInfo("narinfo does not end in a newline")
    fields: dict[str, str] = {}
    sigs: list[str] = []
    extra: list[tuple[str, str]] = []
    known = {
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "CA",
    }
    for line in text[:-1].split("\n"):
        key, sep, value = line.partition(": ")
        if not sep:
            if line == "References:":  # an empty list written without the space
                fields["References"] = ""
                continue
            raise InvalidNarInfo(f"malformed narinfo line {line!r}")
        if key == "Sig":
            sigs.append(value)
        elif key in known:
            fields[key] = value
        else:
            extra.append((key, value))
    for required in ("StorePath", "URL", "NarHash", "NarSize"):
        if required not in fields:
            raise InvalidNarInfo(f"narinfo lacks {required}")
    if not is_store_path(fields["StorePath"]):
        raise InvalidNarInfo(f"bad StorePath {fields['StorePath']!r}")
    try:
        nar_size = int(fields["NarSize"])
        file_size = int(fields.get("FileSize", "0"))
    except ValueError as e:
        raise InvalidNarInfo(f"bad size: {e}") from e
    if nar_size <= 0:
        raise InvalidNarInfo("NarSize must be positive")
    refs = tuple(r for r in fields.get("References", "").split(" ") if r)
    return NarInfo(
        store_path=fields["StorePath"],
        url=fields["URL"],
        compression=fields.get("Compression", "bzip2"),
        file_hash=fields.get("FileHash", ""),
        file_size=file_size,
        nar_hash=sha256_to_nix32(fields["NarHash"]),
        nar_size=nar_size,
        references=refs,
        deriver=fields.get("Deriver") or None,
        sigs=tuple(sigs),
        ca=fields.get("CA"),
        extra=tuple(extra),
    )
