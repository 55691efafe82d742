"""Substitution by the real `nix-store -r -j16` into a fresh root: nixboot's cache vs Debian's
nginx-light serving `nix copy --to file://…?compression=zstd` of the same closure; plus cold (our
cache compressing while it serves) vs `nix copy` (the floor), and narinfo requests/s with wrk.

    .venv/bin/python bench/cache_substitute.py [--paths 500 --mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from cache_common import (
    Nats,
    Nginx,
    OurCache,
    closure_stats,
    nix_copy_file_cache,
    nix_env,
    signing_key,
    substitute,
    synthetic_closure,
    wrk,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=100)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/nixboot-bench-cache")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = nix_env(work / "xdg")
    top = synthetic_closure(work / f"syn-{args.paths}-{args.mib}", args.paths, args.mib)
    n, size = closure_stats(top, env)
    print(f"closure: {n} paths, {size / 2**20:.0f} MiB NAR ({top})")
    key = signing_key(work, env)
    copy_s = nix_copy_file_cache(top, work / "filecache", key, env)
    nats = Nats(work)
    state = Path(tempfile.mkdtemp(dir=work, prefix="state-"))
    ours = OurCache(state, nats.url)
    nginx = Nginx(work / "filecache", work)
    try:
        cold = substitute(ours.url, ours.public_key(), top, work)  # cache compresses as it serves
        pk = (work / "pk").read_text().strip()
        times: dict[str, list[float]] = {"nixboot": [], "nginx": []}
        for _ in range(args.runs):  # alternate so both see the same machine load
            times["nginx"].append(substitute(nginx.url, pk, top, work))
            times["nixboot"].append(substitute(ours.url, ours.public_key(), top, work))
        print(f"\n{'substitution (warm, -j16)':32} {'median s':>9} {'runs':>24}")
        for name, ts in times.items():
            print(f"{name:32} {statistics.median(ts):9.2f} {' '.join(f'{t:.2f}' for t in ts):>24}")
        ratio = statistics.median(times["nixboot"]) / statistics.median(times["nginx"])
        print(f"{'ratio nixboot/nginx':32} {ratio:9.2f}   (target <= 1.25)")
        print(f"\n{'cold':32} {'s':>9}")
        print(f"{'nix copy --to file:// (floor)':32} {copy_s:9.2f}")
        print(f"{'nixboot cold substitution':32} {cold:9.2f}")
        # A typical path (a leaf, few references), not the root with 500 references.
        refs = subprocess.run(
            ["nix-store", "-q", "--references", top],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        leaf = next(r for r in refs if r != top)
        h = leaf.removeprefix("/nix/store/")[:32]
        print(f"\n{'narinfo, wrk -c16 5s':32} {'req/s':>9} {'p50':>9} {'p99':>9}")
        for name, url in (("nginx", nginx.url), ("nixboot (granian, embedded)", ours.url)):
            rps, p50, p99, _ = wrk(f"{url}/{h}.narinfo")
            print(f"{name:32} {rps:9.0f} {p50:>9} {p99:>9}")
    finally:
        nginx.stop()
        ours.stop()
        nats.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
