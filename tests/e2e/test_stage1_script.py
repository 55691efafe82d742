"""stage1.sh's reports, run by busybox sh against a real HTTP server (no VM): the JSON it sends,
and that an unreachable cache never stops it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nixboot.vmlab import deploy_file
from tests.conftest import free_port, tool

STAGE1 = deploy_file("nixos", "client", "stage1.sh")

BUSYBOX = "/bin/busybox"


class _Recorder(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Recorder.received.append((self.path, dict(self.headers), body))
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def server() -> Iterator[str]:
    _Recorder.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _run(tmp_path: Path, cmdline: str, *args: str) -> subprocess.CompletedProcess[str]:
    tool("busybox")
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    # busybox's applets only: what the initrd has
    bbdir = tmp_path / "bb"
    bbdir.mkdir(exist_ok=True)
    for applet in ("sh", "wget", "timeout", "cut", "awk", "sed", "tr", "cat", "grep"):
        link = bbdir / applet
        if not link.exists():
            link.symlink_to(BUSYBOX)
    env = {"PATH": str(bbdir), "NIXBOOT_CMDLINE_FILE": str(tmp_path / "cmdline")}
    return subprocess.run(
        [BUSYBOX, "sh", str(STAGE1), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_report_posts_the_contract_json(tmp_path: Path, server: str) -> None:
    cmdline = (
        f"console=ttyS0 init=/nix/store/x-sys/init nixboot.cache={server}/ "
        "nixboot.boot_id=b1d nixboot.token=tok3n nixboot.mac=52:54:00:00:00:01"
    )
    proc = _run(tmp_path, cmdline, "report", "closure", "done", 'said "hi"\\ok', "1234", "2.5")
    assert proc.returncode == 0, proc.stderr
    [(path, headers, body)] = _Recorder.received
    assert path == "/report/b1d"
    assert headers["Authorization"] == "Bearer tok3n"
    assert json.loads(body) == {
        "stage": "closure",
        "status": "done",
        "detail": 'said "hi"\\ok',
        "bytes": 1234,
        "seconds": 2.5,
        "mac": "52:54:00:00:00:01",
        "token": "tok3n",
    }


def test_mac_in_either_menu_form_is_read_as_sysfs_writes_it(tmp_path: Path, server: str) -> None:
    """pxelinux menus (tftp) write the MAC with dashes, iPXE menus (cache) with colons."""
    cmdline = (
        f"nixboot.cache={server} nixboot.boot_id=b3 nixboot.token=t nixboot.mac=52-54-00-AB-00-01"
    )
    proc = _run(tmp_path, cmdline, "report", "stage1", "started")
    assert proc.returncode == 0, proc.stderr
    [(_, _, body)] = _Recorder.received
    assert json.loads(body)["mac"] == "52:54:00:ab:00:01"


def test_report_with_empty_detail_and_bad_numbers_is_still_json(
    tmp_path: Path, server: str
) -> None:
    cmdline = f"nixboot.cache={server} nixboot.boot_id=b2 nixboot.token=t"
    proc = _run(tmp_path, cmdline, "report", "stage1", "started", "", "12; rm -rf /", "")
    assert proc.returncode == 0, proc.stderr
    [(_, _, body)] = _Recorder.received
    doc = json.loads(body)
    assert doc["detail"] == "" and doc["bytes"] is None and doc["seconds"] is None
    assert doc["mac"] is None


def test_unreachable_cache_never_fails_a_report(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = _run(tmp_path, f"nixboot.cache={dead} nixboot.boot_id=b3", "report", "disk", "done")
    assert proc.returncode == 0
    assert "not delivered (ignored)" in proc.stderr
    assert time.monotonic() - t0 < 10


def test_bad_usage_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run(tmp_path, "", "frobnicate")
    assert proc.returncode == 2
    assert "usage: stage1.sh" in proc.stderr
    proc = _run(tmp_path, "", "report", "booted")
    assert proc.returncode == 2
