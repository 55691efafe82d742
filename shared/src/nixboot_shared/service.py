"""The frame every nixboot service runs in: config, logging, NATS, bootstrap, and an HTTP server
with ``/healthz`` and ``/metrics``. A service supplies only ``setup`` (routes, consumers, tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Response
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nixboot_shared import bus, metrics, replay, subjects
from nixboot_shared.config import Config, HttpListen

log = logging.getLogger(__name__)


@dataclass
class ServiceContext:
    name: str
    cfg: Config
    nc: Client
    js: JetStreamContext
    kv: dict[str, KeyValue]
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    # Called in reverse order at shutdown (close sockets, stop threads).
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What the HTTP server runs instead of the FastAPI app, if set: a raw ASGI front that
    # answers a service's hottest routes itself and hands everything else to the app.
    front: ASGIApp | None = None

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        self.tasks.append(asyncio.ensure_future(coro))
        self.tasks[-1].set_name(f"{self.name}:{name}")


Setup = Callable[[ServiceContext, FastAPI], Awaitable[None]]


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class RequestMetrics:
    """``nixboot_http_requests_total`` and ``nixboot_http_request_seconds`` for one answered
    request, by route pattern, method and status. Shared by ``HttpMetrics`` and any raw ASGI
    front a service puts before its app (the cache's hot path), so both count alike."""

    def __init__(self) -> None:
        # prometheus_client's labels() costs ~2 µs per call: keep the children per label set.
        # (Keyed by the raw request: 0.2 µs less per request than metrics.labelled on the
        # normalized labels, and this runs for every request of the cache's hot path.)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, route: str, method: str, status: int, started: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # bounded: routes x methods x statuses
            m = method if method in METHODS else "other"
            children = (
                metrics.HTTP_REQUESTS.labels(route, m, str(status)),
                metrics.HTTP_SECONDS.labels(route),
            )
            if m == method:
                self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


class HttpMetrics:
    """Pure ASGI middleware counting requests by route pattern, method and status (bounded
    labels: the router's pattern, never the path). Pure ASGI rather than BaseHTTPMiddleware:
    no extra task per request on the cache's narinfo path."""

    def __init__(self, app: ASGIApp, routes: Callable[[], list[Any]] = list) -> None:
        self.app = app
        self.routes = routes  # the application's routes, for plain Starlette routes
        self._by_endpoint: dict[Any, str] = {}
        self.recorder = RequestMetrics()

    def pattern(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)  # set by FastAPI's routes
        if path:
            return str(path)
        endpoint = scope.get("endpoint")  # a plain Starlette route sets only its endpoint
        if endpoint is None:
            return "unmatched"
        if endpoint not in self._by_endpoint:
            for r in self.routes():
                if getattr(r, "endpoint", None) is not None and hasattr(r, "path"):
                    self._by_endpoint[r.endpoint] = r.path
        return self._by_endpoint.get(endpoint, "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # the app raised before answering: the server sends a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router stores the match in the (shared) scope.
            self.recorder.record(self.pattern(scope), scope.get("method", ""), status, started)


def base_app(name: str, nc: Client | None) -> FastAPI:
    app = FastAPI(title=f"nixboot {name}")
    app.add_middleware(HttpMetrics, routes=lambda: app.routes)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        ok = nc is not None and nc.is_connected
        body = f'{{"service":"{name}","nats":{"true" if ok else "false"}}}'
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics_route() -> Response:
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    return app


class NoNatsConfigured(RuntimeError):
    pass


class ServerFailed(RuntimeError):
    """The service's HTTP server stopped on its own (e.g. its port is taken)."""


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service frame owns SIGTERM/SIGINT and shuts
    down NATS consumers and threads in order (uvicorn would re-raise the signal afterwards)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# Capped by the kernel's net.core.somaxconn (4096 on Debian 12).
LISTEN_BACKLOG = 4096
MAX_CONNECTIONS = 16384


def _http_server(
    app: ASGIApp, listen: HttpListen, sock: socket.socket | None = None
) -> tuple[Awaitable[Any], Callable[[], None]]:
    """The HTTP server coroutine and its stop function. granian runs embedded in this event
    loop (its Rust side does the socket work, and file responses go out by ``pathsend``).
    ``sock``: an already bound socket (uvicorn only; replay mode's ephemeral port)."""
    if listen.server == "granian" and sock is None:
        from granian.constants import Interfaces
        from granian.log import LogLevels
        from granian.server.embed import Server as GranianServer

        granian = GranianServer(
            app,
            address=listen.host,
            port=listen.port,
            interface=Interfaces.ASGINL,
            websockets=False,
            log_level=LogLevels.warning,
            # A classroom at 08:00 opens up to 25 connections per machine at once (nix's
            # http-connections). granian's default backlog of 128 drops SYNs beyond it, and the
            # kernel's SYN retries (1, 3, 7, 15 s …) then stall whole boots for ~30 s.
            backlog=LISTEN_BACKLOG,
            # granian's backpressure (default backlog / workers) caps open connections, idle
            # keep-alive ones included: 200 machines x 25 nix connections must all fit.
            backpressure=MAX_CONNECTIONS,
        )
        return granian.serve(), granian.stop
    server = _QuietServer(
        uvicorn.Config(
            app,
            host=listen.host,
            port=listen.port,
            log_level="warning",
            lifespan="off",
            backlog=LISTEN_BACKLOG,
        )
    )

    def stop() -> None:
        server.should_exit = True

    return server.serve(sockets=[sock] if sock is not None else None), stop


def _bind_ephemeral(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


async def _serve(name: str, cfg: Config, listen: HttpListen, setup: Setup) -> None:
    if cfg.replay_prefix:
        replay.check_prepared(cfg)
    if not cfg.nats.url:
        raise NoNatsConfigured(
            "no NATS URL configured (nats.url / NIXBOOT_NATS__URL): start the whole stack with "
            "`nixboot up`, which runs an embedded NATS, or point the service at your NATS"
        )
    nc = await bus.connect(cfg.nats.url, f"nixboot-{name}", settings=cfg.nats)
    replay_bus: replay.ReplayBus | None = None
    sock: socket.socket | None = None
    if cfg.replay_prefix:
        replay_bus = await replay.open_bus(nc, cfg.replay_prefix, name)
        ctx = ServiceContext(
            name=name, cfg=cfg, nc=replay_bus.nc, js=replay_bus.js, kv=replay_bus.kv
        )
        # Never the live service's port: an ephemeral one on loopback, printed below.
        listen = msgspec.structs.replace(listen, host="127.0.0.1", port=0, server="uvicorn")
        sock = _bind_ephemeral(listen.host)
    else:
        js = nc.jetstream()
        kv = await bus.bootstrap(js, cfg.nats.replicas)
        ctx = ServiceContext(name=name, cfg=cfg, nc=nc, js=js, kv=kv)
    app = base_app(name, ctx.nc)
    try:
        await setup(ctx, app)
    except BaseException:
        if replay_bus is not None:
            await replay_bus.close()
        raise
    serve, stop_server = _http_server(ctx.front if ctx.front is not None else app, listen, sock)
    # Everything made so far (modules, the app, routes, clients) lives as long as the service:
    # out of the collector's sight. A full collection otherwise walked it all and stopped every
    # thread for 33-73 ms several times per storm (measured in the cache, bench/storm N = 50),
    # which was the lease → warm started p99 and a stall for every request in flight.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve_task = asyncio.ensure_future(serve)
    port = sock.getsockname()[1] if sock is not None else listen.port
    log.info("%s: http (%s) on %s:%d", name, listen.server, listen.host, port)
    if replay_bus is not None:
        prefix = cfg.replay_prefix
        log.warning(
            "%s: REPLAY MODE: consuming %s.%s (core NATS, no durables); publishing to "
            "%s.<subject>, never the live subjects or stream; KV copies %s (deleted at exit); "
            "state dir %s; "
            "http on 127.0.0.1:%d",
            name, prefix, subjects.EVENTS_SUBJECTS, prefix,
            replay.bucket_copy(prefix, name, "<bucket>"), cfg.state_dir, port,
        )  # fmt: skip
    done_waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([serve_task, done_waiter], return_when=asyncio.FIRST_COMPLETED)
    stop_server()
    # The HTTP server ending by itself means it failed (a port in use, say): say so, exit non-zero.
    failure: BaseException | None = None
    if not done_waiter.done():
        failure = serve_task.exception() or RuntimeError("the HTTP server stopped")
    done_waiter.cancel()
    with contextlib.suppress(Exception):
        await serve_task
    for cleanup in reversed(ctx.cleanups):
        with contextlib.suppress(Exception):
            await cleanup()
    for task in ctx.tasks:
        task.cancel()
    await asyncio.gather(*ctx.tasks, return_exceptions=True)
    if replay_bus is not None:
        await replay_bus.close()
    # A pull subscription left mid-fetch can hold drain for nats-py's 30 s timeout: bound it.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), 5)
    if failure is not None:
        raise ServerFailed(f"http on {listen.host}:{listen.port}: {failure}")
    log.info("%s: stopped", name)


def run(name: str, cfg: Config, listen: HttpListen, setup: Setup) -> int:
    """Run a service until SIGTERM/SIGINT; return the process exit code."""
    setup_logging(cfg.log_level, name)
    try:
        asyncio.run(_serve(name, cfg, listen, setup))
    except (NoNatsConfigured, replay.NotPrepared) as e:
        log.error("%s", e)
        return 2
    except ServerFailed as e:
        log.error("%s: %s", name, e)
        return 1
    except bus.NatsRefused as e:
        log.error("%s: %s", name, e)
        return 1
    except OSError as e:
        log.error("%s: %s", name, e)
        return 1
    return 0
