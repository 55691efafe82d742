"""The TFTP service as it runs: a real nats-server, the service process, real TFTP clients.

Machines, generations and leases are written to the KV buckets the way the builder and the DHCP
hook write them; the service must pick each change up through its watches, without a restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from nats.js.kv import KeyValue

from nixboot_shared import bus, events, security, subjects
from nixboot_shared.records import Lease, Machine, MachineGenerations
from nixboot_tftp.bootprograms import DEBIAN_BOOT_PROGRAMS
from nixboot_tftp.content import REREAD_SECONDS
from tests.conftest import NatsServer, free_port, wait_port
from tests.tftp.tftp_helpers import atftp, curl, gen, raw_get, tftp_hpa

MAC = "52:54:00:aa:bb:01"
TOKEN = "52-54-00-aa-bb-01"
NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


class TftpService:
    def __init__(self, tmp: Path, nats_url: str, env: dict[str, str], fallback: str = "") -> None:
        self.state = tmp / "state"
        self.port = free_port()
        self.http = free_port()
        env = {
            **env,
            "NIXBOOT_NATS__URL": nats_url,
            "NIXBOOT_STATE_DIR": str(self.state),
            "NIXBOOT_TFTP__HOST": "127.0.0.1",
            "NIXBOOT_TFTP__PORT": str(self.port),
            "NIXBOOT_TFTP__HTTP__PORT": str(self.http),
            "NIXBOOT_CACHE__PUBLIC_URL": "http://10.0.0.1:8080",
            "NIXBOOT_FALLBACK_ATTR": fallback,
        }
        code = (
            "from nixboot_shared.config import load\n"
            "from nixboot_tftp.service import main\n"
            "raise SystemExit(main(load()))\n"
        )
        self.log = tmp / "tftp.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        wait_port(self.http, 15)

    def get(self, name: str) -> str:
        r = curl(self.port, name)
        assert r.returncode == 0, (name, r.stderr)
        return r.stdout.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


@pytest.fixture
def service(
    tmp_path: Path, nats_server: NatsServer, clean_env: dict[str, str]
) -> Iterator[TftpService]:
    s = TftpService(tmp_path, nats_server.url, clean_env)
    yield s
    s.stop()


@pytest.fixture
async def kv(nats_server: NatsServer) -> AsyncIterator[dict[str, KeyValue]]:
    nc = await nats.connect(nats_server.url)
    buckets = await bus.bootstrap(nc.jetstream())
    yield buckets
    await nc.drain()


async def put_gens(kv: dict[str, KeyValue], mac: str, rec: MachineGenerations) -> None:
    await kv[subjects.KV_GENERATIONS].put(subjects.mac_token(mac), msgspec.json.encode(rec))


def labels(menu: str) -> list[str]:
    return re.findall(r"^LABEL (\S+)$", menu, flags=re.M)


def menu_boot_id(menu: str) -> str:
    return menu.split("nixboot.boot_id=")[1].split()[0]


def default(menu: str) -> str:
    m = re.search(r"^DEFAULT (\S+)$", menu, flags=re.M)
    assert m, menu
    return m.group(1)


async def eventually(check, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_boot_programs_from_debian(service: TftpService, tmp_path: Path) -> None:
    for name, (path, _) in DEBIAN_BOOT_PROGRAMS.items():
        out = tmp_path / name
        r = tftp_hpa(service.port, name, out)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == Path(path).read_bytes(), name
    r = atftp(service.port, "snponly.efi", tmp_path / "s", "blksize 1468", "windowsize 4")
    assert (
        r.returncode == 0
        and (tmp_path / "s").read_bytes() == Path("/usr/lib/ipxe/snponly.efi").read_bytes()
    )


async def test_thin_flow_lease_event_then_menu(
    service: TftpService, nats_server: NatsServer
) -> None:
    """Foundation requirement: after a LeaseSeen for a MAC, its per-MAC config comes over TFTP."""
    nc = await nats.connect(nats_server.url)
    mac = "52:54:00:aa:bb:77"
    await bus.publish(nc.jetstream(), events.LeaseSeen(mac=mac, ip="10.0.0.77"))
    await nc.drain()
    menu = service.get("pxelinux.cfg/01-52-54-00-aa-bb-77")
    assert "rendered for 52-54-00-aa-bb-77" in menu and "LOCALBOOT" in menu
    assert default(menu) == "local"  # no generations yet
    # The lease event also feeds the hex-IP lookup (10.0.0.77 = 0A00004D).
    menu = await eventually(
        lambda: _must(service.get("pxelinux.cfg/0A00004D"), "52-54-00-aa-bb-77")
    )


def _must(text: str, needle: str) -> str:
    assert needle in text, text
    return text


async def test_menu_generations_new_and_one_shot(
    service: TftpService, kv: dict[str, KeyValue], nats_server: NatsServer
) -> None:
    await kv[subjects.KV_MACHINES].put(
        TOKEN, msgspec.json.encode(Machine(mac=MAC, name="pc-01", attr="demo"))
    )
    await put_gens(kv, MAC, MachineGenerations(mac=MAC, generations=[gen(1), gen(2), gen(3)]))
    name = f"pxelinux.cfg/01-{TOKEN}"
    menu = await eventually(lambda: _must(service.get(name), "gen-3"))
    assert labels(menu) == ["gen-3", "gen-2", "gen-1", "local"]
    assert default(menu) == "gen-3"
    assert "MENU TITLE nixboot: pc-01" in menu
    # pxelinux.0 (TFTP only) gets TFTP paths; kernels are then served from the store over TFTP.
    assert f"KERNEL boot/{'3'.zfill(32)}/kernel" in menu

    # The boot id/token on the command line verify with the service's secret.
    boot_id = re.search(r"nixboot\.boot_id=(\S+)", menu).group(1)  # type: ignore[union-attr]
    token = re.search(r"nixboot\.token=(\S+)", menu).group(1)  # type: ignore[union-attr]
    secret = (service.state / "boot-secret").read_text().strip()
    assert security.check_boot_token(secret, boot_id, token)
    assert boot_id not in service.get(name)  # a new boot id per render

    # A new generation shows on the next request, no restart.
    await put_gens(
        kv, MAC, MachineGenerations(mac=MAC, generations=[gen(1), gen(2), gen(3), gen(4)])
    )
    menu = await eventually(lambda: _must(service.get(name), "gen-4"))
    assert labels(menu)[:2] == ["gen-4", "gen-3"] and default(menu) == "gen-4"

    # A one-shot pin applies to one boot, then the newest is default again and KV is cleared.
    await put_gens(
        kv,
        MAC,
        MachineGenerations(mac=MAC, generations=[gen(1), gen(2), gen(3), gen(4)], next_boot=2),
    )
    menu = await eventually(lambda: _must(service.get(name), "DEFAULT gen-2"))
    # pxelinux's menu.c32 re-reads the file in the same boot: the same menu (boot id, default)
    again = service.get(name)
    assert default(again) == "gen-2" and menu_boot_id(again) == menu_boot_id(menu)
    await asyncio.sleep(REREAD_SECONDS)  # the next boot
    assert default(service.get(name)) == "gen-4"

    async def cleared() -> None:
        for _ in range(100):
            entry = await kv[subjects.KV_GENERATIONS].get(TOKEN)
            rec = msgspec.json.decode(entry.value or b"", type=MachineGenerations)
            if rec.next_boot is None:
                assert [g.number for g in rec.generations] == [1, 2, 3, 4]
                return
            await asyncio.sleep(0.05)
        raise AssertionError("next_boot was not cleared in KV")

    await cleared()
    # A (persistent) pin is not consumed.
    await put_gens(
        kv, MAC, MachineGenerations(mac=MAC, generations=[gen(1), gen(2), gen(3), gen(4)], pinned=1)
    )
    await eventually(lambda: _must(default(service.get(name)), "gen-1"))
    assert default(service.get(name)) == "gen-1"


async def test_hex_ip_default_and_fallback(
    tmp_path: Path, nats_server: NatsServer, clean_env: dict[str, str], kv: dict[str, KeyValue]
) -> None:
    other = "52:54:00:aa:bb:02"
    await kv[subjects.KV_MACHINES].put(
        subjects.mac_token(other),
        msgspec.json.encode(Machine(mac=other, name="tmpl", attr="fallback-sys")),
    )
    await put_gens(kv, other, MachineGenerations(mac=other, generations=[gen(7), gen(8)]))
    lease = Lease(mac=MAC, ip="10.0.0.2")
    await kv[subjects.KV_LEASES].put(TOKEN, msgspec.json.encode(lease))
    await kv[subjects.KV_LEASES].put(subjects.ip_key("10.0.0.2"), TOKEN.encode())
    svc = TftpService(tmp_path, nats_server.url, clean_env, fallback="fallback-sys")
    try:
        for name in ("pxelinux.cfg/0A000002", "pxelinux.cfg/0a000002"):
            assert f"rendered for {TOKEN}" in svc.get(name)
        # Shorter prefixes answer for the asking client only when it lies in them: 127.0.0.1 has
        # no lease here, so they are not found (pxelinux then goes on to "default").
        assert raw_get(svc.port, "pxelinux.cfg/0A00000").error[0] == 1  # type: ignore[index]
        assert raw_get(svc.port, "pxelinux.cfg/0A").error[0] == 1  # type: ignore[index]
        # Unknown machines: the fallback attribute's generations.
        menu = svc.get("pxelinux.cfg/default")
        assert "rendered for unknown" in menu
        assert "nixboot.mac=" not in menu  # no MAC known: stage 1 reports without one
        assert labels(menu) == ["gen-8", "gen-7", "local"] and default(menu) == "gen-8"
        menu = svc.get("pxelinux.cfg/01-52-54-00-00-00-99")
        assert "rendered for 52-54-00-00-00-99" in menu and default(menu) == "gen-8"
        # UUID names and other hardware types: not found.
        uuid = "pxelinux.cfg/564d1d52-8c43-4e3a-b6a5-b2c6f28b4a01"
        assert raw_get(svc.port, uuid).error[0] == 1  # type: ignore[index]
    finally:
        svc.stop()


async def test_unknown_machine_boots_the_builders_fallback_record(
    tmp_path: Path, nats_server: NatsServer, clean_env: dict[str, str], kv: dict[str, KeyValue]
) -> None:
    """The builder records the fallback configuration under ``subjects.FALLBACK_KEY`` (not a
    MAC): unknown machines get those generations (never its pins); registered machines keep
    theirs. Without ``fallback_attr``, unknown machines get the local disk only."""
    fb = MachineGenerations(mac=subjects.FALLBACK_KEY, generations=[gen(20), gen(21)], pinned=20)
    await kv[subjects.KV_GENERATIONS].put(subjects.FALLBACK_KEY, msgspec.json.encode(fb))
    await put_gens(kv, MAC, MachineGenerations(mac=MAC, generations=[gen(3)]))
    unknown = "pxelinux.cfg/01-52-54-00-00-00-99"
    (tmp_path / "a").mkdir()
    svc = TftpService(tmp_path / "a", nats_server.url, clean_env, fallback="fallback-sys")
    try:
        await eventually(lambda: _must(default(svc.get(unknown)), "gen-21"))
        assert labels(svc.get(unknown)) == ["gen-21", "gen-20", "local"]
        assert default(svc.get(f"pxelinux.cfg/01-{TOKEN}")) == "gen-3"
    finally:
        svc.stop()
    (tmp_path / "b").mkdir()
    svc = TftpService(tmp_path / "b", nats_server.url, clean_env)
    try:
        await eventually(lambda: _must(default(svc.get(f"pxelinux.cfg/01-{TOKEN}")), "gen-3"))
        assert labels(svc.get(unknown)) == ["local"] and default(svc.get(unknown)) == "local"
    finally:
        svc.stop()


async def test_kernel_and_initrd_over_tftp_from_the_store(
    service: TftpService, kv: dict[str, KeyValue], tmp_path: Path
) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(os.urandom(300_000))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(os.urandom(120_000))
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    paths = subprocess.run(
        ["nix-store", "--add", str(kernel), str(initrd)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    g = msgspec.structs.replace(gen(5), kernel=paths[0], initrd=paths[1])
    await put_gens(kv, MAC, MachineGenerations(mac=MAC, generations=[g]))
    h = "5".zfill(32)
    out = tmp_path / "k"

    async def fetched() -> None:
        for _ in range(100):
            r = atftp(service.port, f"boot/{h}/kernel", out, "blksize 1468", "windowsize 8")
            if r.returncode == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(r.stderr)

    await fetched()
    assert out.read_bytes() == kernel.read_bytes()
    assert curl(service.port, f"boot/{h}/initrd").stdout == initrd.read_bytes()
    # Other store paths, unknown hashes and other names under boot/ are not served.
    for name in (f"boot/{'9' * 32}/kernel", f"boot/{h}/init", f"boot/{h}/../{h}/kernel"):
        assert raw_get(service.port, name).error is not None


async def test_events_and_metrics_per_transfer(
    service: TftpService, nats_server: NatsServer, kv: dict[str, KeyValue]
) -> None:
    nc = await nats.connect(nats_server.url)
    seen: list[events.AnyEvent] = []

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        seen.append(events.decode(msg.data))

    await nc.subscribe("nixboot.evt.boot-file.>", cb=cb)
    await nc.subscribe("nixboot.evt.menu.>", cb=cb)
    await put_gens(kv, MAC, MachineGenerations(mac=MAC, generations=[gen(1)]))
    menu = await eventually(lambda: _must(service.get(f"pxelinux.cfg/01-{TOKEN}"), "gen-1"))
    boot_id = re.search(r"nixboot\.boot_id=(\S+)", menu).group(1)  # type: ignore[union-attr]
    assert curl(service.port, "pxelinux.0").returncode == 0
    raw_get(service.port, "missing.file")

    def got() -> None:
        """Every event asserted on below has arrived (they are published asynchronously)."""
        files = [e for e in seen if isinstance(e, events.BootFileRequested)]
        assert any(isinstance(e, events.MenuServed) and e.boot_id == boot_id for e in seen), seen
        assert any(e.boot_id == boot_id for e in files), seen
        assert any(e.file_kind == "boot-program" and e.bytes > 0 for e in files), seen
        assert any(e.file == "missing.file" and e.result == "not-found" for e in files), seen

    await eventually(got, timeout=20.0)
    menu_ev = [e for e in seen if isinstance(e, events.MenuServed) and e.boot_id == boot_id]
    assert menu_ev[0].mac == MAC and menu_ev[0].default_generation == 1
    files = [e for e in seen if isinstance(e, events.BootFileRequested)]
    menu_file = next(e for e in files if e.boot_id == boot_id)
    assert (menu_file.file_kind, menu_file.result, menu_file.mac) == ("menu", "ok", MAC)
    assert menu_file.bytes == len(menu.encode())
    await nc.drain()

    body = httpx.get(f"http://127.0.0.1:{service.http}/metrics").text
    assert 'nixboot_tftp_transfers_total{kind="menu",result="ok"}' in body
    assert 'nixboot_tftp_transfers_total{kind="other",result="not-found"}' in body
    assert "nixboot_tftp_menu_render_seconds_count" in body
    assert TOKEN not in body and "missing.file" not in body and "pxelinux.cfg" not in body
