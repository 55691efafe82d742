"""builder service: the machine registry, the build work queue consumer, flake polling and the HTTP
API. One-shot pins are set here and spent by the menu servers (tftp, cache) when a menu that makes
them default is served: the rule lives in nixboot_shared.pins."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from nixboot_builder import api, demo
from nixboot_builder.nix import Nix
from nixboot_builder.poller import FlakePoller
from nixboot_builder.store import Store
from nixboot_builder.worker import Builder
from nixboot_shared import subjects
from nixboot_shared.config import Config
from nixboot_shared.records import Machine
from nixboot_shared.security import read_or_create_secret
from nixboot_shared.service import ServiceContext, run

log = logging.getLogger(__name__)


def flake_ref(cfg: Config) -> str:
    """The configured flake, or a prepared copy of the bundled demo under the state directory."""
    if cfg.builder.flake:
        return cfg.builder.flake
    return demo.prepare(cfg.state_path / "demo-flake")


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    cfg = ctx.cfg
    token = read_or_create_secret(cfg.api_token_path())
    store = Store(ctx.js, ctx.kv[subjects.KV_MACHINES], ctx.kv[subjects.KV_GENERATIONS])
    for entry in cfg.machines:
        await store.put_machine(
            Machine(mac=entry.mac, name=entry.name, attr=entry.attr, labels=entry.labels)
        )
    log.info("registry: %d machines from configuration", len(cfg.machines))
    flake = flake_ref(cfg)
    nix = Nix(cfg.builder.nix_options)
    state_dir = Path(cfg.state_dir)
    builder = Builder(
        ctx.nc,
        ctx.js,
        store,
        nix,
        flake,
        state_dir,
        cfg.builder.keep_generations,
        cfg.fallback_attr,
    )
    ctx.spawn(builder.run(), "builds")
    if cfg.builder.poll_seconds > 0:
        poller = FlakePoller(ctx.js, store, nix, flake, cfg.fallback_attr)
        ctx.spawn(poller.run(cfg.builder.poll_seconds), "poll")

    async def leave_queues() -> None:
        await builder.stop()

    ctx.cleanups.append(leave_queues)

    async def list_attrs() -> list[str] | None:
        return await api.flake_attrs(nix, flake)

    api.install(
        app,
        nc=ctx.nc,
        js=ctx.js,
        store=store,
        nix=nix,
        state_dir=state_dir,
        token=token,
        list_attrs=list_attrs,
        fallback_attr=cfg.fallback_attr,
    )
    log.info("builder: flake %s, keeping %d generations", flake, cfg.builder.keep_generations)


def main(cfg: Config) -> int:
    return run("builder", cfg, cfg.builder.http, setup)
