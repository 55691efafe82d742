"""The safe TFTP server against real clients (tftp-hpa, atftp, curl) and hostile input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import tftpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixboot_tftp.files import memory_file
from nixboot_tftp.server import Source
from tests.tftp.tftp_helpers import (
    LossyRelay,
    atftp,
    curl,
    raw_get,
    rrq,
    running_server,
    tftp_hpa,
    wrq,
)


@pytest.mark.parametrize("name", ["prog.0", "exact.efi", "empty.c32", "sub/inner.txt", "link-in"])
def test_tftp_hpa_fetches(tftp_root: Path, tmp_path: Path, name: str) -> None:
    with running_server(tftp_root) as srv:
        out = tmp_path / "out"
        r = tftp_hpa(srv.port, name, out)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == (tftp_root / name).read_bytes()
        t = srv.wait_transfers(1)[0]
        assert (t.result, t.bytes, t.file) == ("ok", (tftp_root / name).stat().st_size, name)


def test_tftp_hpa_netascii_mode(tftp_root: Path, tmp_path: Path) -> None:
    """tftp-hpa's default mode is netascii: the server converts, the client converts back."""
    with running_server(tftp_root) as srv:
        out = tmp_path / "out"
        r = tftp_hpa(srv.port, "sub/inner.txt", out, mode="ascii")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == (tftp_root / "sub/inner.txt").read_bytes()


@pytest.mark.parametrize(
    "options",
    [(), ("tsize 0",), ("blksize 1468",), ("blksize 1468", "tsize 0"), ("blksize 8",)],
)
def test_atftp_fetches_with_options(tftp_root: Path, tmp_path: Path, options: tuple[str]) -> None:
    with running_server(tftp_root) as srv:
        for name in ("prog.0", "exact.efi", "empty.c32"):
            out = tmp_path / name
            r = atftp(srv.port, name, out, *options)
            assert r.returncode == 0, r.stderr
            assert out.read_bytes() == (tftp_root / name).read_bytes()


@pytest.mark.parametrize("args", [(), ("--tftp-blksize", "1468"), ("--tftp-no-options",)])
def test_curl_fetches(tftp_root: Path, args: tuple[str, ...]) -> None:
    with running_server(tftp_root) as srv:
        r = curl(srv.port, "prog.0", *args)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (tftp_root / "prog.0").read_bytes()


@pytest.mark.parametrize("window", ["2", "4", "16"])
def test_atftp_windowsize(tftp_root: Path, tmp_path: Path, window: str) -> None:
    big = tftp_root / "big.efi"
    big.write_bytes(os.urandom(1_048_576))
    with running_server(tftp_root) as srv:
        out = tmp_path / "out"
        r = atftp(srv.port, "big.efi", out, "blksize 1468", f"windowsize {window}")
        assert r.returncode == 0, r.stderr
        assert f"windowsize = {window}" in (r.stdout + r.stderr)
        assert out.read_bytes() == big.read_bytes()
        t = srv.wait_transfers(1)[0]
        assert (t.result, t.windowsize, t.blksize) == ("ok", int(window), 1468)


def test_windowsize_negotiation_raw(tftp_root: Path) -> None:
    with running_server(tftp_root) as srv:
        r = raw_get(srv.port, "prog.0", windowsize_ack=4, windowsize="4", blksize="1024")
        assert r.oack == {"blksize": "1024", "windowsize": "4"}
        assert r.data == (tftp_root / "prog.0").read_bytes()
        r = raw_get(srv.port, "prog.0", windowsize_ack=64, windowsize="9999")
        assert r.oack == {"windowsize": "64"}  # lowered to the server's maximum, as RFC 7440 allows
        assert r.data == (tftp_root / "prog.0").read_bytes()


@pytest.mark.parametrize(
    "relay_client",
    [
        ("atftp", ("blksize 1468",)),
        ("atftp", ("blksize 1468", "windowsize 4")),
    ],
)
def test_transfer_survives_ten_percent_loss(
    tftp_root: Path, tmp_path: Path, relay_client: tuple[str, tuple[str, ...]]
) -> None:
    # atftp is the lossy-link client (as in Pixiecore's interop test). curl 7.88's TFTP client
    # stalls under loss ("getpeername() failed", exit 28) against tftpd-hpa as well, so it is
    # not used here.
    client, options = relay_client
    with running_server(tftp_root, default_timeout=0.2) as srv:
        relay = LossyRelay(srv.port, loss=0.10)
        try:
            out = tmp_path / "out"
            if client == "atftp":
                r = atftp(relay.port, "prog.0", out, *options, timeout=1)
                assert r.returncode == 0, r.stderr
                got = out.read_bytes()
            else:
                c = subprocess.run(
                    ["curl", "-sS", "--max-time", "60", f"tftp://127.0.0.1:{relay.port}/prog.0"],
                    capture_output=True,
                    timeout=70,
                )
                assert c.returncode == 0, c.stderr
                got = c.stdout
            assert got == (tftp_root / "prog.0").read_bytes()
            assert relay.dropped > 0
        finally:
            relay.close()


def test_unknown_options_ignored(tftp_root: Path) -> None:
    with running_server(tftp_root) as srv:
        r = raw_get(srv.port, "prog.0", foo="bar", blksize="1024", TSIZE="0")
        assert r.oack == {"blksize": "1024", "tsize": "70000"}
        r = raw_get(srv.port, "prog.0", foo="bar")
        assert r.oack is None  # nothing we understood: plain RFC 1350 transfer
        assert r.data == (tftp_root / "prog.0").read_bytes()


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"blksize": "7"}, 8),
        ({"blksize": "0"}, 8),
        ({"blksize": "-5"}, 8),
        ({"blksize": "abc"}, 8),
        ({"windowsize": "0"}, 8),
        ({"windowsize": "70000"}, 8),
        ({"timeout": "0"}, 8),
        ({"timeout": "256"}, 8),
        ({"tsize": "x"}, 8),
    ],
)
def test_out_of_range_options_refused(
    tftp_root: Path, options: dict[str, str], expect: int
) -> None:
    with running_server(tftp_root) as srv:
        r = raw_get(srv.port, "prog.0", **options)
        assert r.error is not None and r.error[0] == expect, r
        assert raw_get(srv.port, "prog.0").data == (tftp_root / "prog.0").read_bytes()


def test_large_blksize_capped(tftp_root: Path) -> None:
    with running_server(tftp_root) as srv:
        r = raw_get(srv.port, "prog.0", blksize="70000")
        assert r.oack == {"blksize": "65464"}
        assert r.data == (tftp_root / "prog.0").read_bytes()


ESCAPES: list[str | bytes] = [
    "../outside/secret",
    "sub/../../outside/secret",
    "sub/../prog.0",
    "./prog.0",
    "sub//inner.txt",
    "/etc/passwd",
    "\\etc\\passwd",
    "..\\outside\\secret",
    "sub\\..\\..\\outside\\secret",
    "link-out",
    "dir-out/secret",
    "dir-out",
    "sub",
    "fifo",
    "..",
    ".",
    "pxelinux.cfg/../../outside/secret",
    "prog.0/",
    "line\nbreak",
    b"\xff\xfe",
    "%2e%2e/outside/secret",
]


def test_path_escapes_refused_and_nothing_outside_read(tftp_root: Path, tmp_path: Path) -> None:
    opened: list[Path] = []
    with running_server(tftp_root) as srv:
        real_opener = srv.server.files.opener

        def spy(path: Path):  # type: ignore[no-untyped-def]
            opened.append(Path(path))
            return real_opener(path)

        srv.server.files.opener = spy
        names = [*ESCAPES, str(tftp_root / "prog.0"), str(tmp_path / "outside" / "secret")]
        for name in names:
            r = raw_get(srv.port, name)
            assert r.error is not None, f"{name!r} was served"
            assert r.error[0] in (1, 2, 4), (name, r.error)
            assert b"TOP-SECRET" not in r.data
        # Still serving, and the fifo did not block the loop.
        assert raw_get(srv.port, "prog.0").data == (tftp_root / "prog.0").read_bytes()
    root = tftp_root.resolve()
    assert opened, "the spy saw no opens"
    for path in opened:
        assert root in path.parents, f"opened {path} outside the root"


def test_write_request_refused(tftp_root: Path, tmp_path: Path) -> None:
    src = tmp_path / "upload"
    src.write_bytes(b"evil")
    with running_server(tftp_root) as srv:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(wrq("new-file"), ("127.0.0.1", srv.port))
            pkt, _ = s.recvfrom(1000)
            assert pkt[:4] == b"\x00\x05\x00\x02"  # ERROR, access violation
        r = subprocess.run(
            ["tftp", "-m", "binary", "127.0.0.1", str(srv.port), "-c", "put", str(src), "prog.0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "Error code 2" in r.stdout + r.stderr
        r2 = subprocess.run(
            ["atftp", "-p", "-l", str(src), "-r", "new2", "127.0.0.1", str(srv.port)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert r2.returncode != 0
        results = [t.result for t in srv.wait_transfers(3)]
        assert results.count("denied") >= 3
    assert not (tftp_root / "new-file").exists() and not (tftp_root / "new2").exists()
    assert (tftp_root / "prog.0").stat().st_size == 70_000


packets_strategy = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda p, n: p[:n],
        st.sampled_from([rrq("prog.0", blksize="1024"), wrq("x")]),
        st.integers(0, 30),
    ),
    st.builds(
        lambda op, body: op + body,
        st.sampled_from(
            [b"\x00\x01", b"\x00\x02", b"\x00\x03", b"\x00\x04", b"\x00\x05", b"\x00\x06"]
        ),
        st.binary(max_size=100),
    ),
)


def test_random_and_truncated_packets(tftp_root: Path) -> None:
    with running_server(tftp_root, default_timeout=0.2) as srv:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.02)

        @settings(
            max_examples=300,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(packets_strategy, min_size=1, max_size=5), st.booleans())
        def fuzz(batch: list[bytes], to_session: bool) -> None:
            dest = ("127.0.0.1", srv.port)
            if to_session:
                # Open a transfer, then throw the batch at its transfer port.
                sock.sendto(rrq("prog.0"), dest)
                with contextlib.suppress(TimeoutError):
                    _, dest = sock.recvfrom(70000)
            for pkt in batch:
                sock.sendto(pkt, dest)
            while True:
                try:
                    sock.recvfrom(70000)
                except (TimeoutError, ConnectionRefusedError):
                    break

        fuzz()
        sock.close()
        # No wall-clock budget here: a hang is caught by pytest-timeout (timeout = 300 in the
        # root pyproject.toml), and speed is a benchmark's business.
        assert srv.thread is not None and srv.thread.is_alive()
        assert raw_get(srv.port, "prog.0").data == (tftp_root / "prog.0").read_bytes()


def test_half_open_transfers_do_not_starve_clients(tftp_root: Path, tmp_path: Path) -> None:
    """1000 requests from another address that never acknowledge; a real client is still served
    and the number of transfers stays bounded."""
    with running_server(tftp_root, max_transfers=64) as srv:
        peak = 0
        for i in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.2", 0))
                s.sendto(rrq("prog.0", blksize="1468", tsize="0"), ("127.0.0.1", srv.port))
            if i % 100 == 0:
                peak = max(peak, len(srv.server.sessions))
        out = tmp_path / "out"
        # PXE firmware restarts a failed transfer; so may this client, twice. On a loaded
        # machine the flood's backlog can outlast one attempt's timeout (seen once in CI:
        # atftp timed out, then found the transfer it finally got already given up).
        failures = []
        for _ in range(3):
            r = atftp(srv.port, "prog.0", out, "blksize 1468")
            if r.returncode == 0:
                break
            failures.append((r.stderr, dataclasses.asdict(srv.server.stats)))
        assert r.returncode == 0, failures
        assert out.read_bytes() == (tftp_root / "prog.0").read_bytes()
        assert curl(srv.port, "prog.0").stdout == (tftp_root / "prog.0").read_bytes()
        assert peak <= 64
        assert srv.server.stats.evicted > 0
        # The dead transfers are reaped after their retries.
        deadline = time.monotonic() + 10
        while srv.server.sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not srv.server.sessions


def test_dynamic_handler_memory_file(tftp_root: Path) -> None:
    def handler(name: str, client: str) -> Source | None:
        if name == "hello.cfg":
            return Source(memory_file(f"hello {client}\n".encode()), kind="menu", mac=None)
        return None

    with running_server(tftp_root, handler=handler) as srv:
        r = curl(srv.port, "hello.cfg")  # curl asks for tsize
        assert r.stdout == b"hello 127.0.0.1\n"
        assert raw_get(srv.port, "hello.cfg").data == b"hello 127.0.0.1\n"
        kinds = [t.kind for t in srv.wait_transfers(2)]
        assert kinds == ["menu", "menu"]


def _stock_tftpy(root: Path, dyn) -> tuple[tftpy.TftpServer, threading.Thread, int]:  # type: ignore[no-untyped-def]
    server = tftpy.TftpServer(str(root), dyn_file_func=dyn)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = 0
    thread = threading.Thread(target=server.listen, args=("127.0.0.1", 0), daemon=True)
    thread.start()
    server.is_running.wait(5)
    port = server.listenport
    sock.close()
    return server, thread, port


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_memory_file_works_in_stock_tftpy_where_bytesio_crashes(tftp_root: Path) -> None:
    """Why files.memory_file exists: unmodified tftpy (flock on) serves it, and dies on BytesIO."""
    server, thread, port = _stock_tftpy(tftp_root, lambda name, **_: memory_file(b"menu\n"))
    try:
        assert curl(port, "x.cfg").stdout == b"menu\n"
        assert thread.is_alive()
    finally:
        server.stop(now=True)
        thread.join(10)
    server, thread, port = _stock_tftpy(tftp_root, lambda name, **_: io.BytesIO(b"menu\n"))
    curl(port, "x.cfg")
    thread.join(10)
    assert not thread.is_alive(), "stock tftpy survived BytesIO: the documented trap changed"


def test_port_permission_error_says_what_to_do() -> None:
    root = tempfile.mkdtemp(prefix="nb-tftp-perm-")
    os.chmod(root, 0o755)  # readable by the unprivileged user below
    tmp_path = Path(root)
    code = (
        "from nixboot_tftp.server import SafeTftpServer, PortPermissionError\n"
        f"s = SafeTftpServer({str(tmp_path)!r})\n"
        "try:\n    s.bind('127.0.0.1', 69)\nexcept PortPermissionError as e:\n    print(e)\n"
    )
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            *cmd,
        ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    os.rmdir(root)
    assert "CAP_NET_BIND_SERVICE" in r.stdout, r.stdout + r.stderr
    assert "tftp.port" in r.stdout
