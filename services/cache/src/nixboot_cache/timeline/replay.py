"""Republishing stored events under a separate prefix, to run a handler against past traffic
without touching the live subjects."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.js import JetStreamContext

from nixboot_cache.timeline import stream


async def republish(
    nc: Client, js: JetStreamContext, q: stream.Query, prefix: str, speed: str = "max"
) -> int:
    """Publish every matching stored event to ``<prefix>.<its subject>`` (core NATS); with
    ``speed="original"`` keep the original gaps between events. Returns how many."""
    stream.check_prefix(prefix)
    if speed not in ("max", "original"):
        raise stream.BadQuery(f"invalid speed {speed!r}: use max or original")
    count = 0
    previous: float | None = None
    async for stored in stream.read(js, q):
        if speed == "original" and stored.event is not None:
            if previous is not None and stored.event.ts > previous:
                await asyncio.sleep(stored.event.ts - previous)
            previous = stored.event.ts
        await nc.publish(f"{prefix}.{stored.subject}", stored.data)
        count += 1
    await nc.flush()
    return count
