"""The event backbone against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from nixboot_shared import bus, events, metrics, subjects


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def test_bootstrap_is_idempotent_under_concurrency(nats_url: str) -> None:
    clients = [await nats.connect(nats_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(bus.bootstrap(c.jetstream()) for c in clients))
        assert all(set(r) == set(subjects.ALL_BUCKETS) for r in results)
        info = await clients[0].jetstream().stream_info(subjects.EVENTS_STREAM)
        assert info.config.subjects == [subjects.EVENTS_SUBJECTS]
    finally:
        for c in clients:
            await c.close()


async def test_retried_publish_is_stored_once(nc: Client) -> None:
    js = nc.jetstream()
    await bus.bootstrap(js)
    event = events.LeaseSeen(mac="02:00:00:00:00:01", ip="10.1.0.1")
    before = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
    await bus.publish(js, event)
    await bus.publish(js, event)  # as after a lost ack
    after = (await js.stream_info(subjects.EVENTS_STREAM)).state.messages
    assert after - before == 1
    msg = await js.get_last_msg(subjects.EVENTS_STREAM, event.subject)
    assert events.decode(msg.data or b"") == event


async def test_consumer_terminates_bad_messages_and_keeps_going(nc: Client) -> None:
    js = nc.jetstream()
    await bus.bootstrap(js)
    got: list[events.AnyEvent] = []
    done = asyncio.Event()

    async def handler(event: events.AnyEvent) -> None:
        got.append(event)
        done.set()

    rejected = metrics.EVENTS_REJECTED.labels("test-bad")
    before = rejected._value.get()
    mac = "02:00:00:00:00:02"
    await bus.subscribe_events(
        js, handler, durable="test-bad", filter_subject=f"nixboot.evt.*.{subjects.mac_token(mac)}"
    )
    await js.publish(subjects.event_subject("lease", mac), b"{garbage")
    good = events.LeaseSeen(mac=mac, ip="10.1.0.2")
    await bus.publish(js, good)
    await asyncio.wait_for(done.wait(), 15)
    assert got == [good]
    assert rejected._value.get() == before + 1
    # The ack goes out just after the handler returns: give it a moment to reach the server.
    for _ in range(50):
        info = await js.consumer_info(subjects.EVENTS_STREAM, "test-bad")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
