"""The raw ASGI front (nixboot_cache.hotpath) answers exactly as the FastAPI routes behind it:
the same requests to the front and to the bare app give the same status, headers and body, the
hot routes never reach the app while everything else does, and the HTTP metrics are counted
under the same route patterns. In process over the real Nix store of the fixture closures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from nixboot_cache.hotpath import HotPath
from nixboot_cache.service import CacheService, add_routes
from nixboot_shared import menu, subjects
from nixboot_shared.config import load
from nixboot_shared.records import MachineGenerations
from nixboot_shared.service import base_app
from tests.cache.cache_helpers import NixFixture
from tests.cache.test_service import MAC, generation


class Counting:
    """The app behind the front, counting the requests that reach it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


def http_count(route: str, method: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "nixboot_http_requests_total", {"route": route, "method": method, "status": str(status)}
    )
    return value or 0.0


async def test_front_answers_like_the_app(nixfx: NixFixture, tmp_path: Path) -> None:
    cfg = load(environ={"NIXBOOT_STATE_DIR": str(tmp_path / "state")})
    svc = CacheService(cfg)
    gen = generation(nixfx.gen1.toplevel, nixfx.gen1.kernel, nixfx.gen1.initrd, 1)
    svc.gens.by_mac[subjects.mac_token(MAC)] = MachineGenerations(mac=MAC, generations=[gen])
    app = base_app("cache", None)
    add_routes(app, svc)
    inner = Counting(app)
    front = HotPath(inner, svc)

    top = menu.store_hash(nixfx.gen1.toplevel)
    hashes = [menu.store_hash(p) for p in nixfx.gen1.store_paths]
    bare = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    fronted = httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://t")
    async with bare, fronted:
        for h in hashes:  # start every compression, then wait for them
            await fronted.get(f"/{h}.narinfo")
        nar_urls = []
        for h in hashes:
            for _ in range(200):
                text = (await fronted.get(f"/{h}.narinfo")).text
                if "FileSize:" in text:
                    break
                await asyncio.sleep(0.05)
            nar_urls.append("/" + text.split("URL: ")[1].split()[0])
        hot = ["/nix-cache-info", *(f"/{h}.narinfo" for h in hashes), *nar_urls]
        hot += [f"/boot/{top}/kernel", f"/boot/{top}/initrd", "/" + "e" * 32 + ".narinfo",
                "/" + "0" * 32 + ".narinfo", "/x.narinfo", "/nar/x",
                "/nar/" + "0" * 52 + ".nar.zst", "/boot/x/kernel", f"/boot/{top}/etc",
                "/boot/" + "0" * 32 + "/kernel"]  # fmt: skip
        ranges = [None, "bytes=0-9", "bytes=5-2", "bytes=99999999999-", "bytes=abc"]
        inner.paths.clear()
        before = http_count("/nar/{name}", "GET", 206)
        for path in hot:
            for method in ("GET", "HEAD"):
                for rng in ranges if path.startswith(("/nar/", "/boot/")) else [None]:
                    headers = {"Range": rng} if rng else {}
                    a = await bare.request(method, path, headers=headers)
                    b = await fronted.request(method, path, headers=headers)
                    assert (a.status_code, a.headers.multi_items(), a.content) == (
                        b.status_code,
                        b.headers.multi_items(),
                        b.content,
                    ), (method, path, rng)
        assert inner.paths == []  # every one answered by the front
        # The front counted its 206s under the router's pattern, as the app did its own.
        assert http_count("/nar/{name}", "GET", 206) - before == 2 * len(nar_urls)

        cold = ["/nix-cache-info/", "/.narinfo", "/a/b.narinfo", "/nar/", "/nar/a/b", "/boot/a/",
                "/boot/a/b/c", "/healthz", "/nope", f"/{hashes[0]}.narinfo/"]  # fmt: skip
        for path in cold:
            a, b = await bare.get(path), await fronted.get(path)
            assert (a.status_code, a.content) == (b.status_code, b.content), path
        for method in ("POST", "PUT", "DELETE"):
            a = await bare.request(method, "/nix-cache-info")
            b = await fronted.request(method, "/nix-cache-info")
            assert a.status_code == b.status_code == 405
        assert len(inner.paths) == len(cold) + 3  # all of them went to the app
    svc.executor.shutdown(wait=True)
