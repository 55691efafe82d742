"""Scale-out on a real 3-node NATS cluster (three nats-server processes on loopback, JetStream R3):
services on different nodes, a node killed mid-flow, restarted, caught up; builders sharing the
build work queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from nixboot_builder import wire, worker
from nixboot_shared import bus, events, records, subjects

from .natsproc import NatsNode, cluster_nodes, wait_jetstream

# A ceiling for a hung cluster, not an expected duration (about 15 s each here): the waits below
# add up to about 370 s at worst (cluster start 90, publishing 60, read-back 30, leader elections
# 3 x 20, catch-up 2 x 30, restart and teardown), so a slow but healthy run is not cut short.
pytestmark = pytest.mark.timeout(400)

T = TypeVar("T")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[NatsNode]]:
    nodes = cluster_nodes(tmp_path)
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await wait_jetstream(node.url)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def until_available(call: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Retry while JetStream answers 503 or times out: after a node dies, each stream and bucket
    whose raft leader it was elects a new one (a few seconds), as a running service would wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except (ServiceUnavailableError, NatsTimeout):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


def node_of(nc: Client, nodes: list[NatsNode]) -> NatsNode:
    assert nc.connected_url is not None
    return next(n for n in nodes if n.port == nc.connected_url.port)


async def wait_caught_up(nc: Client, stream: str, peer: str, timeout: float = 30.0) -> None:
    """Until ``peer`` is the stream's leader or a current replica with no lag."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    state = "no info"
    while time.monotonic() < deadline:
        try:
            info = await js.stream_info(stream)
        except Exception as e:  # a stream leader election in progress
            state = repr(e)
        else:
            cl = info.cluster
            assert cl is not None
            if cl.leader == peer:
                return
            for r in cl.replicas or []:
                if r.name == peer:
                    state = f"current={r.current} lag={r.lag} offline={r.offline}"
                    if r.current and not r.offline and not r.lag:
                        return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{peer} did not catch up on {stream}: {state}")


async def test_r3_cluster_survives_a_node_loss_and_catches_up(cluster: list[NatsNode]) -> None:
    all_urls = ",".join(n.url for n in cluster)
    publisher = await bus.connect(all_urls, "test-dhcp-hook")
    pub_node = node_of(publisher, cluster)
    # The reading service is on another node, and stays there (it lists only the other nodes).
    others = [n for n in cluster if n is not pub_node]
    reader = await bus.connect(",".join(n.url for n in others), "test-cache")
    try:
        assert node_of(reader, cluster) is not pub_node
        kv = await bus.bootstrap(publisher.jetstream(), replicas=3)
        # Bootstrapping again from the other node is a no-op (services start in any order).
        await bus.bootstrap(reader.jetstream(), replicas=3)

        rjs = reader.jetstream()
        for stream in (subjects.EVENTS_STREAM, subjects.BUILDS_STREAM):
            info = await rjs.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        for bucket in subjects.ALL_BUCKETS:
            info = await rjs.stream_info(f"KV_{bucket}")
            assert info.config.num_replicas == 3, bucket

        machine = records.Machine(mac="52:54:00:00:00:01", name="lab-01", attr="lab")
        key = subjects.mac_token(machine.mac)
        await kv[subjects.KV_MACHINES].put(key, msgspec.json.encode(machine))

        # The reader's durable consumer exists before the crash, as a running service's does (a
        # new R3 asset cannot be placed while only two of three peers are up).
        sub = await rjs.pull_subscribe(
            subjects.EVENTS_SUBJECTS,
            durable="test-reader",
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT),
        )

        sent: list[str] = []

        async def publish_all(n: int, kill_after: int) -> None:
            for i in range(n):
                if i == kill_after:
                    pub_node.kill()  # the publisher's own node crashes mid-flow
                event = events.LeaseSeen(
                    mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", ip="10.0.0.9"
                )
                await bus.publish(publisher.jetstream(), event)
                sent.append(event.id)

        await asyncio.wait_for(publish_all(120, kill_after=40), timeout=60)
        assert len(sent) == 120
        assert publisher.is_connected and node_of(publisher, cluster) is not pub_node

        # Read everything back through the other node: every event once, none lost.
        got: list[str] = []
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(100, timeout=2)
            except (ServiceUnavailableError, NatsTimeout):  # the consumer's leader moving
                await asyncio.sleep(0.25)
                continue
            for m in msgs:
                got.append(events.decode(m.data).id)
                await m.ack()
        assert sorted(got) == sorted(sent)
        info = await until_available(lambda: rjs.stream_info(subjects.EVENTS_STREAM))
        assert info.state.messages == 120

        # KV state written before the crash is intact, read through a surviving node.
        rkv = await until_available(lambda: rjs.key_value(subjects.KV_MACHINES))
        entry = await until_available(lambda: rkv.get(key))
        assert entry.value is not None
        assert msgspec.json.decode(entry.value, type=records.Machine) == machine

        # Restart the crashed node on its old store: it catches up with what it missed.
        pub_node.start()
        await wait_caught_up(reader, subjects.EVENTS_STREAM, pub_node.name)
        await wait_caught_up(reader, f"KV_{subjects.KV_MACHINES}", pub_node.name)
        direct = await nats.connect(pub_node.url, allow_reconnect=False)
        try:
            info = await direct.jetstream().stream_info(subjects.EVENTS_STREAM)
            assert info.state.messages == 120
        finally:
            await direct.close()
    finally:
        await publisher.close()
        await reader.close()


async def test_builders_share_the_work_queue_and_take_over_a_crashed_build(
    cluster: list[NatsNode],
) -> None:
    """Builder instances on different nodes bind the builder's durable pull consumer of the R3
    NIXBOOT_BUILDS work queue (the builder's own name and wire format; the build itself is a sleep
    here, nix builds are the builder's tests): every request goes to exactly one of them; a request
    taken by an instance that dies unacknowledged is redelivered to another after ack_wait."""
    admin = await nats.connect(cluster[0].url)
    b1 = await nats.connect(cluster[1].url)
    b2 = await nats.connect(cluster[2].url)
    b3 = await nats.connect(cluster[0].url)
    try:
        await bus.bootstrap(admin.jetstream(), replicas=3)
        consumer = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=2, max_deliver=5)
        subs = [
            await nc.jetstream().pull_subscribe(
                subjects.BUILDS_SUBJECTS, durable=worker.DURABLE, config=consumer
            )
            for nc in (b1, b2, b3)
        ]
        # Queued the way the builder service queues them (its wire format, dedupe header, event).
        ajs = admin.jetstream()
        requests = [
            await worker.request_build(ajs, f"lab-{i % 3}", "test", dedupe_key=f"req-{i}")
            for i in range(10)
        ]

        # Builder 1 takes one request and dies mid-build (no ack, connection gone).
        [crashed] = await subs[0].fetch(1, timeout=5)
        crashed_req = wire.decode_request(crashed.data)
        await b1.close()

        built: dict[str, list[str]] = {}

        async def builder(name: str, sub: nats.js.JetStreamContext.PullSubscription) -> None:
            while sum(len(v) for v in built.values()) < len(requests):
                try:
                    msgs = await sub.fetch(1, timeout=1)
                except NatsTimeout:
                    continue
                for m in msgs:
                    req = wire.decode_request(m.data)
                    built.setdefault(req.build_id, []).append(name)
                    await asyncio.sleep(0.1)  # the build: lets the other instance take the next
                    await m.ack_sync()  # confirmed: the request leaves the work queue now

        await asyncio.wait_for(
            asyncio.gather(builder("b2", subs[1]), builder("b3", subs[2])), timeout=30
        )
        assert sorted(built) == sorted(r.build_id for r in requests)
        assert all(len(who) == 1 for who in built.values()), built
        assert built[crashed_req.build_id][0] in {"b2", "b3"}
        by = {name: [b for b, who in built.items() if who == [name]] for name in ("b2", "b3")}
        assert by["b2"] and by["b3"], by  # both instances did share the work
        # Work-queue retention: acknowledged requests leave the stream (the removal reaches the
        # stream's leader asynchronously in a cluster, hence the wait).
        deadline = time.monotonic() + 10
        while (await ajs.stream_info(subjects.BUILDS_STREAM)).state.messages:
            assert time.monotonic() < deadline, "acknowledged requests stayed in the work queue"
            await asyncio.sleep(0.1)
    finally:
        for nc in (admin, b1, b2, b3):
            if not nc.is_closed:
                await nc.close()
