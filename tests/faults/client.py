"""A simulated PXE machine that retries like firmware and nix do, and checks what it got.

The request sequence is bench/storm/machine.py's (boot program and per-MAC menu over TFTP,
kernel and initrd over HTTP, the closure as `nix-store -r` walks it, stage reports); the TFTP
client and menu parsing are imported from there by path. Added here: every step is retried
until a deadline (PXE firmware restarts the boot, nix retries downloads), and every byte is
checked: kernel and initrd against the store, every NAR against the NarHash of its signed
narinfo, so a half-written or truncated file served by the cache fails the boot."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "storm"))
import machine as storm_machine
import tftp_client

from nixboot_cache import nix32

T = TypeVar("T")
NARINFO_IN_FLIGHT = 25
NAR_JOBS = 16


class Corrupt(RuntimeError):
    """The service answered 200 with bytes that are not the file: never acceptable."""


@dataclass
class Boot:
    mac: str
    ok: bool = False
    error: str = ""
    retries: int = 0
    corrupt: list[str] = field(default_factory=list)
    reports_accepted: list[tuple[str, str]] = field(default_factory=list)  # (boot id, stage)
    boot_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Net:
    tftp: tuple[str, int]
    cache: str  # only for nix-cache-info/narinfos: the menu names the rest
    deadline_seconds: float = 90.0


async def retry(boot: Boot, step: Callable[[], Awaitable[T]], until: float) -> T:
    delay = 0.2
    while True:
        try:
            return await step()
        except Corrupt:
            raise
        except Exception as e:
            if time.monotonic() > until:
                raise RuntimeError(f"gave up: {type(e).__name__}: {e}") from e
            boot.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def nar_hash_ok(data: bytes, nar_hash: str) -> bool:
    algo, _, digest = nar_hash.partition(":")
    nar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return algo == "sha256" and nix32.encode(hashlib.sha256(nar).digest()) == digest


async def fetch_closure(
    boot: Boot, client: httpx.AsyncClient, cache: str, top: str, until: float
) -> None:
    async def get(url: str) -> httpx.Response:
        r = await client.get(url)
        r.raise_for_status()
        return r

    await retry(boot, lambda: get(f"{cache}/nix-cache-info"), until)
    seen = {top.removeprefix("/nix/store/")}
    nars: dict[str, str] = {}  # url -> NarHash
    sem = asyncio.Semaphore(NARINFO_IN_FLIGHT)

    async def narinfo(base: str) -> None:
        async with sem:
            r = await retry(boot, lambda: get(f"{cache}/{base.split('-', 1)[0]}.narinfo"), until)
        info = dict(line.split(": ", 1) for line in r.text.splitlines() if ": " in line)
        if "Sig" not in info:
            raise Corrupt(f"unsigned narinfo for {base}")
        nars[info["URL"]] = info["NarHash"]
        refs = [x for x in info.get("References", "").split() if x not in seen]
        seen.update(refs)
        await asyncio.gather(*(narinfo(ref) for ref in refs))

    await narinfo(top.removeprefix("/nix/store/"))
    nar_sem = asyncio.Semaphore(NAR_JOBS)

    async def nar(url: str, nar_hash: str) -> None:
        async def once() -> None:
            r = await get(f"{cache}/{url}")
            # nix checks the hash and fails the path: so does this machine, then retries it.
            if not nar_hash_ok(r.content, nar_hash):
                boot.corrupt.append(url)
                raise ValueError(f"{url}: NAR does not match {nar_hash}")

        async with nar_sem:
            await retry(boot, once, until)

    await asyncio.gather(*(nar(u, h) for u, h in nars.items()))


async def boot(net: Net, mac: str, hook: Callable[[str], Awaitable[None]] | None = None) -> Boot:
    result = Boot(mac)
    start = time.monotonic()
    until = start + net.deadline_seconds
    try:
        if hook is not None:
            await hook(mac)
        host, port = net.tftp
        await retry(result, lambda: tftp_client.fetch(host, port, "lpxelinux.0"), until)

        async def menu() -> tuple[str, str, str]:
            got = await tftp_client.fetch(host, port, f"pxelinux.cfg/01-{mac.replace(':', '-')}")
            kernel, initrd, append = storm_machine.parse_menu(got.data.decode())
            if storm_machine.cmdline_param(append, "toplevel") is None:
                raise ValueError("fallback menu (generations not known yet)")
            return kernel, initrd, append

        kernel, initrd, append = await retry(result, menu, until)
        toplevel = storm_machine.cmdline_param(append, "toplevel")
        assert toplevel is not None
        boot_id = storm_machine.cmdline_param(append, "boot_id") or ""
        token = storm_machine.cmdline_param(append, "token")
        result.boot_ids.append(boot_id)
        limits = httpx.Limits(max_connections=NARINFO_IN_FLIGHT)
        # The storm bench's one TLS context: a new one per client costs ~50 ms of CPU each.
        async with httpx.AsyncClient(limits=limits, timeout=20, verify=storm_machine.TLS) as client:
            for url, which in ((kernel, "kernel"), (initrd, "initrd")):

                async def get_file(url: str = url, which: str = which) -> None:
                    r = await client.get(url)
                    r.raise_for_status()
                    expected = Path(toplevel, which).resolve()  # what the cache must serve
                    if r.content != expected.read_bytes():
                        result.corrupt.append(url)
                        raise ValueError(f"{url}: served bytes differ from {expected}")

                await retry(result, get_file, until)

            async def say(stage: str, **extra: object) -> None:
                body = {"stage": stage, "status": "done", "mac": mac, "token": token, **extra}

                async def post() -> None:
                    r = await client.post(f"{net.cache}/report/{boot_id}", json=body)
                    r.raise_for_status()

                await retry(result, post, until)
                result.reports_accepted.append((boot_id, stage))

            await say("stage1")
            await fetch_closure(result, client, net.cache, toplevel, until)
            await say("booted")
        result.ok = True
    except Exception as e:  # a failed boot is a result
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = time.monotonic() - start
    return result
