"""Shared pieces of the cache benchmarks: a synthetic deterministic closure, nginx-light serving a
`nix copy --to file://` cache, our cache service, and timing of the real `nix-store -r`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"
VENV_BIN = Path(sys.executable).parent


def nix_env(xdg: Path) -> dict[str, str]:
    return dict(os.environ, NIX_CONFIG=NIX_CONFIG, XDG_CACHE_HOME=str(xdg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def synthetic_closure(work: Path, paths: int, total_mib: int) -> str:
    """``paths`` leaf store paths (deterministic content: half pseudo-random, half text, so zstd
    has realistic work) and one root derivation referencing all of them."""
    per = total_mib * 2**20 // paths
    leaves = work / "leaves"
    if not leaves.exists():
        tmp = work / "leaves.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for i in range(paths):
            d = tmp / f"p{i:04d}"
            (d / "share").mkdir(parents=True)
            rnd = random.Random(i)
            (d / "share" / "blob").write_bytes(rnd.randbytes(per // 2))
            (d / "share" / "text").write_bytes(
                (f"line {i} lorem ipsum dolor\n" * (per // 52))[: per // 2].encode()
            )
        tmp.rename(leaves)
    bb = work / "bb" / "bin"
    if not bb.exists():
        bb.mkdir(parents=True)
        shutil.copy("/bin/busybox", bb / "busybox")
        (bb / "sh").symlink_to("busybox")
    nix = work / "synthetic.nix"
    nix.write_text(
        f"""let
  bb = builtins.path {{ path = {work}/bb; name = "busybox-static"; }};
  leaf = n: builtins.path {{ path = {leaves} + "/${{n}}"; name = "synthetic-${{n}}"; }};
  names = builtins.attrNames (builtins.readDir {leaves});
in derivation {{
  name = "synthetic-root"; system = "x86_64-linux"; builder = "${{bb}}/bin/sh";
  args = [ "-e" "-c" "mkdir $out; for p in $PATHS; do echo $p >> $out/refs; done" ];
  PATHS = map leaf names;
}}
"""
    )
    out = subprocess.run(
        ["nix-build", str(nix), "--no-out-link"],
        env=nix_env(work / "xdg"),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out


def path_info(path: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """`nix path-info --json -r`: one dict per path of the closure."""
    out = subprocess.run(
        ["nix", "path-info", "--json", "-r", path],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: list[dict[str, Any]] = json.loads(out)
    return info


def closure_stats(path: str, env: dict[str, str]) -> tuple[int, int]:
    info = path_info(path, env)
    return len(info), sum(p["narSize"] for p in info)


def wrk(url: str, seconds: int = 5, conns: int = 16) -> tuple[float, str, str, str]:
    """Requests/s, p50, p99 and transfer/s of `wrk` hammering one URL."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    xfer = re.search(r"Transfer/sec:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    return rps, p50, p99, xfer


def signing_key(work: Path, env: dict[str, str]) -> Path:
    """The benchmarks' cache signing key (``work/sk``, public half ``work/pk``), made once."""
    key = work / "sk"
    if not key.exists():
        subprocess.run(
            ["nix-store", "--generate-binary-cache-key", "bench-1", str(key), str(work / "pk")],
            env=env,
            check=True,
        )
    return key


def nix_copy_file_cache(path: str, dest: Path, key: Path, env: dict[str, str]) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t = time.monotonic()
    subprocess.run(
        ["nix", "copy", "--to", f"file://{dest}?compression=zstd&secret-key={key}", path],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.monotonic() - t


class Nginx:
    def __init__(self, root: Path, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(
            f"""daemon off; worker_processes 2; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }}
  default_type application/octet-stream;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp;
  uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {root}; }} }}
"""
        )
        (work / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/nix-cache-info")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Nats:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "nats-server"),
                "-js",
                "-sd",
                str(work / "js"),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cache_env(state: Path, port: int, nats: str = "") -> dict[str, str]:
    return dict(
        os.environ,
        NIXBOOT_STATE_DIR=str(state),
        NIXBOOT_NATS__URL=nats,
        NIXBOOT_CACHE__HTTP__HOST="127.0.0.1",
        NIXBOOT_CACHE__HTTP__PORT=str(port),
        NIXBOOT_CACHE__PUBLIC_URL=f"http://127.0.0.1:{port}",
        NIXBOOT_LOG_LEVEL="WARNING",
    )


class OurCache:
    def __init__(self, state: Path, nats: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nixboot_cache"],
            env=cache_env(state, self.port, nats),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/healthz")

    def public_key(self) -> str:
        return (self.state / "cache-key.pub").read_text().strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def substitute(url: str, key: str, path: str, work: Path) -> float:
    """Seconds for the real `nix-store -r -j16` into a fresh root with a fresh narinfo cache."""
    with tempfile.TemporaryDirectory(dir=work) as d:
        root = Path(d) / "root"
        env = nix_env(Path(d) / "xdg")
        t = time.monotonic()
        subprocess.run(
            [
                "nix-store",
                "--store",
                f"local?root={root}",
                "-r",
                path,
                "-j16",
                "--option",
                "substituters",
                url,
                "--option",
                "trusted-public-keys",
                key,
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        return time.monotonic() - t
