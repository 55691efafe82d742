"""builder service (foundation stage): publishes the configured machines to the registry."""

from __future__ import annotations

import logging

import msgspec
from fastapi import FastAPI

from nixboot_shared import records, subjects
from nixboot_shared.config import Config
from nixboot_shared.service import ServiceContext, run

log = logging.getLogger(__name__)


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    kv = ctx.kv[subjects.KV_MACHINES]
    for entry in ctx.cfg.machines:
        machine = records.Machine(
            mac=entry.mac, name=entry.name, attr=entry.attr, labels=entry.labels
        )
        await kv.put(subjects.mac_token(machine.mac), msgspec.json.encode(machine))
    log.info("registry: %d machines from configuration", len(ctx.cfg.machines))


def main(cfg: Config) -> int:
    return run("builder", cfg, cfg.builder.http, setup)
