"""Flake change → new generation registered by the builder, against `nix build` by hand.

Both sides build the same attribute of the demo flake after the same kind of change (a new
appVersion, so demo-app and its dependents rebuild). The builder side is measured from the moment
the file is written to the GenerationCreated event: polling, fingerprinting, the build, reading the
boot files, KV record; closure size and the numbered GC roots follow (nix pins the result with
a per-build root meanwhile), so the time to BuildSucceeded is printed as well. The floor is
`nix build` of the same installable. A local flake is watched with inotify: --poll only sets the
safety-net interval.

    .venv/bin/python bench/builder_flake_change.py [--rounds 3] [--payload-kib 2048] [--poll 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

from nixboot_builder import demo
from nixboot_shared import events

os.environ.setdefault("NIX_CONFIG", "substituters =\nexperimental-features = nix-command flakes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nix_build_by_hand(flake: str) -> float:
    start = time.monotonic()
    subprocess.run(
        [
            "nix",
            "build",
            "--no-link",
            f"{flake}#nixosConfigurations.demo.config.system.build.toplevel",
        ],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--payload-kib", type=int, default=2048)
    ap.add_argument("--poll", type=float, default=0.2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixboot-bench-builder-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        flake_dir = work / "flake"
        flake = demo.prepare(flake_dir)
        demo.set_knob(flake_dir, "payloadKiB", args.payload_kib)
        tag = f"bench{os.getpid()}-{int(time.time())}"
        demo.set_knob(flake_dir, "appVersion", f"{tag}-init")
        nix_build_by_hand(flake)  # shared packages built once, outside both measurements
        # The hand builds use a second copy, so the builder's poller never sees their changes.
        hand_dir = work / "hand-flake"
        hand = demo.prepare(hand_dir)
        demo.set_knob(hand_dir, "payloadKiB", args.payload_kib)

        port = free_port()
        nats_bin = str(Path(sys.executable).parent / "nats-server")
        procs.append(
            subprocess.Popen(
                [nats_bin, "-js", "-sd", str(work / "js"), "-a", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        url = f"nats://127.0.0.1:{port}"
        nc = await nats.connect(url)
        created: asyncio.Queue[float] = asyncio.Queue()
        succeeded: asyncio.Queue[float] = asyncio.Queue()

        async def on_event(msg: nats.aio.msg.Msg) -> None:
            event = events.decode(msg.data)
            if isinstance(event, events.GenerationCreated):
                await created.put(time.monotonic())
            elif isinstance(event, events.BuildSucceeded):
                await succeeded.put(time.monotonic())

        # Subscribed before the builder starts: its first generation comes within a second.
        await nc.subscribe("nixboot.evt.generation.>", cb=on_event)
        await nc.subscribe("nixboot.evt.build-succeeded.>", cb=on_event)
        await nc.flush()  # the SUB must reach the server before the builder publishes
        http_port = free_port()
        config = work / "builder.toml"
        config.write_text(
            f'state_dir = "{work / "state"}"\n[nats]\nurl = "{url}"\n'
            f'[builder]\nflake = "{flake}"\npoll_seconds = {args.poll}\n'
            f'[builder.http]\nhost = "127.0.0.1"\nport = {http_port}\n'
            '[[machines]]\nmac = "52:54:00:be:00:01"\nname = "bench"\nattr = "demo"\n'
        )
        log = (work / "builder.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "nixboot_builder"],
                env=dict(os.environ, NIXBOOT_CONFIG=str(config)),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)

        await asyncio.wait_for(created.get(), 120)  # generation 1 from the first poll
        await asyncio.wait_for(succeeded.get(), 120)

        floor: list[float] = []
        builder: list[float] = []
        settled: list[float] = []
        for i in range(args.rounds):
            demo.set_knob(hand_dir, "appVersion", f"{tag}-hand-{i}")
            floor.append(nix_build_by_hand(hand))
            demo.set_knob(flake_dir, "appVersion", f"{tag}-builder-{i}")
            start = time.monotonic()
            builder.append(await asyncio.wait_for(created.get(), 300) - start)
            settled.append(await asyncio.wait_for(succeeded.get(), 300) - start)
        await nc.close()

        f, b = statistics.median(floor), statistics.median(builder)
        print(f"demo flake, payload {args.payload_kib} KiB/package, poll every {args.poll}s")
        print(
            f"{'round':>5} {'nix build by hand':>18} {'builder (change→generation)':>28}"
            f" {'(→BuildSucceeded)':>18}"
        )
        for i, (x, y, z) in enumerate(zip(floor, builder, settled, strict=True)):
            print(f"{i:>5} {x:>17.2f}s {y:>27.2f}s {z:>17.2f}s")
        s = statistics.median(settled)
        print(f"median: nix build {f:.2f}s, builder {b:.2f}s, ratio {b / f:.2f}")
        print(f"median to BuildSucceeded (closure size, GC roots done): {s:.2f}s")
        # Each round runs both back to back: the ratio within a round is less exposed to the
        # load of a shared machine drifting between rounds.
        per_round = statistics.median(y / x for x, y in zip(floor, builder, strict=True))
        print(f"median of per-round ratios: {per_round:.2f}")
    except BaseException:
        print((work / "builder.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p.args[0] == sys.executable:
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    print(f"pid {p.pid} ignored SIGTERM for 15s: killed", file=sys.stderr)
                    if p.args[0] == sys.executable:
                        os.kill(p.pid, signal.SIGUSR1)
                        time.sleep(1)
                        print((work / "builder.log").read_text()[-6000:], file=sys.stderr)
                    os.killpg(p.pid, signal.SIGKILL) if p.args[0] == sys.executable else p.kill()
                    p.wait(5)
        if sys.exc_info()[0] is None and not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} for inspection", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
