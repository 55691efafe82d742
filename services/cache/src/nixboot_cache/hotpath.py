"""A raw ASGI front for the requests a booting machine makes by the dozen: GET and HEAD of
``/nix-cache-info``, ``/<hash>.narinfo``, ``/nar/<name>`` and ``/boot/<toplevel>/<kernel|initrd>``.

Why: profiled under a storm (py-spy, bench/cache_hotpath.py), about half of the cache's Python
time per request was FastAPI/Starlette's stack around the handler — seven middleware layers,
the router trying each route's regex in turn, a ``Request`` object, dependency solving — for
answers that are a dict lookup and a memoised text. Here a path is recognised by plain string
tests and the same answer functions as the FastAPI routes (``nixboot_cache.service.answer_*``)
make the same Starlette ``Response``, sent the same way: every byte and header is unchanged, and
the request is counted in ``nixboot_http_requests_total`` / ``nixboot_http_request_seconds`` under
the same route pattern as the router would give it.

Everything else (other paths, other methods, a ``root_path``, lifespan) goes to the FastAPI app
untouched, and the routes stay registered there: the OpenAPI schema does not change. A path this
front does not recognise exactly — one Starlette's router might still match (its ``$`` also
matches before a trailing newline, say) — is the app's to answer, never a different answer here.
"""

from __future__ import annotations

import logging
import time

from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nixboot_cache.service import (
    CacheService,
    answer_boot_file,
    answer_cache_info,
    answer_nar,
    answer_narinfo,
)
from nixboot_shared.service import RequestMetrics

log = logging.getLogger(__name__)

# The route patterns the FastAPI routes carry (metrics label them by pattern).
CACHE_INFO = "/nix-cache-info"
NARINFO = "/{hash_part}.narinfo"
NAR = "/nar/{name}"
BOOT = "/boot/{toplevel_hash}/{which}"
_SUFFIX = ".narinfo"


class HotPath:
    def __init__(self, app: ASGIApp, svc: CacheService) -> None:
        self.app = app
        self.svc = svc
        self.metrics = RequestMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method != "GET" and method != "HEAD":  # 405s and POSTs: the router's answer
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # Exactly what Starlette's "[^/]+" parameters match, and nothing more.
        if path == CACHE_INFO:
            await self._answer(CACHE_INFO, method, scope, receive, send)
        elif path.endswith(_SUFFIX) and len(path) > 1 + len(_SUFFIX) and path.count("/") == 1:
            await self._answer(NARINFO, method, scope, receive, send, path[1 : -len(_SUFFIX)])
        elif path.startswith("/nar/") and len(path) > 5 and path.count("/") == 2:
            await self._answer(NAR, method, scope, receive, send, path[5:])
        elif path.startswith("/boot/") and path.count("/") == 3:
            top, _, which = path[6:].partition("/")
            if top and which:
                await self._answer(BOOT, method, scope, receive, send, top, which)
            else:
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _answer(
        self,
        route: str,
        method: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        *params: str,
    ) -> None:
        started = time.perf_counter()
        status = 500
        sent = False

        async def send_status(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = True
            await send(message)

        svc = self.svc
        try:
            if route is NARINFO:
                response = await answer_narinfo(svc, params[0])
            elif route is NAR:
                response = answer_nar(svc, params[0], method)
            elif route is BOOT:
                client = scope.get("client")
                response = await answer_boot_file(
                    svc,
                    params[0],
                    params[1],
                    method=method,
                    ranged=any(k == b"range" for k, _ in scope["headers"]),
                    client=client[0] if client else "",
                )
            else:
                response = answer_cache_info()
            await response(scope, receive, send_status)
        except Exception:
            # What Starlette's ServerErrorMiddleware answers (debug off), then the server logs it.
            if not sent:
                await PlainTextResponse("Internal Server Error", status_code=500)(
                    scope, receive, send_status
                )
            raise
        finally:
            self.metrics.record(route, method, status, started)
