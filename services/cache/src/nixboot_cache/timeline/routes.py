"""HTTP routes of the tracker: live status per machine, a machine's timeline, replay."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nixboot_cache.timeline import page, replay, stream, views
from nixboot_cache.timeline.tracker import Tracker
from nixboot_shared import metrics as shared_metrics
from nixboot_shared import security, subjects


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    since: str | None = None
    start_seq: int | None = None
    until: str | None = None
    mac: str | None = None
    type: str | None = None
    # Republish under this prefix; None: return the events in the answer.
    to: str | None = None
    limit: int = 10000


def _error(status: int, message: str) -> JSONResponse:
    shared_metrics.BAD_INPUT.labels("timeline-http").inc()
    return JSONResponse({"error": message}, status_code=status)


def add_routes(
    app: FastAPI,
    tracker: Tracker,
    nc: Client,
    js: JetStreamContext,
    api_token: str,
    kv: dict[str, KeyValue] | None = None,
) -> None:
    @app.api_route("/", methods=["GET", "HEAD"])
    async def status_page() -> HTMLResponse:
        return HTMLResponse(await page.render(tracker, kv or {}))

    @app.api_route("/boots", methods=["GET", "HEAD"])
    async def boots() -> JSONResponse:
        now = time.time()
        machines = []
        for state in tracker.machines.values():
            view = views.machine_status(state, now, tracker.rules)
            if view is not None:
                machines.append(view)
        machines.sort(key=lambda m: m["mac"])
        return JSONResponse({"machines": machines})

    @app.api_route("/boots/{mac}/timeline", methods=["GET", "HEAD"])
    async def timeline(mac: str, boots: int = 3, boot: int | None = None) -> JSONResponse:
        try:
            token = subjects.mac_token(mac)
        except subjects.InvalidMac as e:
            return _error(400, str(e))
        if not 1 <= boots <= 100:
            return _error(400, "boots: must be between 1 and 100")
        state = tracker.machines.get(token)
        if state is None:
            return _error(404, f"no boots seen from {subjects.normalize_mac(mac)}")
        sessions = views.machine_timeline(state, time.time(), tracker.rules, boots, boot)
        if boot is not None and not sessions:
            return _error(404, f"boot {boot} of {state.mac} is not kept")
        return JSONResponse({"mac": state.mac, "boots": sessions})

    @app.post("/replay")
    async def replay_route(request: Request) -> Response:
        if not security.check_api_token(api_token, request.headers.get("authorization")):
            return _error(401, "missing or wrong API token (Authorization: Bearer <token>)")
        try:
            body = msgspec.json.decode(await request.body() or b"{}", type=ReplayRequest)
            now = time.time()
            q = stream.Query(
                since=stream.parse_time(body.since, now) if body.since else None,
                start_seq=body.start_seq,
                until=stream.parse_time(body.until, now) if body.until else None,
                mac=body.mac,
                kind=body.type,
                limit=max(1, min(body.limit, 100000)),
            )
            q.filter_subject()  # validates mac and type before touching NATS
            if body.to is not None:
                stream.check_prefix(body.to)
        except (msgspec.ValidationError, msgspec.DecodeError, stream.BadQuery) as e:
            return _error(400, str(e))
        if body.to is not None:
            count = await replay.republish(nc, js, q, body.to)
            return JSONResponse({"republished": count, "to": body.to})
        lines: list[str] = []
        async for stored in stream.read(js, q):
            item: dict[str, Any] = {"seq": stored.seq, "subject": stored.subject}
            if stored.event is not None:
                item["event"] = views.event_view(stored.event)
            else:
                item["raw"] = stored.data.decode("utf-8", "replace")
            lines.append(json.dumps(item))
        return Response("".join(line + "\n" for line in lines), media_type="application/x-ndjson")
