"""The binary-cache routes as a plain ASGI app without NATS (no events, no warming, no menus from
generations): what ``bench/cache_servers.py`` runs under uvicorn and granian to compare them on
exactly the same code. Config from ``NIXBOOT_*`` like the service."""

from __future__ import annotations

from fastapi import FastAPI

from nixboot_cache.service import CacheService, add_routes
from nixboot_shared.config import load
from nixboot_shared.service import base_app


def create_app() -> FastAPI:
    app = base_app("cache", None)
    add_routes(app, CacheService(load()))
    return app
