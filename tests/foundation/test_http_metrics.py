"""The service frame's HTTP request metrics: route patterns (never paths), status, method."""

from __future__ import annotations

import httpx
from fastapi import Request, Response
from prometheus_client import REGISTRY

from nixboot_shared.service import base_app


def count(route: str, method: str, status: str) -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("nixboot_http_requests_total", labels) or 0.0


def seconds_count(route: str) -> float:
    return REGISTRY.get_sample_value("nixboot_http_request_seconds_count", {"route": route}) or 0.0


async def test_requests_are_counted_by_route_pattern_and_status() -> None:
    app = base_app("metrics-test", None)

    @app.get("/things/{name}")
    async def thing(name: str) -> Response:
        return Response(name, status_code=404 if name == "missing" else 200)

    async def plain(request: Request) -> Response:  # a Starlette route, as the cache's narinfo
        return Response("x")

    app.add_route("/{hash_part}.narinfo", plain, methods=["GET"])

    @app.get("/boom")
    async def boom() -> Response:
        raise RuntimeError("handler bug")

    before = {
        k: count(*k)
        for k in [
            ("/things/{name}", "GET", "200"),
            ("/things/{name}", "GET", "404"),
            ("unmatched", "GET", "404"),
            ("/boom", "GET", "500"),
            ("/healthz", "GET", "503"),
            ("/things/{name}", "other", "405"),
            ("/{hash_part}.narinfo", "GET", "200"),
        ]
    }
    seconds_before = seconds_count("/things/{name}")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        for name in ("a", "b", "c/d", "missing"):
            await http.get(f"/things/{name}")
        assert (await http.get("/no/such/path/abc")).status_code == 404
        assert (await http.get("/boom")).status_code == 500
        assert (await http.get("/abc.narinfo")).status_code == 200
        assert (await http.get("/healthz")).status_code == 503  # no NATS in this app
        assert (await http.request("BREW", "/things/x")).status_code == 405
    after = {k: count(*k) for k in before}
    delta = {k: after[k] - before[k] for k in before}
    assert delta == {
        ("/things/{name}", "GET", "200"): 2,  # "c/d" does not match the pattern
        ("/things/{name}", "GET", "404"): 1,
        ("unmatched", "GET", "404"): 2,
        ("/boom", "GET", "500"): 1,
        ("/healthz", "GET", "503"): 1,
        ("/things/{name}", "other", "405"): 1,
        ("/{hash_part}.narinfo", "GET", "200"): 1,
    }
    assert seconds_count("/things/{name}") - seconds_before == 4
    # No label value carries a path or a name that came from the client.
    for metric in REGISTRY.collect():
        if metric.name == "nixboot_http_requests":
            for sample in metric.samples:
                assert "abc" not in sample.labels.get("route", "")
                assert sample.labels.get("route") != "/things/a"
