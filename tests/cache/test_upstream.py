"""A cache filled from another cache (its upstream): verified narinfos, NARs checked against
their NarHash, re-signed; boot files out of verified NARs; warming on leases; the real
``nix-store -r`` substituting from the downstream only. Bad upstreams: a wrong key, unsigned and
forged narinfos, a tampered NAR (a real Nix file:// binary cache made by ``nix copy``, served by
Python's http.server, then tampered with)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
import zstandard

from nixboot_cache import narextract, narinfo, signing
from nixboot_cache.bootfiles import follow, split_store_path
from nixboot_cache.upstream import UntrustedNarInfo, verify
from nixboot_shared import bus, events, menu, subjects
from nixboot_shared.records import MachineGenerations
from tests.cache.cache_helpers import (
    CacheServer,
    NixFixture,
    free_port,
    start_cache,
    stop_cache,
)
from tests.cache.test_service import generation

MAC = "52:54:00:aa:bb:01"


def downstream_env(upstream_url: str, upstream_key: str) -> dict[str, str]:
    return {
        "NIXBOOT_CACHE__UPSTREAM_URL": upstream_url,
        "NIXBOOT_CACHE__UPSTREAM_PUBLIC_KEY": upstream_key,
        "NIXBOOT_CACHE__INSTANCE": "down",
        "NIXBOOT_CACHE__KEY_NAME": "nixboot-down-1",
        "NIXBOOT_TIMELINE__ENABLED": "false",
    }


def substitute(
    nixfx: NixFixture, url: str, key: str, root: Path, xdg: Path, path: str
) -> subprocess.CompletedProcess[str]:
    env = dict(nixfx.env, XDG_CACHE_HOME=str(xdg))
    return subprocess.run(
        ["nix-store", "--store", f"local?root={root}", "-r", path, "-j16",
         "--option", "substituters", url, "--option", "trusted-public-keys", key],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# -- pure parts ------------------------------------------------------------------------------------
def test_extract_from_real_nars(nixfx: NixFixture) -> None:
    """narextract reads what ``nix-store --dump`` wrote: a file in a directory, a symlink, and a
    path that continues below a symlink (resolved by ``follow``)."""
    kdump = subprocess.run(["nix-store", "--dump", nixfx.gen1.kernel], check=True,
                           capture_output=True).stdout  # fmt: skip
    out = io.BytesIO()
    entry = narextract.extract(io.BytesIO(kdump).read, "bzImage", out.write)
    assert entry.kind == "regular"
    assert out.getvalue() == (Path(nixfx.gen1.kernel) / "bzImage").read_bytes()
    tdump = subprocess.run(["nix-store", "--dump", nixfx.gen1.toplevel], check=True,
                           capture_output=True).stdout  # fmt: skip
    link = narextract.extract(io.BytesIO(tdump).read, "kernel", io.BytesIO().write)
    assert link.kind == "symlink" and link.target == f"{nixfx.gen1.kernel}/bzImage"
    below = narextract.extract(io.BytesIO(tdump).read, "kernel/x", io.BytesIO().write)
    assert follow(nixfx.gen1.toplevel, below) == f"{nixfx.gen1.kernel}/bzImage/x"
    with pytest.raises(narextract.NotInNar):
        narextract.extract(io.BytesIO(kdump).read, "nothing", io.BytesIO().write)
    with pytest.raises(narextract.BadNar):
        narextract.extract(io.BytesIO(kdump[:200]).read, "bzImage", io.BytesIO().write)
    with pytest.raises(narextract.NotInNar):
        narextract.extract(io.BytesIO(kdump).read, "../etc/passwd", io.BytesIO().write)
    assert split_store_path(f"{nixfx.gen1.kernel}/bzImage") == (nixfx.gen1.kernel, "bzImage")
    with pytest.raises(LookupError):
        split_store_path("/nix/store/../../etc/passwd")
    rel = narextract.Entry("symlink", target="../x/y", at="a/b")
    assert follow("/nix/store/" + "0" * 32 + "-p", rel) == "/nix/store/" + "0" * 32 + "-p/x/y"


def test_verify_rejects_unsigned_forged_and_misplaced(nix_keys: tuple[str, str]) -> None:
    sk = signing.SecretKey.parse(nix_keys[0])
    other = signing.SecretKey.generate("test-cache-1")  # same name, another key
    h = "0" * 31 + "1"
    ni = narinfo.NarInfo(
        store_path=f"/nix/store/{h}-demo", url="nar/x.nar.zst", compression="zstd",
        file_hash="", file_size=0, nar_hash="sha256:" + "1" * 52, nar_size=120,
        references=(f"{h}-demo",),
    )  # fmt: skip
    pub = sk.public()
    good = sk.sign_narinfo(ni)
    assert verify(good.render(), h, pub).sigs == good.sigs
    cases = {
        "unsigned": ni,
        "another key": other.sign_narinfo(ni),
        "tampered NarHash": good.__class__(**{**good.__dict__, "nar_hash": "sha256:" + "2" * 52}),
        "tampered references": good.__class__(**{**good.__dict__, "references": ()}),
    }
    for why, bad in cases.items():
        with pytest.raises(UntrustedNarInfo):
            verify(bad.render(), h, pub)
        assert why
    with pytest.raises(UntrustedNarInfo, match="answered for"):
        verify(good.render(), "0" * 31 + "2", pub)
    escaping = sk.sign_narinfo(good.__class__(**{**ni.__dict__, "url": "http://evil/nar"}))
    with pytest.raises(UntrustedNarInfo, match="leaves"):
        verify(escaping.render(), h, pub)


# -- two cache processes ------------------------------------------------------------------------
@pytest.fixture
def upstream(tmp_path: Path, nats_url: str) -> Iterator[CacheServer]:
    server = start_cache(
        tmp_path / "up", nats_url, extra_env={"NIXBOOT_CACHE__INSTANCE": "up",
                                              "NIXBOOT_CACHE__KEY_NAME": "nixboot-up-1"}
    )  # fmt: skip
    try:
        yield server
    finally:
        stop_cache(server)


async def test_downstream_fills_from_upstream_and_nix_substitutes_from_it(
    nixfx: NixFixture, upstream: CacheServer, nats_url: str, tmp_path: Path
) -> None:
    down = start_cache(
        tmp_path / "down", nats_url, extra_env=downstream_env(upstream.url, upstream.public_key())
    )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = (await bus.bootstrap(js))[subjects.KV_GENERATIONS]
        g1, g2 = nixfx.gen1, nixfx.gen2
        # Gen 1 names its boot files the NixOS way, through the toplevel's symlinks.
        gen1 = msgspec.structs.replace(
            generation(g1.toplevel, g1.kernel, g1.initrd, 1),
            kernel=f"{g1.toplevel}/kernel",
            initrd=f"{g1.toplevel}/initrd",
        )
        mg = MachineGenerations(
            mac=MAC, generations=[gen1, generation(g2.toplevel, g2.kernel, g2.initrd, 2)]
        )
        await kv.put(subjects.mac_token(MAC), msgspec.json.encode(mg))
        await bus.publish(js, events.LeaseSeen(mac=MAC, ip="10.0.0.7"))

        # The lease warms gen 2 (default = newest) in the downstream, from the upstream.
        top2 = menu.store_hash(g2.toplevel)
        kernel_file = down.state / "cache" / "boot" / top2 / "kernel"
        deadline = asyncio.get_running_loop().time() + 30
        while (
            down.metric("nixboot_cache_warms_total", result="ok") < 1
            or not kernel_file.exists()
            or not (down.state / "cache" / "boot" / top2 / "initrd").exists()
        ):
            assert asyncio.get_running_loop().time() < deadline, down.log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        nars = {p.name for p in (down.state / "cache" / "nar").glob("*.nar.zst")}
        assert len(nars) == len(g2.paths)
        assert kernel_file.read_bytes() == (Path(g2.kernel) / "bzImage").read_bytes()

        async with httpx.AsyncClient(base_url=down.url) as http:
            # Boot files by toplevel hash, from what came from upstream (Range too).
            r = await http.get(f"/boot/{top2}/initrd", headers={"Range": "bytes=5-14"})
            assert r.status_code == 206
            assert r.content == (Path(g2.initrd) / "initrd").read_bytes()[5:15]
            # gen 1 was not warmed: its kernel is fetched and extracted on demand.
            r = await http.get(f"/boot/{menu.store_hash(g1.toplevel)}/kernel")
            assert r.status_code == 200
            assert r.content == (Path(g1.kernel) / "bzImage").read_bytes()
            # Our signature and the upstream's, both valid.
            r = await http.get(f"/{narinfo.store_hash(g2.toplevel)}.narinfo")
            ni = narinfo.parse(r.text)
            fp = signing.narinfo_fingerprint(ni)
            keys = [signing.PublicKey.parse(k) for k in (down.public_key(), upstream.public_key())]
            assert sorted(k.name for k in keys) == sorted(s.split(":")[0] for s in ni.sigs)
            for k in keys:
                assert any(k.verify(fp, s) for s in ni.sigs), k.name
            # Unknown to the upstream too: 404.
            r = await http.get(f"/{'0' * 32}.narinfo")
            assert r.status_code == 404

        # The real nix client, with only the downstream as substituter and only its key trusted:
        # gen 2 (warm) and gen 1 (cold: downloaded from the upstream while served).
        served_before = upstream.metric("nixboot_cache_nar_served_total")
        root = tmp_path / "root"
        for i, path in enumerate((g2.toplevel, g1.toplevel)):
            r = substitute(nixfx, down.url, down.public_key(), root, tmp_path / f"x{i}", path)
            assert r.returncode == 0, r.stderr + down.log.read_text()[-3000:]
        v = subprocess.run(
            ["nix", "store", "verify", "--store", f"local?root={root}", "-r", g1.toplevel,
             "--trusted-public-keys", down.public_key()],
            env=nixfx.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert v.returncode == 0, v.stderr
        assert (root / g1.toplevel.lstrip("/") / "init").is_file()
        # The upstream served only what the downstream lacked, once: gen 1's own paths (its
        # toplevel already came with the boot-file request above, for its kernel symlink).
        fetched = upstream.metric("nixboot_cache_nar_served_total") - served_before
        only_g1 = set(g1.store_paths) - set(g2.store_paths)
        assert fetched == len(only_g1) - 1
        assert down.metric("nixboot_cache_nar_served_total") == len(
            set(g1.store_paths) | set(g2.store_paths)
        )

        # Metrics: the disk bound, and HTTP requests by route pattern (never by path).
        assert down.metric("nixboot_cache_max_bytes") == 1 << 30
        boot = "/boot/{toplevel_hash}/{which}"
        assert (
            down.metric("nixboot_http_requests_total", route=boot, method="GET", status="206") == 1
        )
        assert (
            down.metric("nixboot_http_requests_total", route=boot, method="GET", status="200") == 1
        )
        nar_gets = down.metric(
            "nixboot_http_requests_total", route="/nar/{name}", status="200", method="GET"
        )
        assert nar_gets == down.metric("nixboot_cache_nar_served_total")
        assert down.metric("nixboot_http_request_seconds_count", route="/{hash_part}.narinfo") > 0

        # Restarted, the downstream still answers from what it verified and stored.
        stop_cache(down)
        down = start_cache(
            tmp_path / "down", nats_url,
            extra_env=downstream_env(upstream.url, upstream.public_key()),
        )  # fmt: skip
        stop_cache(upstream)
        r2 = substitute(nixfx, down.url, down.public_key(), tmp_path / "root2",
                        tmp_path / "x9", g2.toplevel)  # fmt: skip
        assert r2.returncode == 0, r2.stderr + down.log.read_text()[-3000:]
    finally:
        await nc.close()
        stop_cache(down)


async def test_downstream_with_the_wrong_key_serves_nothing(
    nixfx: NixFixture, upstream: CacheServer, nats_url: str, tmp_path: Path
) -> None:
    wrong = str(signing.SecretKey.generate("nixboot-up-1").public())  # right name, wrong key
    down = start_cache(tmp_path / "down", nats_url, extra_env=downstream_env(upstream.url, wrong))
    try:
        r = httpx.get(f"{down.url}/{narinfo.store_hash(nixfx.gen1.toplevel)}.narinfo")
        assert r.status_code == 502 and "no valid signature" in r.text
        s = substitute(nixfx, down.url, down.public_key(), tmp_path / "root", tmp_path / "x",
                       nixfx.gen1.toplevel)  # fmt: skip
        assert s.returncode != 0
        assert not list((down.state / "cache" / "nar").iterdir())
        assert not list((down.state / "cache" / "upstream").glob("*.narinfo"))
    finally:
        stop_cache(down)


@pytest.fixture
def file_cache(nixfx: NixFixture, nix_keys: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """A Nix binary cache written by the real ``nix copy`` (zstd, signed), served over HTTP."""
    sk = tmp_path / "sk"
    sk.write_text(nix_keys[0])
    d = tmp_path / "filecache"
    nixfx.run("nix", "copy", "--to", f"file://{d}?compression=zstd&secret-key={sk}",
              nixfx.gen1.toplevel)  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1", "-d", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/nix-cache-info")
                break
            except httpx.HTTPError:
                import time

                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_unsigned_and_tampered_upstream_content_is_refused(
    nixfx: NixFixture, nix_keys: tuple[str, str], file_cache: str, nats_url: str, tmp_path: Path
) -> None:
    d = tmp_path / "filecache"
    g1 = nixfx.gen1
    lib = next(p for p in g1.store_paths if p.endswith("-nb-lib"))
    app = next(p for p in g1.store_paths if p.endswith("-nb-app-v1"))
    # The lib's narinfo loses its signature; the app's NAR gets one byte of its script changed
    # (a valid zstd NAR of the right size: only NarHash tells).
    lib_ni = d / f"{narinfo.store_hash(lib)}.narinfo"
    lib_ni.write_text("".join(ln for ln in lib_ni.read_text().splitlines(True)
                              if not ln.startswith("Sig:")))  # fmt: skip
    app_ni = narinfo.parse((d / f"{narinfo.store_hash(app)}.narinfo").read_text())
    plain = zstandard.ZstdDecompressor().decompressobj().decompress((d / app_ni.url).read_bytes())
    assert plain.count(b"echo app") == 1
    (d / app_ni.url).write_bytes(
        zstandard.ZstdCompressor().compress(plain.replace(b"echo app", b"echo APP"))
    )

    down = start_cache(
        tmp_path / "down", nats_url, extra_env=downstream_env(file_cache, nix_keys[1])
    )
    try:
        async with httpx.AsyncClient(base_url=down.url) as http:
            r = await http.get(f"/{narinfo.store_hash(lib)}.narinfo")
            assert r.status_code == 502 and "unsigned" in r.text
            # The app's narinfo is genuine; its NAR is not: never stored, never served whole.
            r = await http.get(f"/{narinfo.store_hash(app)}.narinfo")
            assert r.status_code == 200
            url = narinfo.parse(r.text).url
            with pytest.raises(httpx.HTTPError):  # cut short (or refused), never complete
                (await http.get(f"/{url}")).raise_for_status()
            # A path Nix copied untouched comes through, re-signed by us.
            r = await http.get(f"/{narinfo.store_hash(g1.kernel)}.narinfo")
            assert r.status_code == 200
            ni = narinfo.parse(r.text)
            r = await http.get(f"/{ni.url}")
            assert r.status_code == 200
        stored = {p.name.removesuffix(".nar.zst") for p in (down.state / "cache" / "nar").iterdir()}
        assert stored == {ni.nar_hash.removeprefix("sha256:")}  # the kernel's only
        assert app_ni.nar_hash.removeprefix("sha256:") not in stored
        s = substitute(nixfx, down.url, down.public_key(), tmp_path / "root", tmp_path / "x",
                       g1.toplevel)  # fmt: skip
        assert s.returncode != 0
    finally:
        stop_cache(down)
