"""One simulated PXE machine: the requests a real boot makes, in its order and concurrency."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass, field

import httpx
import tftp_client

NARINFO_IN_FLIGHT = 25  # nix's http-connections default
NAR_JOBS = 16  # stage 1 passes -j16
# One TLS context for every simulated machine's client (all URLs are plain http). httpx builds a
# new one per AsyncClient otherwise, loading the CA bundle each time: ~50 ms of the load
# generator's CPU per machine (py-spy: a third of its samples), which starved the stack under test
# on this 2-core machine and counted as a fixed cost per boot no PXE firmware has.
TLS = ssl.create_default_context()


@dataclass
class Target:
    name: str
    tftp: tuple[str, int]
    boot_program: str  # e.g. lpxelinux.0
    report: bool  # nixboot takes stage reports; the classic stack has nowhere to send them


@dataclass
class BootResult:
    mac: str
    ok: bool = False
    error: str = ""
    stages: dict[str, float] = field(default_factory=dict)
    nar_bytes: int = 0
    paths: int = 0


def parse_menu(text: str) -> tuple[str, str, str]:
    """Kernel URL, initrd URL and APPEND line of the menu's DEFAULT entry."""
    default = re.search(r"^DEFAULT (\S+)", text, re.M)
    if not default:
        raise ValueError("menu has no DEFAULT")
    label = default.group(1)
    block = re.search(rf"^LABEL {re.escape(label)}\n(.*?)(?:\n\n|\Z)", text, re.M | re.S)
    if not block:
        raise ValueError(f"menu has no LABEL {label}")
    fields = dict(
        line.strip().split(" ", 1) for line in block.group(1).splitlines() if " " in line.strip()
    )
    return fields["KERNEL"], fields["INITRD"], fields.get("APPEND", "")


def cmdline_param(append: str, key: str) -> str | None:
    m = re.search(rf"(?:^| )nixboot\.{key}=(\S+)", append)
    return m.group(1) if m else None


async def fetch_closure(client: httpx.AsyncClient, cache: str, toplevel: str) -> tuple[int, int]:
    """Walk the closure as `nix-store -r` does: narinfos (25 in flight), then NARs (-j16)."""
    (await client.get(f"{cache}/nix-cache-info")).raise_for_status()
    seen: set[str] = set()
    urls: list[str] = []
    sem = asyncio.Semaphore(NARINFO_IN_FLIGHT)

    async def narinfo(base: str) -> None:
        async with sem:
            r = await client.get(f"{cache}/{base.split('-', 1)[0]}.narinfo")
        r.raise_for_status()
        info = dict(line.split(": ", 1) for line in r.text.splitlines() if ": " in line)
        urls.append(info["URL"])
        refs = [x for x in info.get("References", "").split() if x not in seen]
        seen.update(refs)
        await asyncio.gather(*(narinfo(ref) for ref in refs))

    root = toplevel.removeprefix("/nix/store/")
    seen.add(root)
    await narinfo(root)
    nar_sem = asyncio.Semaphore(NAR_JOBS)
    total = 0

    async def nar(url: str) -> None:
        nonlocal total
        async with nar_sem, client.stream("GET", f"{cache}/{url}") as r:
            r.raise_for_status()
            async for chunk in r.aiter_bytes(1 << 16):
                total += len(chunk)

    await asyncio.gather(*(nar(u) for u in urls))
    return len(urls), total


async def boot(target: Target, mac: str, cache: str, hook: object | None = None) -> BootResult:
    """``hook`` is an async callable that announces the lease (nixboot's DHCP hook)."""
    result = BootResult(mac)
    t = time.perf_counter()

    def mark(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        result.stages[stage] = now - t
        t = now

    try:
        if hook is not None:
            await hook(mac)  # type: ignore[operator]
        mark("dhcp")
        host, port = target.tftp
        await tftp_client.fetch(host, port, target.boot_program)
        mark("bootloader")
        menu = await tftp_client.fetch(host, port, f"pxelinux.cfg/01-{mac.replace(':', '-')}")
        kernel, initrd, append = parse_menu(menu.data.decode())
        mark("menu")
        limits = httpx.Limits(max_connections=NARINFO_IN_FLIGHT)
        async with httpx.AsyncClient(limits=limits, timeout=120, verify=TLS) as client:
            for url in (kernel, initrd):
                async with client.stream("GET", url) as r:
                    r.raise_for_status()
                    async for _ in r.aiter_bytes(1 << 16):
                        pass
            mark("kernel+initrd")
            toplevel = cmdline_param(append, "toplevel")
            if toplevel is None:
                raise ValueError("menu carries no nixboot.toplevel")
            report = target.report and cmdline_param(append, "boot_id")

            async def say(stage: str, **extra: object) -> None:
                # Stage 1 waits for each report (curl -m 4): its round trip is on the boot's
                # path. "reports" sums them (they are inside the closure stage's interval).
                started = time.perf_counter()
                if report:
                    body = {
                        "stage": stage,
                        "status": "done",
                        "mac": mac,
                        "token": cmdline_param(append, "token"),
                        **extra,
                    }
                    await client.post(f"{cache}/report/{report}", json=body)
                    spent = time.perf_counter() - started
                    result.stages["reports"] = result.stages.get("reports", 0.0) + spent

            await say("stage1")
            result.paths, result.nar_bytes = await fetch_closure(client, cache, toplevel)
            await say("closure", bytes=result.nar_bytes)
            mark("closure")
            await say("booted")
        result.ok = True
    except Exception as e:  # a failed boot is a result, not a crash of the benchmark
        result.error = f"{type(e).__name__}: {e}"
    return result
