"""A process run the way a user runs it, its output (stdout and stderr) kept line by line, and the
configuration a test's own `nixboot up` needs (every port free, TFTP unprivileged)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
from pathlib import Path


class OutputProc:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )
        # A reader thread, so a chatty process never blocks on a full pipe.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first output line matching ``pattern``; AssertionError with the output if none
        comes in time or the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.tail(30)}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (if still running) and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc


def write_up_config(
    path: Path, state: Path, ports: dict[str, int], tftp_port: int, nats_table: str
) -> None:
    """A `nixboot up` configuration: each service's HTTP port from ``ports``, TFTP on loopback."""
    path.write_text(
        f'state_dir = "{state}"\n'
        f"[nats]\n{nats_table}\n"
        f'[tftp]\nhost = "127.0.0.1"\nport = {tftp_port}\n'
        f"[tftp.http]\nport = {ports['tftp']}\n"
        f'[cache.http]\nhost = "127.0.0.1"\nport = {ports["cache"]}\n'
        f"[builder.http]\nport = {ports['builder']}\n"
        f"[dhcp_hook.http]\nport = {ports['dhcp-hook']}\n"
    )
