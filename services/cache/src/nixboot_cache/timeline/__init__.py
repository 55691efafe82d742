"""Boot timelines: correlate every boot's events into sessions with per-stage timing.

``setup_timeline`` is called from the cache service's setup: it loads the sessions from KV,
starts the durable consumer and the abandon/settle ticker, and adds the HTTP routes
``GET /`` (status page), ``GET /boots``, ``GET /boots/{mac}/timeline`` and ``POST /replay``.
"""

from __future__ import annotations

from fastapi import FastAPI

from nixboot_cache.timeline.routes import add_routes
from nixboot_cache.timeline.tracker import Tracker
from nixboot_shared import security, subjects
from nixboot_shared.service import ServiceContext


async def setup_timeline(ctx: ServiceContext, app: FastAPI) -> None:
    tracker = Tracker(ctx.kv[subjects.KV_BOOTS], ctx.cfg.timeline)
    await tracker.load()
    api_token = security.read_or_create_secret(ctx.cfg.api_token_path())
    add_routes(app, tracker, ctx.nc, ctx.js, api_token, ctx.kv)
    sub = await tracker.subscribe(ctx.js)

    async def stop() -> None:
        await sub.unsubscribe()

    ctx.cleanups.append(stop)
    ctx.spawn(tracker.run_ticks(), "timeline-ticks")


__all__ = ["Tracker", "setup_timeline"]
