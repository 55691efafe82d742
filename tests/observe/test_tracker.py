"""The tracker against a real nats-server: durable consumer, KV state, restart mid-boot,
duplicates and out-of-order delivery, metrics counted once, HTTP routes, replay and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from nixboot_cache.timeline import session as se
from nixboot_cache.timeline.routes import add_routes
from nixboot_cache.timeline.tracker import DURABLE, Tracker, follow_replay
from nixboot_shared import bus, events, records, subjects
from nixboot_shared.config import TimelineConfig
from tests.observe.observe_bootgen import boot_events, ipxe_boot_events

CFG = TimelineConfig(settle_seconds=5, tick_seconds=0.2)
TOKEN = "test-token-0123456789"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def nc(isolated_nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(isolated_nats_url)
    js = client.jetstream()
    await bus.bootstrap(js)
    # Every test starts from an empty stream, no consumer position and no sessions.
    await js.purge_stream(subjects.EVENTS_STREAM)
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(subjects.EVENTS_STREAM, DURABLE)
    await js.delete_key_value(subjects.KV_BOOTS)
    await bus.bootstrap(js)
    yield client
    await client.close()


async def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def stored_events(nc: Client, mac: str) -> int:
    kv = await nc.jetstream().key_value(subjects.KV_BOOTS)
    try:
        entry = await kv.get(subjects.mac_token(mac))
    except Exception:
        return 0
    return len(msgspec.json.decode(entry.value or b"{}", type=se.MachineBoots).events)


async def start_tracker(nc: Client) -> tuple[Tracker, object]:
    kv = await nc.jetstream().key_value(subjects.KV_BOOTS)
    tracker = Tracker(kv, CFG)
    await tracker.load()
    sub = await tracker.subscribe(nc.jetstream())
    return tracker, sub


async def test_restart_mid_boot_with_duplicates_out_of_order_gives_one_timeline(
    nc: Client,
) -> None:
    mac = "52:54:00:aa:00:01"
    js = nc.jetstream()
    evs, expected = boot_events(mac, time.time() - 120, [1.5] * 11, "boot-a")
    first, rest = evs[:5], evs[5:]
    random.Random(1).shuffle(first)
    random.Random(2).shuffle(rest)
    booted_before = sample("nixboot_boots_total", result="booted")
    stage_count_before = sample("nixboot_boot_stage_duration_seconds_count", stage="closure")

    tracker, sub = await start_tracker(nc)
    for e in first:
        await bus.publish(js, e)
    # The same event again under another message id: JetStream stores it twice.
    await js.publish(first[0].subject, events.encode(first[0]), headers={"Nats-Msg-Id": "dup"})

    async def has_first() -> bool:
        return await stored_events(nc, mac) == len(first)

    await wait_for(has_first)
    await sub.unsubscribe()  # type: ignore[attr-defined]
    del tracker  # the service stops mid-boot

    for e in rest:
        await bus.publish(js, e)
    await bus.publish(js, rest[0])  # a retried publish: deduplicated by Nats-Msg-Id
    tracker2, sub2 = await start_tracker(nc)

    async def has_all() -> bool:
        return await stored_events(nc, mac) == len(evs)

    await wait_for(has_all)
    await tracker2.tick()
    state = tracker2.machines[subjects.mac_token(mac)]
    [session] = se.segment(state.events, tracker2.rules)
    got = {iv.stage: iv.seconds for iv in se.stages(session)}
    total = se.total(session)
    assert total is not None
    got["total"] = total.seconds
    assert got == pytest.approx(expected, abs=1e-6)
    assert sample("nixboot_boots_total", result="booted") == booted_before + 1
    assert (
        sample("nixboot_boot_stage_duration_seconds_count", stage="closure")
        == stage_count_before + 1
    )
    await sub2.unsubscribe()  # type: ignore[attr-defined]

    # A third start: the outcome was already counted (persisted), it is not counted again.
    tracker3, sub3 = await start_tracker(nc)
    await tracker3.tick()
    await asyncio.sleep(0.3)
    assert sample("nixboot_boots_total", result="booted") == booted_before + 1
    await sub3.unsubscribe()  # type: ignore[attr-defined]


async def test_ipxe_boot_with_the_lease_arriving_last_and_a_restart_gives_every_stage(
    nc: Client,
) -> None:
    """The iPXE path through the stream: boot.ipxe and the menu stored first, the lease (its
    script ran late: stamped after boot.ipxe) stored after the menu, the tracker restarted in
    between. One booted session with all eight stages in boot order, counted once."""
    mac = "52:54:00:aa:00:07"
    js = nc.jetstream()
    evs, expected = ipxe_boot_events(mac, time.time() - 120, "boot-i", lease_at=0.06)
    lease, rest = evs[0], evs[1:]
    dhcp_before = sample("nixboot_boot_stage_duration_seconds_count", stage="dhcp")
    tracker, sub = await start_tracker(nc)
    for e in rest[:2]:  # boot.ipxe, menu
        await bus.publish(js, e)

    async def has(n: int) -> bool:
        return await stored_events(nc, mac) == n

    await wait_for(lambda: has(2))
    await sub.unsubscribe()  # type: ignore[attr-defined]
    del tracker
    await bus.publish(js, lease)
    for e in rest[2:]:
        await bus.publish(js, e)
    tracker2, sub2 = await start_tracker(nc)
    await wait_for(lambda: has(len(evs)))
    await tracker2.tick()
    [session] = se.segment(tracker2.machines[subjects.mac_token(mac)].events, tracker2.rules)
    ivs = se.stages(session)
    assert [iv.stage for iv in ivs] == list(se.STAGES)
    assert [iv.start for iv in ivs] == sorted(iv.start for iv in ivs)
    total = se.total(session)
    assert total is not None
    got = {iv.stage: iv.seconds for iv in ivs} | {"total": total.seconds}
    assert got == pytest.approx(expected, abs=1e-6)
    assert sample("nixboot_boot_stage_duration_seconds_count", stage="dhcp") == dhcp_before + 1
    await sub2.unsubscribe()  # type: ignore[attr-defined]


async def test_abandoned_boot_is_counted_after_the_timeout(nc: Client) -> None:
    mac = "52:54:00:aa:00:02"
    now = [time.time()]
    kv = await nc.jetstream().key_value(subjects.KV_BOOTS)
    tracker = Tracker(kv, TimelineConfig(abandon_seconds=60), clock=lambda: now[0])
    evs, _ = boot_events(mac, now[0] - 10, [1.0] * 11, "boot-b")
    for e in evs[:6]:
        await tracker.handle(e)
    before = sample("nixboot_boots_total", result="abandoned")
    await tracker.tick()
    assert sample("nixboot_boot_machines", stage="stage1") >= 1
    assert sample("nixboot_boots_total", result="abandoned") == before
    now[0] += 120
    await tracker.tick()
    assert sample("nixboot_boots_total", result="abandoned") == before + 1
    await tracker.tick()
    assert sample("nixboot_boots_total", result="abandoned") == before + 1


async def test_http_routes_replay_and_cli(
    nc: Client, isolated_nats_url: str, tmp_path: Path
) -> None:
    mac = "52:54:00:aa:00:03"
    js = nc.jetstream()
    evs, _ = boot_events(mac, time.time() - 60, [0.5] * 11, "boot-c")
    tracker, sub = await start_tracker(nc)
    for e in evs:
        await bus.publish(js, e)

    async def done() -> bool:
        return await stored_events(nc, mac) == len(evs)

    await wait_for(done)
    app = FastAPI()
    kv = {b: await js.key_value(b) for b in subjects.ALL_BUCKETS}
    await kv[subjects.KV_MACHINES].put(
        subjects.mac_token(mac),
        msgspec.json.encode(records.Machine(mac=mac, name="lab-<7>", attr="lab7")),
    )
    add_routes(app, tracker, nc, js, TOKEN, kv)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/boots")
        [m] = [m for m in r.json()["machines"] if m["mac"] == mac]
        assert m["stage"] == "booted" and m["result"] == "booted"
        assert m["last_boot_seconds"] == pytest.approx(5.5)

        page = (await http.get("/")).text
        assert f">{mac}</a>" in page and "lab-&lt;7&gt;" in page and ">5.5 s<" in page

        r = await http.get(f"/boots/{mac.replace(':', '-')}/timeline")
        assert r.status_code == 200
        [b] = r.json()["boots"]
        assert [s["stage"] for s in b["stages"]] == list(se.STAGES)
        assert [e["id"] for e in b["events"]] == [e.id for e in evs]

        assert (await http.get("/boots/not-a-mac/timeline")).status_code == 400
        assert (await http.get("/boots/52:54:00:00:00:99/timeline")).status_code == 404

        assert (await http.post("/replay", json={"since": "1h"})).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        bad = await http.post("/replay", json={"since": "yesterday"}, headers=auth)
        assert bad.status_code == 400 and "cannot read time" in bad.json()["error"]
        bad = await http.post("/replay", json={"to": "nixboot.x"}, headers=auth)
        assert bad.status_code == 400

        r = await http.post("/replay", json={"since": "1h", "mac": mac}, headers=auth)
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert [x["event"]["id"] for x in lines] == [e.id for e in evs]

        # Republish under a prefix: all arrive there, nothing on the live subjects.
        replayed: list[bytes] = []
        live: list[bytes] = []

        async def on_replayed(m: Msg) -> None:
            replayed.append(m.data)

        async def on_live(m: Msg) -> None:
            live.append(m.data)

        s1 = await nc.subscribe("rp1.>", cb=on_replayed)
        s2 = await nc.subscribe("nixboot.evt.>", cb=on_live)
        r = await http.post("/replay", json={"since": "1h", "to": "rp1"}, headers=auth)
        assert r.json()["republished"] == len(evs)
        await nc.flush()
        await asyncio.sleep(0.2)
        assert sorted(replayed) == sorted(events.encode(e) for e in evs)
        assert live == []
        await s1.unsubscribe()
        await s2.unsubscribe()
    await sub.unsubscribe()  # type: ignore[attr-defined]

    # The CLI as a real process.
    env = {**os.environ, "NIXBOOT_CONFIG": "", "NIXBOOT_NATS__URL": isolated_nats_url}
    cli = [sys.executable, "-m", "nixboot_cache.timeline.cli"]
    out = subprocess.run(
        [*cli, "events", "--mac", mac, "--since", "10m", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert [json.loads(x)["id"] for x in out.stdout.splitlines()] == [e.id for e in evs]
    out = subprocess.run(
        [*cli, "events", "--type", "stage", "--start-seq", "1"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert len(out.stdout.splitlines()) == 4 and "booted" in out.stdout
    out = subprocess.run(
        [*cli, "timeline", mac], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    positions = [out.stdout.index(f"\n│ {s} ") for s in se.STAGES]
    assert positions == sorted(positions), out.stdout
    dump = tmp_path / "boot.jsonl"
    subprocess.run(
        [*cli, "events", "--mac", mac, "--since", "10m", "--dump", str(dump)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert len(dump.read_text().splitlines()) == len(evs)
    # Replay to a prefix with the CLI: a KV-free tracker fed from the prefix derives the same
    # sessions, and nothing reaches the live subjects.
    shadow = Tracker(None, CFG, record_metrics=False)
    shadow_sub = await follow_replay(nc, shadow, "rp2")
    live_seen: list[bytes] = []

    async def on_live2(m: Msg) -> None:
        live_seen.append(m.data)

    live_sub = await nc.subscribe("nixboot.evt.>", cb=on_live2)
    await nc.flush()
    booted_before = sample("nixboot_boots_total", result="booted")
    out = subprocess.run(
        [*cli, "replay", "--mac", mac, "--since", "10m", "--speed", "max", "--to", "rp2"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"republished {len(evs)} events" in out.stderr

    async def shadow_done() -> bool:
        s = shadow.machines.get(subjects.mac_token(mac))
        return s is not None and len(s.events) == len(evs)

    await wait_for(shadow_done)
    original = tracker.machines[subjects.mac_token(mac)]
    replayed_state = shadow.machines[subjects.mac_token(mac)]
    assert replayed_state.events == original.events
    assert [se.stages(s) for s in se.segment(replayed_state.events, shadow.rules)] == [
        se.stages(s) for s in se.segment(original.events, tracker.rules)
    ]
    # --load republishes a --dump file the same way.
    out = subprocess.run(
        [*cli, "replay", "--load", str(dump), "--to", "rp3"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"republished {len(evs)} events" in out.stderr
    await nc.flush()
    await asyncio.sleep(0.2)
    assert live_seen == []
    assert sample("nixboot_boots_total", result="booted") == booted_before
    bad_prefix = subprocess.run(
        [*cli, "replay", "--since", "10m", "--to", "nixboot.evt"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad_prefix.returncode == 2 and "live" in bad_prefix.stderr
    await shadow_sub.unsubscribe()
    await live_sub.unsubscribe()

    refused = subprocess.run(
        [*cli, "events", "--since", "whenever"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "cannot read time" in refused.stderr


async def test_events_follow_prints_new_events(nc: Client, isolated_nats_url: str) -> None:
    mac = "52:54:00:aa:00:04"
    js = nc.jetstream()
    old = events.LeaseSeen(mac=mac, ip="10.0.0.9")
    await bus.publish(js, old)
    env = {**os.environ, "NIXBOOT_CONFIG": "", "NIXBOOT_NATS__URL": isolated_nats_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nixboot_cache.timeline.cli", "events", "--follow", "--json",
        "--mac", mac, env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert first["id"] == old.id
        new = events.StageReported(mac=mac, boot_id="f", stage="stage1", status="started")
        await bus.publish(js, new)
        await bus.publish(js, events.LeaseSeen(mac="52:54:00:aa:00:05", ip="10.0.0.10"))
        second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert second["id"] == new.id and second["stage"] == "stage1"
    finally:
        proc.terminate()
        await proc.wait()
