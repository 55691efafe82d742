"""Boot tracker throughput next to its floor, in one run on one real nats-server.

Prints, side by side: raw KV puts/s (the tracker writes one per event), events/s through
``Tracker.handle`` (segmentation + KV write), events/s end to end (JetStream publish -> durable
consumer -> tracker -> KV), and the pure per-event cost of ``add_event`` as a machine's retained
history grows.

    .venv/bin/python bench/observe_tracker.py [--machines 50]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import KeyValueConfig

from nixboot_cache.timeline import session as se
from nixboot_cache.timeline.tracker import Tracker
from nixboot_shared import bus, subjects
from nixboot_shared import events as ev
from nixboot_shared.config import TimelineConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import NatsServer
from tests.observe.observe_bootgen import boot_events


def machine_boots(machines: int, t0: float, tag: str) -> list[list[ev.AnyEvent]]:
    return [
        boot_events(f"52:54:00:cc:{i // 256:02x}:{i % 256:02x}", t0, [0.5] * 11, f"{tag}{i}")[0]
        for i in range(machines)
    ]


async def main(machines: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        try:
            await run(server.url, machines)
        finally:
            server.stop()


async def run(url: str, machines: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    kv = (await bus.bootstrap(js))[subjects.KV_BOOTS]
    boots = machine_boots(machines, time.time() - 3600, "a")
    n = sum(len(b) for b in boots)

    floor = await js.create_key_value(KeyValueConfig(bucket="bench-floor", history=5))
    t = time.perf_counter()
    for i in range(n):
        await floor.put(f"m-{i % machines}", b"x" * 3000)
    kv_rate = n / (time.perf_counter() - t)

    tracker = Tracker(kv, TimelineConfig(), record_metrics=False)
    t = time.perf_counter()
    for step in range(len(boots[0])):
        for b in boots:
            await tracker.handle(b[step])
    handle_rate = n / (time.perf_counter() - t)

    # End to end through the durable consumer, a second boot of every machine.
    e2e_boots = machine_boots(machines, time.time() - 1800, "b")
    tracker2 = Tracker(kv, TimelineConfig(), record_metrics=False)
    await tracker2.load()
    before = sum(len(s.events) for s in tracker2.machines.values())
    sub = await tracker2.subscribe(js)
    t = time.perf_counter()
    await asyncio.gather(*(bus.publish(js, e) for b in e2e_boots for e in b))
    while sum(len(s.events) for s in tracker2.machines.values()) < before + n:
        await asyncio.sleep(0.01)
    e2e_rate = n / (time.perf_counter() - t)
    await sub.unsubscribe()
    await nc.close()

    print(f"{machines} machines, {n} events per run")
    print(f"{'nats KV put, 3 kB (floor)':<40}{kv_rate:>10.0f} /s")
    print(f"{'Tracker.handle (segment + KV put)':<40}{handle_rate:>10.0f} /s")
    print(f"{'publish -> durable consumer -> tracker':<40}{e2e_rate:>10.0f} /s")

    rules = se.Rules()
    for sessions in (1, 5):
        mac = "52:54:00:dd:00:01"
        evs = [
            e
            for k in range(sessions)
            for e in boot_events(mac, 1.7e9 + k * 1000, [0.5] * 11, f"s{k}")[0]
        ]
        state = se.MachineBoots(mac=mac)
        for e in evs[:-1]:
            se.add_event(state, e, rules, keep_sessions=5)
        reps = 2000
        t = time.perf_counter()
        for _ in range(reps):
            probe = se.MachineBoots(mac=mac, events=list(state.events))
            se.add_event(probe, evs[-1], rules, keep_sessions=5)
        us = (time.perf_counter() - t) / reps * 1e6
        print(f"{f'add_event with {len(evs)} retained events':<40}{us:>10.1f} µs")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--machines", type=int, default=50)
    asyncio.run(main(p.parse_args().machines))
