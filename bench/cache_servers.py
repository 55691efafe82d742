"""uvicorn vs granian serving the same nixboot cache app (``nixboot_cache.asgi``), with nginx as
the reference: narinfo requests/s, large-NAR throughput (wrk) and a real `nix-store -r -j16`.

    .venv/bin/python bench/cache_servers.py [--paths 100 --mib 200]
Needs granian in the venv (`uv pip install granian`) and wrk, nginx-light.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from cache_common import (
    VENV_BIN,
    Nginx,
    cache_env,
    closure_stats,
    free_port,
    nix_copy_file_cache,
    nix_env,
    path_info,
    signing_key,
    substitute,
    synthetic_closure,
    wait_http,
    wrk,
)


def start(server: str, state: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = cache_env(state, port)
    target = "nixboot_cache.asgi:create_app"
    # Each server's own spelling of "this factory, this port, quiet".
    launcher = {
        "uvicorn": [sys.executable, "-m", "uvicorn", "--no-access-log"],
        "granian": [str(VENV_BIN / "granian"), "--interface", "asgi", "--no-ws"],
    }[server]
    argv = [*launcher, "--factory", target, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/nix-cache-info")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=100)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--work", default="/tmp/nixboot-bench-cache")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = nix_env(work / "xdg")
    top = synthetic_closure(work / f"syn-{args.paths}-{args.mib}", args.paths, args.mib)
    n, size = closure_stats(top, env)
    print(f"closure: {n} paths, {size / 2**20:.0f} MiB NAR")
    key = signing_key(work, env)
    nix_copy_file_cache(top, work / "filecache", key, env)
    info = path_info(top, env)
    biggest = max(info, key=lambda p: p["narSize"])["path"]
    h = biggest.removeprefix("/nix/store/")[:32]
    state = Path(tempfile.mkdtemp(dir=work, prefix="state-"))
    rows = []
    nginx = Nginx(work / "filecache", work)
    nginx_nar = (work / "filecache" / f"{h}.narinfo").read_text().split("URL: ")[1].split()[0]
    rows.append(
        (
            "nginx",
            wrk(f"{nginx.url}/{h}.narinfo"),
            wrk(f"{nginx.url}/{nginx_nar}", conns=4),
            substitute(nginx.url, (work / "pk").read_text().strip(), top, work),
        )
    )
    nginx.stop()
    for server in ("uvicorn", "granian"):
        proc, url = start(server, state)
        try:
            pk = (state / "cache-key.pub").read_text().strip()
            substitute(url, pk, top, work)  # warms the cache directory (first server only)
            ni = urllib.request.urlopen(f"{url}/{h}.narinfo").read().decode()
            nar_url = ni.split("URL: ")[1].split()[0]
            rows.append(
                (
                    server,
                    wrk(f"{url}/{h}.narinfo"),
                    wrk(f"{url}/{nar_url}", conns=4),
                    substitute(url, pk, top, work),
                )
            )
        finally:
            proc.terminate()
            proc.wait(10)
    shutil.rmtree(state, ignore_errors=True)
    print(
        f"\n{'server':10} {'narinfo req/s':>14} {'p50':>9} {'p99':>9} {'NAR MB/s (wrk -c4)':>20} "
        f"{'nix-store -r s':>15}"
    )
    for name, ni_r, nar_r, sub in rows:
        print(f"{name:10} {ni_r[0]:14.0f} {ni_r[1]:>9} {ni_r[2]:>9} {nar_r[3]:>20} {sub:15.2f}")


if __name__ == "__main__":
    main()
