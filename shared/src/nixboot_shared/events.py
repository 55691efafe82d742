"""Event schemas: one msgspec tagged union, the only thing services say to each other on NATS.

Every event carries a schema version, a unique id (used as ``Nats-Msg-Id`` so a retried publish is
stored once), a timestamp, the MAC when the event concerns one machine, and the boot id once known.
Adding an event type: subclass ``Event`` with a ``tag``, add it to ``AnyEvent``.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

import msgspec

from nixboot_shared.subjects import event_subject, normalize_mac

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


class Event(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    v: int = SCHEMA_VERSION
    id: str = msgspec.field(default_factory=new_id)
    ts: float = msgspec.field(default_factory=time.time)
    mac: str | None = None
    boot_id: str | None = None

    def __post_init__(self) -> None:
        if self.mac is not None:
            self.mac = normalize_mac(self.mac)

    @property
    def kind(self) -> str:
        return str(type(self).__struct_config__.tag)

    @property
    def subject(self) -> str:
        return event_subject(self.kind, self.mac)


LeaseKind = Literal["new", "renew", "release", "expire"]
Arch = Literal["bios", "uefi-x64", "uefi-ia32", "uefi-arm64", "unknown"]


class LeaseSeen(Event, tag="lease"):
    ip: str
    lease_kind: LeaseKind = "new"
    hostname: str | None = None
    expires: float | None = None
    arch: Arch = "unknown"
    user_class: str | None = None
    vendor_class: str | None = None
    source: str = "unknown"  # dnsmasq, kea, isc, http
    server_ts: float | None = None  # the DHCP server's own time, used for ordering


FileKind = Literal["boot-program", "menu", "kernel", "initrd", "other"]
TransferResult = Literal["ok", "not-found", "denied", "error", "timeout", "aborted"]


class BootFileRequested(Event, tag="boot-file"):
    file: str
    file_kind: FileKind
    client: str
    protocol: Literal["tftp", "http"] = "tftp"
    bytes: int = 0
    seconds: float = 0.0
    result: TransferResult = "ok"


class MenuServed(Event, tag="menu"):
    format: Literal["pxelinux", "ipxe"]
    client: str
    default_generation: int | None = None
    generations: list[int] = msgspec.field(default_factory=list)
    fallback: bool = False


class BuildRequested(Event, tag="build-requested"):
    build_id: str
    attr: str
    reason: str = "manual"


class BuildStarted(Event, tag="build-started"):
    build_id: str
    attr: str
    flake_rev: str | None = None


class BuildProgress(Event, tag="build-progress"):
    build_id: str
    attr: str
    done: int
    expected: int
    current: str | None = None


class BuildSucceeded(Event, tag="build-succeeded"):
    build_id: str
    attr: str
    toplevel: str
    seconds: float


class BuildFailed(Event, tag="build-failed"):
    build_id: str
    attr: str
    error: str
    log_tail: str = ""


class GenerationCreated(Event, tag="generation"):
    number: int
    toplevel: str
    attr: str


class GenerationPinned(Event, tag="generation-pinned"):
    number: int
    once: bool  # True: next boot only (one-shot rollback)


class WarmStarted(Event, tag="warm-started"):
    toplevel: str
    paths: int
    trigger: str = "lease"


class WarmProgress(Event, tag="warm-progress"):
    toplevel: str
    done: int
    paths: int
    bytes: int


class WarmFinished(Event, tag="warm-finished"):
    toplevel: str
    paths: int
    bytes: int
    compressed_bytes: int
    seconds: float


Stage = Literal["stage1", "disk", "closure", "stage2", "booted", "failed"]


class StageReported(Event, tag="stage"):
    stage: Stage
    status: Literal["started", "done", "failed"] = "done"
    detail: str = ""
    bytes: int | None = None
    seconds: float | None = None


AnyEvent = (
    LeaseSeen
    | BootFileRequested
    | MenuServed
    | BuildRequested
    | BuildStarted
    | BuildProgress
    | BuildSucceeded
    | BuildFailed
    | GenerationCreated
    | GenerationPinned
    | WarmStarted
    | WarmProgress
    | WarmFinished
    | StageReported
)

_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


class BadEvent(ValueError):
    """A payload that is not a valid nixboot event."""


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(payload: bytes) -> AnyEvent:
    """Decode one event; raise ``BadEvent`` naming what is wrong."""
    try:
        event: AnyEvent = _decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
        raise BadEvent(f"undecodable event: {e}") from e
    return event
