"""The cache service over HTTP and NATS: warming, boot files, menus, reports, bad input."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
import zstandard
from nats.aio.client import Client

from nixboot_cache import narinfo, signing
from nixboot_shared import bus, events, menu, security, subjects
from nixboot_shared.records import Generation, MachineGenerations
from tests.cache.cache_helpers import CacheServer, NixFixture, start_cache, stop_cache

MAC = "52:54:00:12:34:56"
SENTINEL = "52:54:00:12:34:57"  # a second machine whose menu shows the watch caught up


def generation(closure_top: str, kernel: str, initrd: str, number: int) -> Generation:
    return Generation(
        number=number,
        toplevel=closure_top,
        kernel=f"{kernel}/bzImage",
        initrd=f"{initrd}/initrd",
        kernel_params="loglevel=4",
        init=f"{closure_top}/init",
    )


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def put_generations(nc: Client, nixfx: NixFixture, pinned: int | None = None) -> None:
    js = nc.jetstream()
    kv = (await bus.bootstrap(js))[subjects.KV_GENERATIONS]
    g1, g2 = nixfx.gen1, nixfx.gen2
    mg = MachineGenerations(
        mac=MAC,
        generations=[
            generation(g1.toplevel, g1.kernel, g1.initrd, 1),
            generation(g2.toplevel, g2.kernel, g2.initrd, 2),
        ],
        pinned=pinned,
    )
    await kv.put(subjects.mac_token(MAC), msgspec.json.encode(mg))


async def collect(nc: Client, kind: str) -> tuple[list[events.AnyEvent], object]:
    got: list[events.AnyEvent] = []

    async def cb(msg: object) -> None:
        got.append(events.decode(msg.data))  # type: ignore[attr-defined]

    sub = await nc.subscribe(f"nixboot.evt.{kind}.>", cb=cb)
    return got, sub


async def wait_for(pred: object, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


async def test_lease_warms_once_and_serves_boot(
    nixfx: NixFixture, cache_server: CacheServer, nc: Client
) -> None:
    await put_generations(nc, nixfx, pinned=1)
    started, s1 = await collect(nc, "warm-started")
    finished, s2 = await collect(nc, "warm-finished")
    stages, s3 = await collect(nc, "stage")
    boot_files, s4 = await collect(nc, "boot-file")
    menus, s5 = await collect(nc, "menu")
    js = nc.jetstream()
    leases = (await bus.bootstrap(js))[subjects.KV_LEASES]
    await leases.put(subjects.ip_key("127.0.0.1"), subjects.mac_token(MAC).encode())
    # A classroom: the same machine's lease five times at once (and a release, ignored).
    for _ in range(5):
        await bus.publish(js, events.LeaseSeen(mac=MAC, ip="10.0.0.5"))
    # default (pinned gen 1) and newest (gen 2): two toplevels, one warm each.
    await wait_for(lambda: len(finished) >= 2)
    await asyncio.sleep(0.5)
    assert sorted(e.toplevel for e in started) == sorted([nixfx.gen1.toplevel, nixfx.gen2.toplevel])  # type: ignore[union-attr]
    assert len(finished) == 2
    # The leases were taken on the cache's lease thread and handed to its main loop: the five
    # non-release leases, each decided there and handed over once (the warms joined).
    assert cache_server.metric("nixboot_cache_lease_handoff_seconds_count") == 5
    f1 = next(e for e in finished if e.toplevel == nixfx.gen1.toplevel)  # type: ignore[union-attr]
    assert f1.paths == len(nixfx.gen1.paths)  # type: ignore[union-attr]
    assert f1.bytes == sum(int(p["narSize"]) for p in nixfx.gen1.paths)  # type: ignore[union-attr, call-overload]
    nars = list((cache_server.state / "cache" / "nar").glob("*.nar.zst"))
    assert len(nars) == len(set(nixfx.gen1.store_paths) | set(nixfx.gen2.store_paths))

    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        # Warm narinfo: FileHash/FileSize present, signature valid for our public key.
        h = narinfo.store_hash(nixfx.gen1.toplevel)
        r = await http.get(f"/{h}.narinfo")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/x-nix-narinfo")
        ni = narinfo.parse(r.text)
        assert ni.file_hash.startswith("sha256:") and ni.file_size > 0
        pub = signing.PublicKey.parse(cache_server.public_key())
        assert pub.verify(signing.narinfo_fingerprint(ni), ni.sigs[0])

        # Boot files with Range and HEAD.
        top = menu.store_hash(nixfx.gen1.toplevel)
        kernel = (Path(nixfx.gen1.kernel) / "bzImage").read_bytes()
        r = await http.get(f"/boot/{top}/kernel")
        assert r.status_code == 200 and r.content == kernel
        r = await http.get(f"/boot/{top}/initrd", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.content == (Path(nixfx.gen1.initrd) / "initrd").read_bytes()[10:20]
        r = await http.head(f"/boot/{top}/kernel")
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(kernel)
        assert r.headers.get("accept-ranges") == "bytes"
        # One event for the whole-file GET (none for the Range request or the HEAD).
        await wait_for(lambda: len(boot_files) >= 1)
        await asyncio.sleep(0.3)
        assert len(boot_files) == 1
        bf = boot_files[0]
        assert isinstance(bf, events.BootFileRequested)
        assert (bf.mac, bf.file_kind, bf.protocol, bf.bytes) == (MAC, "kernel", "http", len(kernel))
        assert bf.file == f"boot/{top}/kernel" and bf.seconds >= 0

        # iPXE chain and per-MAC menu: pinned gen 1 is the default, newest listed first.
        r = await http.get("/boot.ipxe")
        assert r.text.startswith("#!ipxe") and f"{cache_server.url}/ipxe/" in r.text
        r = await http.get(f"/ipxe/{MAC.replace(':', '-')}")
        assert r.status_code == 200
        assert "choose --default gen-1" in r.text
        assert r.text.index(":gen-2") < r.text.index(":gen-1")
        assert f"nixboot.key={cache_server.public_key()}" in r.text
        boot_id = r.text.split("nixboot.boot_id=")[1].split()[0]
        token = r.text.split("nixboot.token=")[1].split()[0]
        await wait_for(lambda: len(menus) >= 1)
        m = menus[0]
        assert isinstance(m, events.MenuServed)
        assert (m.mac, m.boot_id, m.format, m.default_generation, m.generations, m.fallback) == (
            MAC,
            boot_id,
            "ipxe",
            1,
            [2, 1],
            False,
        )

        # Stage reports: the menu's token works (body or header); a forged one is refused.
        r = await http.post(f"/report/{boot_id}", json={"stage": "closure", "status": "done",
                            "bytes": 123, "seconds": 1.5, "mac": MAC, "token": token})  # fmt: skip
        assert r.status_code == 204
        r = await http.post(f"/report/{boot_id}", json={"stage": "booted"},
                            headers={"X-Nixboot-Token": token})  # fmt: skip
        assert r.status_code == 204
        forged = security.boot_token("not-the-secret", boot_id)
        r = await http.post(f"/report/{boot_id}", json={"stage": "booted", "token": forged})
        assert r.status_code == 403
        r = await http.post(
            f"/report/{security.new_boot_id()}", json={"stage": "booted", "token": token}
        )
        assert r.status_code == 403
        await wait_for(lambda: len(stages) >= 2)
        await asyncio.sleep(0.2)
        assert [(e.stage, e.boot_id) for e in stages] == [("closure", boot_id), ("booted", boot_id)]  # type: ignore[union-attr]
        assert stages[0].bytes == 123 and stages[0].mac == MAC  # type: ignore[union-attr]
    assert cache_server.metric("nixboot_cache_forged_reports_total") == 2
    for s in (s1, s2, s3, s4, s5):
        await s.unsubscribe()  # type: ignore[attr-defined]


async def test_ipxe_menu_spends_the_one_shot_pin_it_makes_default(
    nixfx: NixFixture, cache_server: CacheServer, nc: Client
) -> None:
    """The one rule (nixboot_shared.pins): the pin is spent when a menu that makes it the
    default is served, whatever the boot does next; HEAD serves no menu and spends nothing."""
    js = nc.jetstream()
    kv = (await bus.bootstrap(js))[subjects.KV_GENERATIONS]
    await put_generations(nc, nixfx)

    async def next_boot() -> int | None:
        e = await kv.get(subjects.mac_token(MAC))
        assert e.value is not None
        return msgspec.json.decode(e.value, type=MachineGenerations).next_boot

    async def menu_default(http: httpx.AsyncClient) -> str:
        r = await http.get(f"/ipxe/{MAC}")
        assert r.status_code == 200
        return r.text.split("choose --default ")[1].split()[0]

    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        for _ in range(100):  # until the service's KV watch has the generations
            if await menu_default(http) == "gen-2":
                break
            await asyncio.sleep(0.05)
        entry = await kv.get(subjects.mac_token(MAC))
        assert entry.value is not None
        rec = msgspec.json.decode(entry.value, type=MachineGenerations)
        rec.next_boot = 1
        await kv.put(subjects.mac_token(MAC), msgspec.json.encode(rec))
        # Rendering MAC's menu to see the pin arrive would spend it. The watch applies the
        # bucket's entries in stream order: once a record put after the pin shows in another
        # machine's menu, the pin is in the cache's view.
        g1 = nixfx.gen1
        sentinel = MachineGenerations(
            mac=SENTINEL, generations=[generation(g1.toplevel, g1.kernel, g1.initrd, 1)]
        )
        await kv.put(subjects.mac_token(SENTINEL), msgspec.json.encode(sentinel))
        await _unknown_menu(http, "gen-1", timeout=20.0, mac=SENTINEL)
        r = await http.head(f"/ipxe/{MAC}")
        assert r.status_code == 200
        assert await next_boot() == 1  # HEAD served no menu: nothing spent
        assert await menu_default(http) == "gen-1"
        assert await next_boot() is None  # spent with the menu, before any report
        assert await menu_default(http) == "gen-2"
    assert cache_server.metric("nixboot_cache_one_shot_consumed_total") >= 1


async def test_cold_nar_two_clients_and_truncation(
    nixfx: NixFixture, cache_server: CacheServer
) -> None:
    lib = next(p for p in nixfx.gen1.store_paths if p.endswith("-nb-lib"))
    dump = subprocess.run(["nix-store", "--dump", lib], check=True, capture_output=True).stdout
    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        r = await http.get(f"/{narinfo.store_hash(lib)}.narinfo")
        cold = narinfo.parse(r.text)
        assert cold.url.startswith("nar/") and cold.compression == "zstd"
        a, b = await asyncio.gather(http.get("/" + cold.url), http.get("/" + cold.url))
        for resp in (a, b):
            assert resp.status_code == 200
            assert zstandard.ZstdDecompressor().decompressobj().decompress(resp.content) == dump
        # Truncate the file in the cache directory: detected, rebuilt, never served short.
        f = cache_server.state / "cache" / cold.url
        # Its sidecar (renamed in after the NAR) holds the size the truncation is checked against.
        sidecar = (
            cache_server.state / "cache" / "meta" / (f.name.removesuffix(".nar.zst") + ".json")
        )
        await wait_for(lambda: f.exists() and sidecar.exists())
        good = f.read_bytes()
        f.write_bytes(good[: len(good) // 3])
        r = await http.get("/" + cold.url)
        assert r.status_code == 200 and r.content == good
        assert cache_server.metric("nixboot_cache_truncated_rebuilt_total") == 1


BAD_GETS = [
    ("/" + "e" * 32 + ".narinfo", 400),  # 'e' is not in the nix32 alphabet
    ("/abc.narinfo", 400),
    ("/" + "0" * 32 + ".narinfo", 404),
    ("/nar/" + "0" * 52 + ".nar.zst", 404),
    ("/nar/" + "0" * 51 + ".nar.zst", 400),
    ("/nar/..%2F..%2Fetc%2Fpasswd", 404),  # decoded to a path no route matches
    ("/nar/x.nar.zst", 400),
    ("/log/not-a-drv", 400),
    ("/log/" + "0" * 32 + "-x.drv", 404),
    ("/boot/" + "0" * 32 + "/kernel", 404),
    ("/boot/" + "0" * 32 + "/etc", 400),
    ("/ipxe/zz-zz", 400),
]


async def test_bad_input(cache_server: CacheServer) -> None:
    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        for path, status in BAD_GETS:
            for method in ("GET", "HEAD"):
                r = await http.request(method, path)
                assert r.status_code == status, (method, path, r.text)


async def test_raw_traversal_huge_range_and_head(
    nixfx: NixFixture, cache_server: CacheServer, nc: Client
) -> None:
    await put_generations(nc, nixfx)
    top = menu.store_hash(nixfx.gen1.toplevel)
    await wait_for(lambda: _get(cache_server, f"/boot/{top}/kernel").status_code == 200)
    for raw in (
        "/nar/../../etc/passwd",
        "/boot/../../../etc/passwd",
        "/nar/%2e%2e/%2e%2e/etc/passwd",
    ):
        out = subprocess.run(
            ["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}",
             cache_server.url + raw],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert out in ("400", "404"), (raw, out)
    kernel = (Path(nixfx.gen1.kernel) / "bzImage").read_bytes()
    async with httpx.AsyncClient(base_url=cache_server.url) as http:
        for rng in ("bytes=99999999999999999999-", "bytes=0-99999999999999999999999999",
                    "bytes=5-1", "bytes=abc", "bytes=" + ",".join(["0-1"] * 2000)):  # fmt: skip
            r = await http.get(f"/boot/{top}/kernel", headers={"Range": rng})
            assert r.status_code < 500, (rng, r.status_code)
            assert r.status_code in (200, 206, 400, 416), (rng, r.status_code)
            if r.status_code == 206 and "," not in rng:
                assert r.content == kernel[int(rng[6:].split("-")[0]) :]
        narinfo_url = f"/{narinfo.store_hash(nixfx.gen1.toplevel)}.narinfo"
        for path in ("/nix-cache-info", "/boot.ipxe", f"/boot/{top}/initrd", "/healthz",
                     "/metrics", narinfo_url, "/ipxe/" + MAC):  # fmt: skip
            g, h = await http.get(path), await http.head(path)
            assert g.status_code == h.status_code == 200, path
            assert h.content == b""
        r = await http.post("/report/abc", content=b"{not json")
        assert r.status_code == 400
        r = await http.post("/report/zz", json={"stage": "booted"})
        assert r.status_code == 400
        r = await http.post("/report/abc", json={"stage": "nonsense", "token": "x"})
        assert r.status_code == 400


def _get(server: CacheServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path)


UNKNOWN = "52:54:00:99:00:07"


async def _unknown_menu(
    http: httpx.AsyncClient, want: str, timeout: float = 10.0, mac: str = UNKNOWN
) -> str:
    """The iPXE menu of ``mac`` (an unregistered one), once its default is ``want``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await http.get(f"/ipxe/{mac}")
        assert r.status_code == 200
        if f"choose --default {want} " in r.text:
            return r.text
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(r.text)
        await asyncio.sleep(0.05)


async def test_unknown_machine_gets_the_fallback_or_only_the_local_disk(
    nixfx: NixFixture, nats_url: str, nc: Client, tmp_path: Path
) -> None:
    """The builder keeps the fallback configuration's generations under the key
    ``subjects.FALLBACK_KEY``: with ``fallback_attr`` set, unregistered MACs get them (its pins
    never apply); without it, the local-disk entry only. (One cache at a time: they share the
    warming consumer.)"""
    kv = (await bus.bootstrap(nc.jetstream()))[subjects.KV_GENERATIONS]
    g1, g2 = nixfx.gen1, nixfx.gen2
    fb = MachineGenerations(
        mac=subjects.FALLBACK_KEY,
        generations=[
            generation(g1.toplevel, g1.kernel, g1.initrd, 1),
            generation(g2.toplevel, g2.kernel, g2.initrd, 2),
        ],
        next_boot=1,  # a stray pin on the record: not the fallback's business
    )
    await kv.put(subjects.FALLBACK_KEY, msgspec.json.encode(fb))
    await put_generations(nc, nixfx, pinned=1)
    menus, sub = await collect(nc, "menu")
    served = [0]  # menus the test was served: each publishes one MenuServed (maybe retried)

    async def count(r: httpx.Response) -> None:
        if r.request.method == "GET" and r.request.url.path.startswith("/ipxe/"):
            served[0] += r.status_code == 200

    def by(ms: list[events.AnyEvent]) -> list[tuple[object, ...]]:
        return [(m.mac, m.fallback, m.default_generation, m.generations) for m in ms]  # type: ignore[union-attr]

    async def all_published(*want: tuple[object, ...], since: int = 0) -> None:
        """Every menu served so far has its event (before the cache stops: no event is lost
        to the shutdown), and the wanted ones are among those since ``since``."""
        try:
            await wait_for(
                lambda: len(menus) >= served[0] and all(w in by(menus[since:]) for w in want)
            )
        except AssertionError:
            raise AssertionError((served[0], want, by(menus), since)) from None

    hooks = {"response": [count]}
    server = start_cache(tmp_path / "fb", nats_url, extra_env={"NIXBOOT_FALLBACK_ATTR": "demo"})
    try:
        async with httpx.AsyncClient(base_url=server.url, event_hooks=hooks) as http:
            text = await _unknown_menu(http, "gen-2")
            assert text.index(":gen-2") < text.index(":gen-1") < text.index(":local")
            assert f"nixboot.mac={UNKNOWN}" in text
            # the kernel of a fallback generation is served like any other
            top = menu.store_hash(g2.toplevel)
            assert (await http.head(f"/boot/{top}/kernel")).status_code == 200
            # a registered machine keeps its own generations (and its pin)
            r = await http.get(f"/ipxe/{MAC}")
            assert "choose --default gen-1 " in r.text
            await all_published((UNKNOWN, True, 2, [2, 1]), (MAC, False, 1, [2, 1]))
    finally:
        stop_cache(server)
    # Polling before the watch has the fallback record also served UNKNOWN the local disk only:
    # the event of the no-fallback cache is looked for among its own menus' events.
    first = len(menus)
    server = start_cache(tmp_path / "nofb", nats_url, extra_env={"NIXBOOT_FALLBACK_ATTR": ""})
    try:
        async with httpx.AsyncClient(base_url=server.url, event_hooks=hooks) as http:
            await _unknown_menu(http, "gen-1", mac=MAC)  # the KV watch has the records
            text = await _unknown_menu(http, "local")
            assert ":gen-" not in text and "item local" in text
            await all_published((UNKNOWN, True, None, []), since=first)
    finally:
        stop_cache(server)
    await sub.unsubscribe()
    assert all(m.fallback for m in menus if m.mac == UNKNOWN), by(menus)
