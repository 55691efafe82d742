"""`nixboot serve <svc> --replay PREFIX` against a real nats-server, the real cache service and
the real `nixboot replay` CLI: a recorded boot replayed into a cache in replay mode derives the
same warm events and boot timeline as the original run, under the prefix only, and the live
stream, consumers, buckets and state dir are unchanged afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from nixboot_cache.timeline import stream
from nixboot_shared import bus, events, replay, subjects
from nixboot_shared.records import Generation, Lease, MachineGenerations
from tests.conftest import free_port, tool
from tests.harness.proc import OutputProc
from tests.observe.observe_bootgen import boot_events

MAC = "52:54:00:7e:91:01"
NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


class Watch:
    """Everything published under the replay prefix, and anything on the live subjects."""

    def __init__(self) -> None:
        self.under_prefix: list[Msg] = []
        self.on_live: list[Msg] = []
        self.subs: list[Subscription] = []

    @classmethod
    async def start(cls, nc: Client, prefix: str) -> Watch:
        w = cls()

        async def got_prefixed(m: Msg) -> None:
            w.under_prefix.append(m)

        async def got_live(m: Msg) -> None:
            w.on_live.append(m)

        w.subs.append(await nc.subscribe(f"{prefix}.>", cb=got_prefixed))
        w.subs.append(await nc.subscribe(f"{subjects.PREFIX}.>", cb=got_live))
        await nc.flush()
        return w

    async def stop(self) -> None:
        for sub in self.subs:
            await sub.unsubscribe()


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout} s")


def store_toplevel(tmp: Path) -> str:
    """A tiny "generation" added to the real Nix store: the cache warms it from the store DB."""
    src = tmp / "nixboot-replay-generation"
    src.mkdir()
    (src / "kernel").write_text("kernel\n")
    (src / "initrd").write_text("initrd\n")
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    out = subprocess.run(
        [tool("nix-store"), "--add", str(src)],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


async def stored(js: JetStreamContext, mac: str) -> list[events.AnyEvent]:
    return [s.event async for s in stream.read(js, stream.Query(mac=mac)) if s.event is not None]


async def bucket_dump(js: JetStreamContext, bucket: str) -> dict[str, tuple[int, bytes | None]]:
    kv = await js.key_value(bucket)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    out = {}
    for key in keys:
        entry = await kv.get(key)
        out[key] = (entry.revision or 0, entry.value)
    return out


async def live_snapshot(js: JetStreamContext) -> dict[str, Any]:
    """Everything a replay run must leave alone: the streams' contents, the durable consumers'
    positions, every live bucket, and which streams exist (KV copies must be gone)."""
    snap: dict[str, Any] = {}
    for name in (subjects.EVENTS_STREAM, subjects.BUILDS_STREAM):
        info = await js.stream_info(name)
        snap[name] = (info.state.messages, info.state.last_seq)
    durables = {}
    for c in await js.consumers_info(subjects.EVENTS_STREAM):
        if c.config.durable_name:  # ephemeral readers (nixboot replay's own) expire by themselves
            durables[c.name] = (c.delivered.stream_seq, c.ack_floor.stream_seq, c.num_pending)
    snap["durables"] = durables
    for bucket in subjects.ALL_BUCKETS:
        snap[bucket] = await bucket_dump(js, bucket)
    snap["streams"] = sorted(s.config.name for s in await js.streams_info())
    return snap


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.fixture
async def nc(fresh_nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(fresh_nats_url)
    await bus.bootstrap(client.jetstream())
    yield client
    await client.close()


def write_config(tmp: Path) -> Path:
    path = tmp / "nixboot.toml"
    path.write_text(
        f'state_dir = "{tmp / "live-state"}"\n'
        f'[cache.http]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[tftp]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f"[tftp.http]\nport = {free_port()}\n"
        "[timeline]\ntick_seconds = 0.2\nsettle_seconds = 0.5\n"
    )
    return path


def warm_keys(evs: list[events.AnyEvent]) -> list[tuple[str, str | None, str]]:
    return sorted(
        (e.kind, e.mac, e.toplevel)
        for e in evs
        if isinstance(e, events.WarmStarted | events.WarmProgress | events.WarmFinished)
    )


async def test_cache_in_replay_mode_derives_the_original_run_apart_from_live(
    nc: Client, fresh_nats_url: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    js = nc.jetstream()
    token = subjects.mac_token(MAC)
    top = store_toplevel(tmp_path)
    gen = Generation(
        number=1, toplevel=top, kernel=f"{top}/kernel", initrd=f"{top}/initrd",
        kernel_params="", init=f"{top}/init",
    )  # fmt: skip
    kv_gens = await js.key_value(subjects.KV_GENERATIONS)
    await kv_gens.put(token, msgspec.json.encode(MachineGenerations(mac=MAC, generations=[gen])))
    kv_leases = await js.key_value(subjects.KV_LEASES)
    await kv_leases.put(token, msgspec.json.encode(Lease(mac=MAC, ip="10.0.0.5")))
    config = write_config(tmp_path)
    env = {**clean_env, "NIXBOOT_NATS__URL": fresh_nats_url}
    serve = [sys.executable, "-m", "nixboot", "serve", "cache", "--config", str(config)]

    # The original run: the live cache takes a boot's events as dhcp-hook, tftp and the booting
    # machine's reports put them into the stream.
    live = OutputProc(serve, env)
    live_port = int((await live.wait_line(r"cache: http \(\w+\) on 127\.0\.0\.1:(\d+)"))[1])
    await live.wait_line(r"cache: public key")
    boot, _ = boot_events(MAC, time.time() - 20, [0.4] * 11, "b0071")
    for e in boot:
        await bus.publish(js, e)

    async def live_done() -> bool:
        kinds = [e.kind for e in await stored(js, MAC)]
        if "warm-finished" not in kinds:
            return False
        r = httpx.get(f"http://127.0.0.1:{live_port}/boots/{MAC}/timeline")
        b = r.json()["boots"][0] if r.status_code == 200 else {}
        return b.get("result") == "booted"

    await wait_for(live_done, "the live cache warmed and the tracker saw the boot")
    original = await stored(js, MAC)
    original_ids = {e.id for e in original}
    original_warm = warm_keys(original)
    assert [k for k, _, _ in original_warm] == ["warm-finished", "warm-progress", "warm-started"]
    original_timeline = httpx.get(f"http://127.0.0.1:{live_port}/boots/{MAC}/timeline").json()
    assert live.stop() == 0

    before = await live_snapshot(js)
    live_files = files_under(tmp_path / "live-state")
    assert any(name.startswith("cache/") for name in live_files)  # the live warm's NARs
    prefix = "dbg.r1"
    watch = await Watch.start(nc, prefix)
    under_prefix, on_live = watch.under_prefix, watch.on_live

    # The replay run: the cache in replay mode, then the recorded events republished.
    rp = OutputProc([*serve[:5], "--replay", prefix, *serve[5:]], env)
    banner = await rp.wait_line(
        r"cache: REPLAY MODE: consuming dbg\.r1\.nixboot\.evt\.> .* publishing to dbg\.r1\."
        r".* KV copies (\S+) .* state dir (\S+); http on 127\.0\.0\.1:(\d+)"
    )
    state_dir, port = Path(banner[2]), int(banner[3])
    assert port != live_port and state_dir.is_dir() and state_dir != tmp_path / "live-state"
    # The KV copies: seeded from live, except the tracker's (derived) boots bucket.
    copy_gens = await js.key_value(replay.bucket_copy(prefix, "cache", subjects.KV_GENERATIONS))
    assert (await copy_gens.get(token)).value == (await kv_gens.get(token)).value
    copy_boots = await js.key_value(replay.bucket_copy(prefix, "cache", subjects.KV_BOOTS))
    with pytest.raises(NoKeysError):
        await copy_boots.keys()

    out = subprocess.run(
        [sys.executable, "-m", "nixboot", "replay", "--mac", MAC, "--since", "10m",
         "--speed", "max", "--to", prefix],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"republished {len(original)} events under {prefix}." in out.stderr

    def derived() -> list[events.AnyEvent]:
        evs = [events.decode(m.data) for m in under_prefix]
        return [e for e in evs if e.id not in original_ids]

    async def replay_done() -> bool:
        if "warm-finished" not in [e.kind for e in derived()]:
            return False
        r = httpx.get(f"http://127.0.0.1:{port}/boots/{MAC}/timeline")
        return r.status_code == 200 and r.json()["boots"][0]["result"] == "booted"

    await wait_for(replay_done, "the replay cache warmed and its tracker saw the boot")
    await asyncio.sleep(0.5)  # anything it would publish beyond the original's shows up by now
    # Same derived events: types, MAC and generation; under the prefix, on the right subjects.
    assert warm_keys(derived()) == original_warm
    for m in under_prefix:
        e = events.decode(m.data)
        assert m.subject == f"{prefix}.{e.subject}"
    # The replayed tracker's boot: same stages, boot id and result as the original run's.
    replayed_timeline = httpx.get(f"http://127.0.0.1:{port}/boots/{MAC}/timeline").json()
    got, want = replayed_timeline["boots"][0], original_timeline["boots"][0]
    assert [s["stage"] for s in want["stages"]] == [
        "dhcp", "bootloader", "menu", "kernel", "initrd", "stage1", "closure", "activation",
    ]  # fmt: skip
    assert (got["stages"], got["boot_id"], got["result"]) == (
        want["stages"],
        want["boot_id"],
        want["result"],
    )
    # Its writes went to its copies and its own state dir.
    boots_copy = msgspec.json.decode((await copy_boots.get(token)).value or b"{}")
    assert boots_copy["mac"] == MAC and len(boots_copy["events"]) >= len(boot)
    assert any(n.startswith("cache/") for n in files_under(state_dir))

    assert rp.stop() == 0, "\n".join(rp.lines[-20:])
    assert not state_dir.exists()  # the temporary state dir (and its NARs) is removed
    for bucket in subjects.ALL_BUCKETS:
        with pytest.raises(NotFoundError):
            await js.key_value(replay.bucket_copy(prefix, "cache", bucket))
    await nc.flush()
    await watch.stop()
    assert on_live == []
    assert await live_snapshot(js) == before
    assert files_under(tmp_path / "live-state") == live_files


MAC2 = "52:54:00:7e:91:02"


def curl_tftp(port: int, name: str) -> None:
    subprocess.run(
        [tool("curl"), "-sS", "--max-time", "20", "-o", os.devnull, f"tftp://127.0.0.1:{port}/{name}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def transfer_keys(evs: list[events.AnyEvent]) -> list[tuple[Any, ...]]:
    """What the TFTP service derives from a transfer, without ids, times and boot ids."""
    out: list[tuple[Any, ...]] = []
    for e in evs:
        if isinstance(e, events.BootFileRequested):
            out.append((e.kind, e.mac, e.file, e.file_kind, e.bytes, e.result))
        elif isinstance(e, events.MenuServed):
            out.append((e.kind, e.mac, e.format, e.default_generation, e.generations, e.fallback))
    return sorted(out, key=repr)


async def test_tftp_in_replay_mode_learns_the_replayed_lease(
    nc: Client, fresh_nats_url: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """The TFTP service learns leases from lease events: a boot program fetched from an address is
    attributed to the MAC that leased it. In replay mode the lease comes from the replayed events
    (the live leases bucket does not know this machine), and the transfer events go under the
    prefix with the same content as the original run's."""
    js = nc.jetstream()
    top = store_toplevel(tmp_path)
    gen = Generation(
        number=3, toplevel=top, kernel=f"{top}/kernel", initrd=f"{top}/initrd",
        kernel_params="", init=f"{top}/init",
    )  # fmt: skip
    kv_gens = await js.key_value(subjects.KV_GENERATIONS)
    await kv_gens.put(
        subjects.mac_token(MAC2),
        msgspec.json.encode(MachineGenerations(mac=MAC2, generations=[gen])),
    )
    config = write_config(tmp_path)
    env = {**clean_env, "NIXBOOT_NATS__URL": fresh_nats_url}
    serve = [sys.executable, "-m", "nixboot", "serve", "tftp", "--config", str(config)]
    menu = f"pxelinux.cfg/01-{MAC2.replace(':', '-')}"

    async def run_boot(proc: OutputProc, publish_lease: Callable[[], Awaitable[None]]) -> int:
        http = int((await proc.wait_line(r"tftp: http \(\w+\) on 127\.0\.0\.1:(\d+)"))[1])
        udp = int((await proc.wait_line(r"tftp: serving \S+ on udp 127\.0\.0\.1:(\d+)"))[1])
        known = httpx.get(f"http://127.0.0.1:{http}/tftp/status").json()["leases"]
        await publish_lease()

        async def learned() -> bool:
            status = httpx.get(f"http://127.0.0.1:{http}/tftp/status").json()
            return bool(status["leases"] == known + 1)

        await wait_for(learned, "the TFTP service learned the lease from its event")
        curl_tftp(udp, "pxelinux.0")
        curl_tftp(udp, menu)
        return udp

    # The original run: the lease event as the DHCP hook publishes it, then the machine's fetches.
    live = OutputProc(serve, env)
    lease = events.LeaseSeen(mac=MAC2, ip="127.0.0.1", arch="bios")

    async def publish_live() -> None:
        await bus.publish(js, lease)

    live_udp = await run_boot(live, publish_live)

    async def live_done() -> bool:
        return len(transfer_keys(await stored(js, MAC2))) == 3

    await wait_for(live_done, "the live TFTP service published its transfers")
    original = await stored(js, MAC2)
    want = transfer_keys(original)
    assert [k[0] for k in want].count("boot-file") == 2 and ("menu" in [k[0] for k in want])
    assert all(k[1] == MAC2 for k in want)  # pxelinux.0 too: attributed through the lease
    assert live.stop() == 0

    before = await live_snapshot(js)
    prefix = "dbg.tftp"
    watch = await Watch.start(nc, prefix)
    under_prefix, on_live = watch.under_prefix, watch.on_live
    rp = OutputProc([*serve[:5], "--replay", prefix, *serve[5:]], env)
    await rp.wait_line(r"tftp: REPLAY MODE: consuming dbg\.tftp\.nixboot\.evt\.>")

    async def replay_lease() -> None:
        out = subprocess.run(
            [sys.executable, "-m", "nixboot", "replay", "--mac", MAC2, "--type", "lease",
             "--since", "10m", "--speed", "max", "--to", prefix],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0 and "republished 1 events" in out.stderr, out.stderr

    replay_udp = await run_boot(rp, replay_lease)
    assert replay_udp != live_udp

    def derived() -> list[events.AnyEvent]:
        evs = [events.decode(m.data) for m in under_prefix]
        return [e for e in evs if e.id != lease.id]

    async def replay_done() -> bool:
        return len(transfer_keys(derived())) == 3

    await wait_for(replay_done, "the replay TFTP service published its transfers")
    assert transfer_keys(derived()) == want
    assert all(m.subject.startswith(f"{prefix}.{subjects.PREFIX}.evt.") for m in under_prefix)
    assert rp.stop() == 0, "\n".join(rp.lines[-20:])
    await nc.flush()
    await watch.stop()
    assert on_live == []
    assert await live_snapshot(js) == before


def test_bad_prefix_exits_2_and_starts_nothing(
    fresh_nats_url: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    config = write_config(tmp_path)
    env = {**clean_env, "NIXBOOT_NATS__URL": fresh_nats_url}
    before = set(Path(tempfile.gettempdir()).glob("nixboot-replay-*"))
    cases = [
        ("cache", "nixboot.evt", "would reach live nixboot. subjects"),
        ("cache", "nixboot", "would reach live nixboot. subjects"),
        ("cache", "bad prefix", "invalid replay prefix"),
        ("cache", "a..b", "invalid replay prefix"),
        ("cache", "x" * 65, "invalid replay prefix"),
        ("tftp", "dbg.>", "invalid replay prefix"),
        ("builder", "dbg", "the builder has no replay mode"),
    ]
    for service, prefix, message in cases:
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "nixboot", "serve", service, "--replay", prefix,
             "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, (prefix, out.stdout, out.stderr)
        assert message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert time.monotonic() - started < 20
    assert set(Path(tempfile.gettempdir()).glob("nixboot-replay-*")) == before
    assert not (tmp_path / "live-state").exists()  # no service got as far as its state dir

    # replay_prefix set by hand (here through the environment) without `serve --replay`: the
    # frame refuses to run with the live state dir and ports.
    out = subprocess.run(
        [sys.executable, "-m", "nixboot", "serve", "cache", "--config", str(config)],
        env={**env, "NIXBOOT_REPLAY_PREFIX": "dbg"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "nixboot serve <service> --replay" in out.stderr, out.stderr


async def test_replay_bus_refuses_live_changes(nc: Client) -> None:
    """The frame's views directly: publishes go under the prefix, management and durable work
    queue consumers are refused, the KV copies stand in for the live buckets."""
    js = nc.jetstream()
    info = await js.stream_info(subjects.EVENTS_STREAM)
    rb = await replay.open_bus(nc, "unit", "probe")
    try:
        seen: list[Msg] = []

        async def got(m: Msg) -> None:
            seen.append(m)

        sub = await nc.subscribe("unit.>", cb=got)
        event = events.LeaseSeen(mac=MAC, ip="10.0.0.9")
        await bus.publish(rb.js, event)
        await rb.nc.publish(subjects.build_log_subject("b1"), b"line")
        handled: list[events.AnyEvent] = []

        async def handler(e: events.AnyEvent) -> None:
            handled.append(e)
            raise RuntimeError("a failing handler is logged, not redelivered")

        consumer = await bus.subscribe_events(rb.js, handler, durable="probe")
        await nc.publish(f"unit.{event.subject}", events.encode(event))
        await nc.flush()
        await asyncio.sleep(0.3)
        assert [m.subject for m in seen][:2] == [
            f"unit.{event.subject}",
            f"unit.{subjects.build_log_subject('b1')}",
        ]
        assert [e.id for e in handled] == [event.id]
        await consumer.unsubscribe()
        await sub.unsubscribe()
        after = await js.stream_info(subjects.EVENTS_STREAM)
        assert after.state.last_seq == info.state.last_seq
        assert "probe" not in [c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)]
        with pytest.raises(replay.ReplayRefused):
            await rb.js.pull_subscribe(subjects.BUILDS_SUBJECTS, durable="nixboot-builder")
        # Reading the stored events (ephemeral, no acks: POST /replay, the CLI) still works.
        assert len(await stored(rb.js, MAC)) == len(await stored(js, MAC))
        for refused in (
            rb.js.purge_stream(subjects.EVENTS_STREAM),
            rb.js.delete_consumer(subjects.EVENTS_STREAM, "nixboot-timeline"),
            rb.js.delete_key_value(subjects.KV_GENERATIONS),
        ):
            with pytest.raises(replay.ReplayRefused):
                await refused
        copy = await rb.js.key_value(subjects.KV_LEASES)
        assert copy is rb.kv[subjects.KV_LEASES]
        await copy.put("probe", b"1")
        live = await js.key_value(subjects.KV_LEASES)
        with pytest.raises(Exception, match="not found"):
            await live.get("probe")
    finally:
        await rb.close()
    with pytest.raises(NotFoundError):
        await js.key_value(replay.bucket_copy("unit", "probe", subjects.KV_LEASES))
