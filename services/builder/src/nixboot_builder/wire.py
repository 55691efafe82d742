"""Messages the builder owns besides events: build requests on the work queue and the records on a
build's live log subject (``subjects.build_log_subject``)."""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from nixboot_shared.events import new_id


class BuildRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One request on ``nixboot.build.request.<attr>``: build the toplevel of ``attr`` and record
    it for every machine using ``attr`` (machines sharing a configuration share the build)."""

    build_id: str = msgspec.field(default_factory=new_id)
    attr: str
    reason: str = "manual"
    # Set by the flake poller, which just fingerprinted the flake: saves the builder a second
    # `nix flake metadata` (a later change is caught by the next poll).
    flake_rev: str | None = None
    requested: float = msgspec.field(default_factory=time.time)


class LogRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One record on a build's log subject: a log line, a progress update, or the end."""

    kind: Literal["line", "progress", "end"]
    text: str = ""
    done: int = 0
    expected: int = 0
    current: str | None = None
    ok: bool | None = None  # on "end"
    toplevel: str | None = None  # on a successful "end"


_request_decoder = msgspec.json.Decoder(BuildRequest)
_log_decoder = msgspec.json.Decoder(LogRecord)


def decode_request(payload: bytes) -> BuildRequest:
    return _request_decoder.decode(payload)


def decode_log(payload: bytes) -> LogRecord:
    return _log_decoder.decode(payload)


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.json.encode(obj)
