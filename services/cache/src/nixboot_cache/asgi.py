"""The binary-cache routes as a plain ASGI app without NATS (no events, no warming, no menus from
generations): what ``bench/cache_servers.py`` runs under uvicorn and granian to compare them on
exactly the same code. Config from ``NIXBOOT_*`` like the service."""

from __future__ import annotations

from starlette.types import ASGIApp

from nixboot_cache.hotpath import HotPath
from nixboot_cache.service import CacheService, add_routes
from nixboot_shared.config import load
from nixboot_shared.service import base_app


def create_app() -> ASGIApp:
    """The FastAPI app behind the hot-path front, as the service runs it."""
    app = base_app("cache", None)
    svc = CacheService(load())
    add_routes(app, svc)
    return HotPath(app, svc)
