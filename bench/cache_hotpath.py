"""The cache's binary-cache hot path under load: requests/s and the server's CPU per request for
``/nix-cache-info``, a narinfo (all paths of a closure in turn), a warm NAR and a malformed
narinfo, with granian embedded exactly as the service runs it (``nixboot_shared.service``), and
nginx on the same `nix copy` cache next to it.

    .venv/bin/python bench/cache_hotpath.py [--paths 20 --mib 20 --seconds 4]

CPU per request: utime + stime of the server process (all its threads, /proc/<pid>/stat) over
the wrk run, divided by the requests wrk counted. wrk runs on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from cache_common import (
    Nginx,
    cache_env,
    free_port,
    nix_copy_file_cache,
    nix_env,
    path_info,
    signing_key,
    synthetic_closure,
    wait_http,
)

TICK = os.sysconf("SC_CLK_TCK")
LUA_CYCLE = """
paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def serve() -> None:
    """The child: the cache's binary-cache app (nixboot_cache.asgi) on embedded granian."""
    from nixboot_cache.asgi import create_app
    from nixboot_shared.config import load
    from nixboot_shared.service import _http_server

    cfg = load()
    coro, _stop = _http_server(create_app(), cfg.cache.http)
    asyncio.run(coro)  # type: ignore[arg-type]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all threads) and of its children (nginx's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / TICK
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += cpu_seconds(int(child))
    return total


def load(
    url_paths: list[str], base: str, pid: int, seconds: int, work: Path
) -> tuple[float, float]:
    """wrk -c16 cycling over ``url_paths``: requests/s and server CPU µs per request."""
    lst = work / "paths.txt"
    lst.write_text("\n".join(url_paths) + "\n")
    script = work / "cycle.lua"
    script.write_text(LUA_CYCLE % lst)
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", str(script), base],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    used = cpu_seconds(pid) - before
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, used / max(total, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=20)
    ap.add_argument("--mib", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--work", default="/tmp/nixboot-bench-hotpath")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = nix_env(work / "xdg")
    top = synthetic_closure(work / f"syn-{args.paths}-{args.mib}", args.paths, args.mib)
    info = path_info(top, env)
    hashes = [p["path"].removeprefix("/nix/store/")[:32] for p in info]
    key = signing_key(work, env)
    nix_copy_file_cache(top, work / "filecache", key, env)
    smallest = min(info, key=lambda p: p["narSize"])["path"].removeprefix("/nix/store/")[:32]

    state = Path(tempfile.mkdtemp(dir=work, prefix="state-"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        env=cache_env(state, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str, float, float]] = []
    try:
        wait_http(base + "/nix-cache-info")
        narinfos = [f"/{h}.narinfo" for h in hashes]
        for p in narinfos:  # starts every compression
            urllib.request.urlopen(base + p).read()
        ni = urllib.request.urlopen(f"{base}/{smallest}.narinfo").read().decode()
        nar = "/" + ni.split("URL: ")[1].split()[0]
        urllib.request.urlopen(base + nar).read()  # waits for that compression
        while (
            "FileSize" not in urllib.request.urlopen(f"{base}/{smallest}.narinfo").read().decode()
        ):
            pass
        cases = {
            "nix-cache-info": ["/nix-cache-info"],
            "narinfo (cycle)": narinfos,
            "NAR (smallest)": [nar],
            "narinfo 400": ["/" + "e" * 32 + ".narinfo"],
        }
        for name, paths in cases.items():
            rps, us = load(paths, base, proc.pid, args.seconds, work)
            rows.append(("nixboot", name, rps, us))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)

    nginx = Nginx(work / "filecache", work)
    try:
        pid = nginx.proc.pid
        nginx_nar = (work / "filecache" / f"{smallest}.narinfo").read_text()
        nginx_paths = {
            "nix-cache-info": ["/nix-cache-info"],
            "narinfo (cycle)": [f"/{h}.narinfo" for h in hashes],
            "NAR (smallest)": ["/" + nginx_nar.split("URL: ")[1].split()[0]],
        }
        for name, paths in nginx_paths.items():
            rps, us = load(paths, nginx.url, pid, args.seconds, work)
            rows.append(("nginx", name, rps, us))
    finally:
        nginx.stop()
    print(f"\n{'server':8} {'request':18} {'req/s':>9} {'server CPU µs/req':>18}")
    for server, name, rps, us in rows:
        print(f"{server:8} {name:18} {rps:9.0f} {us:18.1f}")


if __name__ == "__main__":
    main()
