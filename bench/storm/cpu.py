"""CPU seconds spent by each process of a stack (and its live descendants: nginx's worker) and by
the load generator, read from /proc around a storm: where a boot's fixed costs go."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _own_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0  # gone: its last moments are not counted
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def tree_seconds(pid: int) -> float:
    return _own_seconds(pid) + sum(tree_seconds(c) for c in _children(pid))


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    """Per named process tree; ``load generator`` is this process (all its threads) and
    ``hooks+nix-store`` its reaped children (the hook commands and the real `nix-store -r`s)."""
    t = os.times()
    out = {name: tree_seconds(pid) for name, pid in pids.items()}
    out["load generator"] = t.user + t.system
    out["hooks+nix-store"] = t.children_user + t.children_system
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - v for k, v in before.items()}
