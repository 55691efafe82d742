"""`nixboot status`: each service's health and the state of the NATS streams and buckets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from nixboot.supervisor import SERVICES, health_url
from nixboot_shared import bus, subjects
from nixboot_shared.config import Config


def embedded_url(cfg: Config) -> str:
    return cfg.nats_client().url


async def _nats_state(cfg: Config) -> dict[str, Any]:
    settings = cfg.nats_client()
    try:
        nc = await asyncio.wait_for(
            bus.connect(settings.url, "nixboot-status", settings=settings), 3
        )
    except Exception as e:
        return {"url": embedded_url(cfg), "connected": False, "error": str(e) or type(e).__name__}
    try:
        js = nc.jetstream()
        streams: dict[str, Any] = {}
        for name in (subjects.EVENTS_STREAM, subjects.BUILDS_STREAM):
            try:
                info = await js.stream_info(name)
                streams[name] = {"messages": info.state.messages, "bytes": info.state.bytes}
            except Exception as e:
                streams[name] = {"error": str(e) or type(e).__name__}
        buckets: dict[str, Any] = {}
        for bucket in subjects.ALL_BUCKETS:
            try:
                status = await (await js.key_value(bucket)).status()
                buckets[bucket] = {"values": status.values}
            except Exception as e:
                buckets[bucket] = {"error": str(e) or type(e).__name__}
        return {"url": embedded_url(cfg), "connected": True, "streams": streams, "buckets": buckets}
    finally:
        logging.disable(logging.WARNING)  # our own close is not a disconnect worth a warning
        await nc.close()
        logging.disable(logging.NOTSET)


def collect(cfg: Config) -> dict[str, Any]:
    services: dict[str, Any] = {}
    with httpx.Client(timeout=1.0) as client:
        for name in SERVICES:
            url = health_url(cfg, name)
            try:
                r = client.get(url)
                services[name] = {"url": url, "healthy": r.status_code == 200}
            except httpx.HTTPError as e:
                services[name] = {"url": url, "healthy": False, "error": type(e).__name__}
    return {"services": services, "nats": asyncio.run(_nats_state(cfg))}
