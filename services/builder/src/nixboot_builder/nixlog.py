"""Nix's structured log (``--log-format internal-json``), parsed without I/O.

Each stderr line is ``@nix {json}``. What a builder needs from it: how many derivations are built
out of how many (the ``actBuilds`` activity's progress results), which derivation is being built
(``actBuild`` starts), the builders' output lines, and error messages. Anything else (plain lines
from old nix versions or hooks) is kept as a log line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# Nix's ActivityType and ResultType numbers (src/libutil/logging.hh).
ACT_BUILD = 105
ACT_BUILDS = 104
RES_BUILD_LOG_LINE = 101
RES_PROGRESS = 105
RES_POST_BUILD_LOG_LINE = 107

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DRV_NAME = re.compile(r"^/nix/store/[0-9a-z]{32}-(.*)\.drv$")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def drv_name(drv_path: str) -> str:
    """``/nix/store/<hash>-etc.drv`` -> ``etc``."""
    m = _DRV_NAME.match(drv_path)
    return m.group(1) if m else drv_path


@dataclass(frozen=True)
class Progress:
    done: int
    expected: int
    running: int
    failed: int
    current: str | None


@dataclass(frozen=True)
class LogLine:
    text: str
    drv: str | None = None


@dataclass(frozen=True)
class ErrorMessage:
    text: str


Update = Progress | LogLine | ErrorMessage


@dataclass
class BuildLog:
    """Folds log lines into progress; ``feed`` returns what changed for followers."""

    done: int = 0
    expected: int = 0
    running: int = 0
    failed: int = 0
    current: str | None = None
    errors: list[str] = field(default_factory=list)
    _building: dict[int, str] = field(default_factory=dict)  # activity id -> derivation name
    _builds_ids: set[int] = field(default_factory=set)  # ids of "builds" (counting) activities

    def progress(self) -> Progress:
        return Progress(self.done, self.expected, self.running, self.failed, self.current)

    def feed(self, line: str) -> list[Update]:
        line = line.rstrip("\n")
        if not line.startswith("@nix "):
            return [LogLine(strip_ansi(line))] if line.strip() else []
        try:
            msg: Any = json.loads(line[5:])
        except ValueError:
            return [LogLine(strip_ansi(line))]
        if not isinstance(msg, dict):
            return []
        action = msg.get("action")
        if action == "start":
            return self._start(msg)
        if action == "stop":
            name = self._building.pop(msg.get("id", -1), None)
            if name is not None and name == self.current:
                self.current = next(iter(self._building.values()), None)
                return [self.progress()]
            return []
        if action == "result":
            return self._result(msg)
        if action == "msg":
            text = strip_ansi(str(msg.get("msg", "")))
            if msg.get("level", 9) == 0:  # lvlError
                self.errors.append(text)
                return [ErrorMessage(text)]
            return []
        return []

    def _start(self, msg: dict[str, Any]) -> list[Update]:
        if msg.get("type") == ACT_BUILDS:
            self._builds_ids.add(msg.get("id", -1))
            return []
        if msg.get("type") != ACT_BUILD:
            return []
        fields = msg.get("fields") or []
        drv = str(fields[0]) if fields else str(msg.get("text", ""))
        name = drv_name(drv)
        self._building[msg.get("id", -1)] = name
        self.current = name
        return [self.progress(), LogLine(strip_ansi(str(msg.get("text", ""))), name)]

    def _result(self, msg: dict[str, Any]) -> list[Update]:
        kind = msg.get("type")
        fields = msg.get("fields") or []
        if kind in (RES_BUILD_LOG_LINE, RES_POST_BUILD_LOG_LINE) and fields:
            return [LogLine(strip_ansi(str(fields[0])), self._building.get(msg.get("id", -1)))]
        # Only the top-level "builds" activity counts derivations; "copy paths" counts paths.
        if (
            kind == RES_PROGRESS
            and msg.get("id") in self._builds_ids
            and len(fields) >= 4
            and all(isinstance(f, int) for f in fields)
        ):
            new = (fields[0], fields[1], fields[2], fields[3])
            if new != (self.done, self.expected, self.running, self.failed):
                self.done, self.expected, self.running, self.failed = new
                return [self.progress()]
        return []
