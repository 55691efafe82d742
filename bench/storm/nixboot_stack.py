"""The nixboot stack as the benchmark runs it: nats-server and the four services on loopback, each
a `nixboot serve` process, so one service (the cache) can be restarted cold between rounds.

The processes are tests/harness/stack.py's (shared with tests/faults); this adds the benchmark's
machine list and the cold cache restart."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# `python bench/storm` puts bench/storm first on sys.path; the harness lives under the repo root.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.harness.stack import SERVICES, Stack, free_port, wait_generations  # noqa: E402

__all__ = ["SERVICES", "NixbootStack", "free_port", "wait_generations"]


@dataclass
class NixbootStack(Stack):
    machines: list[tuple[str, str]]  # (mac, attr)

    def machine_attrs(self) -> list[tuple[str, str]]:
        return self.machines

    def restart_cache_cold(self) -> None:
        """Cold: no compressed NAR on disk, no memo in memory."""
        self.stop_service("cache")
        shutil.rmtree(self.state / "cache", ignore_errors=True)
        self.start_service("cache")
        self.wait_healthy(("cache",))
