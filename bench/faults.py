"""bench/faults: every fault of issue 11 during a storm of N simulated machines (default 50),
against one nixboot stack on loopback (the cluster fault: a second stack on a 3-node nats-server
cluster), and the table: fault, boots attempted, booted, events expected/found, duplicates,
recovery seconds, client retries.

    .venv/bin/python bench/faults.py [--n 50] [--only nats,cluster,...]

(faults: none, cache, tftp, dhcp-hook, builder, nats, cluster, relay, tmpfs, build)

The same storm, checks and faults as tests/faults (which run 20 machines per storm to stay in
the test budget); the machines retry like firmware and nix do, and verify every byte."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import storm  # noqa: E402
from tests.faults.stack import (  # noqa: E402
    FaultStack,
    mac_of,
    prepare_flake,
    wait_generations,
    write_knobs,
)

PAYLOAD_KIB = 64


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nixboot-faults-"))
    faults = [
        *("none", "cache", "tftp", "dhcp-hook", "builder", "nats", "cluster", "relay", "tmpfs"),
        "build",
    ]
    chosen = [f for f in faults if not args.only or f in args.only.split(",")]
    fleet = [mac_of(i + 1) for i in range(args.n * len(chosen))]
    flake = prepare_flake(root, PAYLOAD_KIB)
    stack = FaultStack(root / "stack", flake, fleet)
    stack.root.mkdir()
    rows: list[storm.Outcome] = []
    print(f"faults: {args.n} machines per storm; work dir {root}", flush=True)
    try:
        stack.start()
        await wait_generations(stack.nats_url, fleet, 600)
        for i, name in enumerate(chosen):
            macs = fleet[i * args.n : (i + 1) * args.n]
            if name == "none":
                o = await storm.storm(stack, "none", macs, None)
            elif name in ("cache", "tftp", "dhcp-hook", "builder"):
                o = await storm.storm(stack, f"SIGKILL {name}", macs, storm.kill_and_restart(name))
            elif name == "nats":
                o = await storm.storm(stack, "restart nats-server", macs, storm.restart_nats)
            elif name == "cluster":
                o = await cluster_storm(root, flake, macs)
            elif name == "relay":
                relay = stack.start_relay(loss=0.05, delay=0.05)
                try:
                    o = await storm.storm(stack, "5% loss + 50 ms delay", macs, None)
                finally:
                    print("  relay:", stack.stop_relay(relay), flush=True)
            elif name == "tmpfs":
                stack.tmpfs_bytes = max(64 * 1024, await stack.closure_nar_bytes() // 3)
                o = await storm.storm(
                    stack, f"cache dir full (tmpfs {stack.tmpfs_bytes >> 10} KiB)", macs,
                    storm.kill_and_restart("cache"), fault_after=0.0,
                )  # fmt: skip
                stack.tmpfs_bytes = 0
                stack.kill("cache")
                stack.start_service("cache")
                stack.wait_healthy(("cache",))
            else:
                o = await storm.storm(stack, "builder SIGKILL mid-build", macs, build_fault)
            rows.append(o)
            print(storm.row(o), flush=True)
            for problem in [*o.problems, *o.errors, *o.corrupt][:5]:
                print("   !", problem, flush=True)
    finally:
        stack.stop()
    print("\n" + storm.HEADER)
    for o in rows:
        print(storm.row(o))
    ok = all(o.ok for o in rows)
    if ok:
        shutil.rmtree(root, ignore_errors=True)  # kept for its logs when something failed
    return 0 if ok else 1


async def cluster_storm(root: Path, flake: Path, macs: list[str]) -> storm.Outcome:
    """Its own stack on a 3-node nats-server cluster (JetStream replicas 3); the flake is the
    one already built, so the builder finds the generation in the store."""
    stack = FaultStack(root / "cluster", flake, macs, nats_nodes=3)
    stack.root.mkdir()
    restart = storm.NodeRestart()
    try:
        stack.start()
        await wait_generations(stack.nats_url, macs, 600)
        o = await storm.storm(stack, "restart 1 of 3 nats nodes (R3)", macs, restart)
        await storm.check_replicas_agree(stack, o)
    finally:
        stack.stop()
    print(
        f"  cluster: killed {restart.node} (services on it: {restart.services_on_node}), "
        f"back {restart.back_seconds} s, caught up {restart.caught_up_seconds} s",
        flush=True,
    )
    return o


async def build_fault(s: FaultStack) -> None:
    import httpx

    from nixboot_shared import events

    since = time.time()
    write_knobs(s.flake, PAYLOAD_KIB, delay=4, version=f"bench-{since}")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{s.url('builder')}/builds",
            json={"all": True},
            headers={"Authorization": f"Bearer {s.token}"},
        )
    build_id = r.json()["builds"][0]["build_id"]

    async def seen(kind: type[events.Event]) -> bool:
        for _, data in await storm.read_stream(s.nats_url, since):
            e = events.decode(data)
            if isinstance(e, kind) and getattr(e, "build_id", None) == build_id:
                return True
        return False

    while not await seen(events.BuildStarted):
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.5)
    s.kill("builder")
    await asyncio.sleep(1.0)
    s.start_service("builder")
    deadline = time.monotonic() + 300
    while not await seen(events.BuildSucceeded) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
