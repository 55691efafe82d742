"""The one-shot pin rule (nixboot_shared.pins) against a real nats-server's KV bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nixboot_shared import bus, pins, subjects
from nixboot_shared.records import Generation, MachineGenerations

MAC = "02:00:00:00:07:01"


def gen(n: int) -> Generation:
    return Generation(
        number=n, toplevel=f"/nix/store/{n:032d}-sys", kernel="k", initrd="i",
        kernel_params="", init="/init",
    )  # fmt: skip


@pytest.fixture
async def kv(nats_url: str) -> AsyncIterator[KeyValue]:
    nc: Client = await nats.connect(nats_url)
    yield (await bus.bootstrap(nc.jetstream()))[subjects.KV_GENERATIONS]
    await nc.close()


async def put(kv: KeyValue, **kw: object) -> None:
    rec = MachineGenerations(mac=MAC, generations=[gen(1), gen(2), gen(3)], **kw)  # type: ignore[arg-type]
    await kv.put(subjects.mac_token(MAC), msgspec.json.encode(rec))


async def read(kv: KeyValue) -> MachineGenerations:
    entry = await kv.get(subjects.mac_token(MAC))
    assert entry.value is not None
    return msgspec.json.decode(entry.value, type=MachineGenerations)


def test_only_a_pin_the_menu_makes_default_is_reported() -> None:
    base = MachineGenerations(mac=MAC, generations=[gen(1), gen(2)])
    assert pins.once_made_default(None) is None
    assert pins.once_made_default(base) is None
    assert pins.once_made_default(msgspec.structs.replace(base, next_boot=1)) == 1
    # a pin naming a generation that is gone makes nothing default: not spent by this menu
    assert pins.once_made_default(msgspec.structs.replace(base, next_boot=9)) is None


async def test_consume_clears_once_and_keeps_everything_else(kv: KeyValue) -> None:
    await put(kv, next_boot=1, pinned=2)
    assert await pins.consume_next_boot(kv, MAC, 1) is True
    rec = await read(kv)
    assert rec.next_boot is None and rec.pinned == 2 and len(rec.generations) == 3
    assert await pins.consume_next_boot(kv, MAC, 1) is False  # already spent


async def test_a_newer_pin_is_never_cleared_by_an_older_menu(kv: KeyValue) -> None:
    await put(kv, next_boot=3)
    assert await pins.consume_next_boot(kv, MAC, 1) is False
    assert (await read(kv)).next_boot == 3


async def test_concurrent_consumers_spend_it_exactly_once(kv: KeyValue) -> None:
    """tftp and cache (or two cache replicas) racing on the same menu's pin: one wins."""
    await put(kv, next_boot=2)
    results = await asyncio.gather(*(pins.consume_next_boot(kv, MAC, 2) for _ in range(6)))
    assert results.count(True) == 1
    assert (await read(kv)).next_boot is None


async def test_unknown_machine_is_left_alone(kv: KeyValue) -> None:
    assert await pins.consume_next_boot(kv, "02:00:00:00:07:99", 1) is False
