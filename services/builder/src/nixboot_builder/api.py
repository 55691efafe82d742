"""The builder's HTTP API. Reads are open; mutations need ``Authorization: Bearer <token>``.

GET    /machines                       list
POST   /machines                       add (409 if the MAC exists)
GET    /machines/{ref}                 one machine (MAC or name) and its generations
PUT    /machines/{ref}                 add or change
DELETE /machines/{ref}                 remove (and its generations and GC roots)
GET    /machines/{ref}/generations     generation history
POST   /machines/{ref}/pin             {"number": n | null, "once": bool}
POST   /builds                         {"machines": [ref...]} or {"all": true}
GET    /builds/{build_id}/follow       NDJSON: progress and log lines until the end
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from nixboot_builder import gcroots, generations, wire
from nixboot_builder.nix import InvalidAttr, Nix, NixError, check_attr
from nixboot_builder.store import Store
from nixboot_builder.worker import request_build
from nixboot_shared import bus, events, subjects
from nixboot_shared.records import Machine, MachineGenerations
from nixboot_shared.security import check_api_token
from nixboot_shared.subjects import InvalidMac, mac_token

AttrLister = Callable[[], Awaitable[list[str] | None]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PinBody(msgspec.Struct, forbid_unknown_fields=True):
    number: int | None
    once: bool = False


class BuildBody(msgspec.Struct, forbid_unknown_fields=True):
    machines: list[str] = msgspec.field(default_factory=list)
    all: bool = False


def _json(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError, InvalidMac) as e:
        raise ApiError(422, f"invalid request body: {e}") from None


def install(
    app: FastAPI,
    *,
    nc: Client,
    js: JetStreamContext,
    store: Store,
    nix: Nix,
    state_dir: Path,
    token: str,
    list_attrs: AttrLister,
    fallback_attr: str = "",
) -> None:
    def authorize(request: Request) -> None:
        if not check_api_token(token, request.headers.get("authorization")):
            raise ApiError(401, "missing or wrong API token (Authorization: Bearer <token>)")

    async def resolve(ref: str) -> Machine:
        with contextlib.suppress(InvalidMac):
            m = await store.machine(ref)
            if m is not None:
                return m
        for m in await store.machines():
            if m.name == ref:
                return m
        raise ApiError(404, f"unknown machine {ref!r} (give its MAC or name)")

    async def validate(machine: Machine) -> None:
        try:
            check_attr(machine.attr)
        except InvalidAttr as e:
            raise ApiError(422, str(e)) from None
        if not machine.name.strip():
            raise ApiError(422, "machine name must not be empty")
        attrs = await list_attrs()
        # The flake may be unreadable right now; then the attribute is checked at build time.
        if attrs is not None and machine.attr not in attrs:
            have = ", ".join(attrs) or "none"
            raise ApiError(
                422, f"the flake has no nixosConfigurations.{machine.attr} (it has: {have})"
            )

    async def build_if_new(machine: Machine, previous: Machine | None = None) -> None:
        """A new machine, or one moved to another configuration, gets a build right away."""
        record = await store.generations(mac_token(machine.mac))
        if not (record and record.generations) or (previous and previous.attr != machine.attr):
            await request_build(js, machine.attr, "machine-added")

    def gens_json(record: MachineGenerations | None) -> dict[str, Any]:
        if record is None:
            return {"generations": [], "pinned": None, "next_boot": None, "default": None}
        default = record.default()
        return {
            "generations": msgspec.to_builtins(record.newest_first()),
            "pinned": record.pinned,
            "next_boot": record.next_boot,
            "default": default.number if default else None,
        }

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, str(exc))

    @app.get("/machines")
    async def list_machines() -> Response:
        return _json(await store.machines())

    @app.post("/machines")
    async def add_machine(request: Request) -> Response:
        authorize(request)
        machine: Machine = _decode(await request.body(), Machine)
        await validate(machine)
        if await store.machine(machine.mac) is not None:
            raise ApiError(409, f"machine {machine.mac} exists (PUT /machines/{machine.mac})")
        for other in await store.machines():
            if other.name == machine.name:
                raise ApiError(409, f"name {machine.name!r} is taken by {other.mac}")
        await store.put_machine(machine)
        await build_if_new(machine)
        return _json(machine, 201)

    @app.get("/machines/{ref}")
    async def show_machine(ref: str) -> Response:
        m = await resolve(ref)
        record = await store.generations(mac_token(m.mac))
        return _json({"machine": msgspec.to_builtins(m), **gens_json(record)})

    @app.put("/machines/{ref}")
    async def put_machine(ref: str, request: Request) -> Response:
        authorize(request)
        try:
            mac = subjects.normalize_mac(ref)
        except InvalidMac:
            mac = (await resolve(ref)).mac
        machine: Machine = _decode(await request.body(), Machine)
        if machine.mac != mac:
            raise ApiError(422, f"body MAC {machine.mac} differs from the URL's {mac}")
        await validate(machine)
        previous = await store.machine(machine.mac)
        await store.put_machine(machine)
        await build_if_new(machine, previous)
        return _json(machine)

    @app.delete("/machines/{ref}")
    async def delete_machine(ref: str, request: Request) -> Response:
        authorize(request)
        m = await resolve(ref)
        await store.delete_machine(m.mac)
        gcroots.remove_all(state_dir, mac_token(m.mac))
        return Response(status_code=204)

    @app.get("/machines/{ref}/generations")
    async def machine_generations(ref: str) -> Response:
        m = await resolve(ref)
        return _json(gens_json(await store.generations(mac_token(m.mac))))

    @app.post("/machines/{ref}/pin")
    async def pin(ref: str, request: Request) -> Response:
        authorize(request)
        body: PinBody = _decode(await request.body(), PinBody)
        m = await resolve(ref)
        key = mac_token(m.mac)
        if await store.generations(key) is None and body.number is not None:
            raise ApiError(404, f"machine {m.name} has no generations yet")
        try:
            record = await store.update_generations(
                key, m.mac, lambda r: generations.pin(r, body.number, body.once)
            )
        except generations.UnknownGeneration as e:
            raise ApiError(404, str(e)) from None
        if body.number is not None:
            await bus.publish(
                js, events.GenerationPinned(mac=m.mac, number=body.number, once=body.once)
            )
        return _json(gens_json(record))

    @app.post("/builds")
    async def builds(request: Request) -> Response:
        authorize(request)
        body: BuildBody = _decode(await request.body() or b"{}", BuildBody)
        if body.all == bool(body.machines):
            raise ApiError(422, 'give either "machines": [...] or "all": true')
        machines = await store.machines() if body.all else [await resolve(r) for r in body.machines]
        if not machines and not (body.all and fallback_attr):
            raise ApiError(404, "no machines registered")
        by_attr: dict[str, list[str]] = {}
        for m in machines:
            by_attr.setdefault(m.attr, []).append(m.name)
        if body.all and fallback_attr:
            by_attr.setdefault(fallback_attr, []).append("(unknown MACs)")
        since = time.time()
        out = []
        for attr, names in sorted(by_attr.items()):
            req = await request_build(js, attr, "manual")
            out.append({"build_id": req.build_id, "attr": attr, "machines": names})
        return _json({"builds": out, "since": since}, 202)

    @app.get("/builds/{build_id}/follow")
    async def follow(build_id: str, since: float = 0.0) -> StreamingResponse:
        if not build_id.isalnum():
            raise ApiError(422, "invalid build id")
        return StreamingResponse(
            _follow(nc, js, build_id, since or time.time() - 3600),
            media_type="application/x-ndjson",
        )


async def _follow(
    nc: Client, js: JetStreamContext, build_id: str, since: float
) -> AsyncIterator[bytes]:
    """Merge the build's JetStream events (reliable: progress, end) with its live log lines."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_log(msg: Any) -> None:
        record = wire.decode_log(msg.data)
        if record.kind == "line":
            await queue.put(msg.data + b"\n")

    async def on_event(msg: Any) -> None:
        with contextlib.suppress(events.BadEvent):
            ev = events.decode(msg.data)
            if getattr(ev, "build_id", None) != build_id:
                return
            if isinstance(ev, events.BuildProgress):
                rec = wire.LogRecord(
                    kind="progress", done=ev.done, expected=ev.expected, current=ev.current
                )
            elif isinstance(ev, events.BuildSucceeded):
                rec = wire.LogRecord(kind="end", ok=True, toplevel=ev.toplevel)
            elif isinstance(ev, events.BuildFailed):
                rec = wire.LogRecord(kind="end", ok=False, text=ev.error + "\n" + ev.log_tail)
            elif isinstance(ev, events.BuildStarted):
                rec = wire.LogRecord(kind="line", text=f"build started (flake {ev.flake_rev})")
            else:
                return
            await queue.put(wire.encode(rec) + b"\n")

    log_sub = await nc.subscribe(subjects.build_log_subject(build_id), cb=on_log)
    ev_sub = await js.subscribe(
        f"{subjects.PREFIX}.evt.>",
        cb=on_event,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since - 1, UTC),
        ),
    )
    try:
        while True:
            try:
                line = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                yield b"\n"  # keep-alive while nix works quietly
                continue
            yield line
            if b'"kind":"end"' in line:
                return
    finally:
        with contextlib.suppress(Exception):
            await log_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await ev_sub.unsubscribe()


async def flake_attrs(nix: Nix, flake: str) -> list[str] | None:
    """The flake's nixosConfigurations names, or None when the flake cannot be evaluated now."""
    try:
        return await nix.configuration_names(flake)
    except NixError:
        return None
