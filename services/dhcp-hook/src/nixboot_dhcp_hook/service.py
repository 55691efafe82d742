"""dhcp-hook service: turns DHCP leases into LeaseSeen events and the MAC<->IP lease map."""

from __future__ import annotations

import ipaddress
import logging

import msgspec
from fastapi import FastAPI, Request, Response

from nixboot_shared import bus, events, metrics, records, security, subjects
from nixboot_shared.config import Config
from nixboot_shared.service import ServiceContext, run

log = logging.getLogger(__name__)


class LeasePayload(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mac: str
    ip: str
    hostname: str | None = None
    kind: events.LeaseKind = "new"
    expires: float | None = None
    arch: events.Arch = "unknown"
    user_class: str | None = None
    vendor_class: str | None = None
    server_ts: float | None = None


def to_event(p: LeasePayload, source: str) -> events.LeaseSeen:
    ipaddress.IPv4Address(p.ip)  # ValueError names the bad address
    return events.LeaseSeen(
        mac=p.mac,
        ip=p.ip,
        lease_kind=p.kind,
        hostname=p.hostname,
        expires=p.expires,
        arch=p.arch,
        user_class=p.user_class,
        vendor_class=p.vendor_class,
        source=source,
        server_ts=p.server_ts,
    )


async def record(ctx: ServiceContext, event: events.LeaseSeen) -> None:
    await bus.publish(ctx.js, event)
    assert event.mac is not None
    lease = records.Lease(
        mac=event.mac,
        ip=event.ip,
        hostname=event.hostname,
        expires=event.expires,
        arch=event.arch,
        user_class=event.user_class,
        server_ts=event.server_ts,
        seen=event.ts,
    )
    kv = ctx.kv[subjects.KV_LEASES]
    await kv.put(subjects.mac_token(event.mac), msgspec.json.encode(lease))
    await kv.put(subjects.ip_key(event.ip), subjects.mac_token(event.mac).encode())


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    token = security.read_or_create_secret(ctx.cfg.api_token_path())

    @app.post("/leases")
    async def post_lease(request: Request) -> Response:
        if not security.check_api_token(token, request.headers.get("authorization")):
            metrics.BAD_INPUT.labels("dhcp-hook-http").inc()
            return Response('{"error":"missing or wrong API token"}', 401)
        try:
            payload = msgspec.json.decode(await request.body(), type=LeasePayload)
            event = to_event(payload, "http")
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            metrics.BAD_INPUT.labels("dhcp-hook-http").inc()
            log.warning("rejected lease payload: %s", e)
            return Response(msgspec.json.encode({"error": str(e)}), 400)
        await record(ctx, event)
        return Response(msgspec.json.encode({"id": event.id}), 202)


def main(cfg: Config) -> int:
    return run("dhcp-hook", cfg, cfg.dhcp_hook.http, setup)
