"""Scale-out on a real 3-node NATS cluster (three nats-server processes on loopback, JetStream R3):
services on different nodes, a node killed mid-flow, restarted, caught up; builders sharing the
build work queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nixboot_shared import bus, events, records, subjects

from .natsproc import NatsNode, cluster_nodes, wait_jetstream

pytestmark = pytest.mark.timeout(120)


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
        while len(got) < len(sent):
            try:
                msgs = await sub.fetch(100, timeout=5)
            except NatsTimeout:
                break
            for m in msgs:
                got.append(events.decode(m.data).id)
                await m.ack()
        assert sorted(got) == sorted(sent)
        assert (await rjs.stream_info(subjects.EVENTS_STREAM)).state.messages == 120

        # KV state written before the crash is intact, read through a surviving node.
        rkv = await rjs.key_value(subjects.KV_MACHINES)
        entry = await rkv.get(key)
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
    """Two builder instances on different nodes bind the same durable pull consumer of the R3
    NIXBOOT_BUILDS work queue: every request goes to exactly one of them; a request taken by an
    instance that dies unacknowledged is redelivered to the other after ack_wait."""
    admin = await nats.connect(cluster[0].url)
    b1 = await nats.connect(cluster[1].url)
    b2 = await nats.connect(cluster[2].url)
    try:
        await bus.bootstrap(admin.jetstream(), replicas=3)
        consumer = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=2, max_deliver=5)
        sub1 = await b1.jetstream().pull_subscribe(
            subjects.BUILDS_SUBJECTS, durable="test-builders", config=consumer
        )
        sub2 = await b2.jetstream().pull_subscribe(
            subjects.BUILDS_SUBJECTS, durable="test-builders", config=consumer
        )
        requests = [events.BuildRequested(build_id=f"b{i}", attr=f"lab-{i % 3}") for i in range(10)]
        ajs = admin.jetstream()
        for r in requests:
            await ajs.publish(
                subjects.build_request_subject(r.attr),
                events.encode(r),
                headers={"Nats-Msg-Id": r.id},
            )

        # Builder 1 takes one request and dies mid-build (no ack, connection gone).
        [crashed] = await sub1.fetch(1, timeout=5)
        crashed_id = events.decode(crashed.data)
        assert isinstance(crashed_id, events.BuildRequested)
        await b1.close()

        built: dict[str, list[str]] = {}

        async def builder(name: str, sub: nats.js.JetStreamContext.PullSubscription) -> None:
            while sum(len(v) for v in built.values()) < len(requests):
                try:
                    msgs = await sub.fetch(1, timeout=1)
                except NatsTimeout:
                    continue
                for m in msgs:
                    req = events.decode(m.data)
                    assert isinstance(req, events.BuildRequested)
                    built.setdefault(req.build_id, []).append(name)
                    await m.ack_sync()  # confirmed: the request leaves the work queue now

        await asyncio.wait_for(builder("b2", sub2), timeout=30)
        assert sorted(built) == sorted(r.build_id for r in requests)
        assert all(len(who) == 1 for who in built.values()), built
        assert built[crashed_id.build_id] == ["b2"]
        # Work-queue retention: acknowledged requests are gone from the stream.
        info = await ajs.stream_info(subjects.BUILDS_STREAM)
        assert info.state.messages == 0
    finally:
        for nc in (admin, b1, b2):
            if not nc.is_closed:
                await nc.close()
