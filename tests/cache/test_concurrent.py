"""Real nix clients against the cache while it warms, and eviction under a small bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import msgspec
import nats

from nixboot_cache import narinfo
from nixboot_shared import bus, events, menu, subjects
from nixboot_shared.records import MachineGenerations
from tests.cache.cache_helpers import CacheServer, NixFixture, start_cache, stop_cache
from tests.cache.test_service import MAC, generation, wait_for
from tests.cache.test_substitute import substitute


async def test_two_clients_during_warm(
    nixfx: NixFixture, cache_server: CacheServer, nats_url: str, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    kv = (await bus.bootstrap(js))[subjects.KV_GENERATIONS]
    g = nixfx.gen1
    mg = MachineGenerations(mac=MAC, generations=[generation(g.toplevel, g.kernel, g.initrd, 1)])
    await kv.put(subjects.mac_token(MAC), msgspec.json.encode(mg))
    await bus.publish(js, events.LeaseSeen(mac=MAC, ip="10.0.0.9"))
    # Two machines substitute at once while the warm runs: every path is either cold
    # (streamed while compressed), in flight (joined) or warm.
    await asyncio.gather(
        *(
            asyncio.to_thread(
                substitute, nixfx, cache_server, tmp_path / r, tmp_path / x, g.toplevel
            )
            for r, x in (("r1", "x1"), ("r2", "x2"))
        )
    )
    assert cache_server.metric("nixboot_cache_nar_served_total") == 2 * len(g.paths)
    # Each NAR was compressed once however many asked for it.
    assert cache_server.metric("nixboot_cache_compressed_total") == len(g.paths)
    await nc.drain()


async def test_eviction_spares_pinned_generation(
    nixfx: NixFixture, nats_url: str, tmp_path: Path
) -> None:
    gen2_only = set(nixfx.gen2.store_paths) - set(nixfx.gen1.store_paths)
    gen1_only = set(nixfx.gen1.store_paths) - set(nixfx.gen2.store_paths)
    server = start_cache(
        tmp_path / "state",
        nats_url,
        max_bytes=10_000,
        extra_env={"NIXBOOT_CACHE__EVICT_GRACE_SECONDS": "0"},
    )
    try:
        nc = await nats.connect(nats_url)
        kv = (await bus.bootstrap(nc.jetstream()))[subjects.KV_GENERATIONS]
        g = nixfx.gen2
        mg = MachineGenerations(
            mac=MAC, generations=[generation(g.toplevel, g.kernel, g.initrd, 2)]
        )
        await kv.put(subjects.mac_token(MAC), msgspec.json.encode(mg))
        await nc.drain()
        # The service's KV watch has generation 2 (else it would not be protected): its boot
        # files are found by toplevel hash only from then on (404 before).
        kernel = f"{server.url}/boot/{menu.store_hash(g.toplevel)}/kernel"
        await wait_for(lambda: httpx.head(kernel).status_code == 200)
        await asyncio.to_thread(
            substitute, nixfx, server, tmp_path / "r1", tmp_path / "x1", g.toplevel
        )
        await asyncio.to_thread(
            substitute, nixfx, server, tmp_path / "r2", tmp_path / "x2", nixfx.gen1.toplevel
        )
        nar_dir = server.state / "cache" / "nar"
        on_disk = {p.name.removesuffix(".nar.zst") for p in nar_dir.glob("*.nar.zst")}

        def nar_hash(path: str) -> str:
            info = next(p for p in nixfx.gen1.paths + nixfx.gen2.paths if p["path"] == path)
            return narinfo.sha256_to_nix32(str(info["narHash"])).removeprefix("sha256:")

        # Generation 2's closure is protected though far over the bound; gen 1's own paths went.
        assert {nar_hash(p) for p in g.store_paths} <= on_disk
        assert not {nar_hash(p) for p in gen1_only} & on_disk
        assert server.metric("nixboot_cache_evicted_total") >= len(gen1_only)
        assert gen2_only
    finally:
        stop_cache(server)
