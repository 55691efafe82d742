"""cache service (foundation stage): sees lease events and says what it would warm."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from nixboot_shared import bus, events
from nixboot_shared.config import Config
from nixboot_shared.service import ServiceContext, run

log = logging.getLogger(__name__)


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    async def on_event(event: events.AnyEvent) -> None:
        if isinstance(event, events.LeaseSeen):
            log.info("lease %s -> %s: would warm its generation", event.mac, event.ip)

    await bus.subscribe_events(
        ctx.js, on_event, durable="cache-warm", filter_subject="nixboot.evt.lease.>"
    )


def main(cfg: Config) -> int:
    return run("cache", cfg, cfg.cache.http, setup)
