"""tftp service (foundation stage): per-MAC pxelinux menus rendered at request time from a local
view of the KV buckets. The full boot-program server comes with the TFTP issue."""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

import msgspec
import tftpy
from fastapi import FastAPI

from nixboot_shared import menu, records, security, subjects
from nixboot_shared.config import Config
from nixboot_shared.service import ServiceContext, run
from nixboot_shared.view import KvMirror

log = logging.getLogger(__name__)

_PER_MAC = re.compile(r"^pxelinux\.cfg/01-([0-9a-f]{2}(?:-[0-9a-f]{2}){5})$")


class MenuSource:
    def __init__(self, cfg: Config, generations: KvMirror[records.MachineGenerations]) -> None:
        self.cfg = cfg
        self.generations = generations
        self.secret = security.read_or_create_secret(cfg.state_path / "boot-secret")

    def render(self, mac: str) -> str:
        boot_id = security.new_boot_id()
        spec = menu.MenuSpec(
            mac=mac,
            title=f"nixboot {mac}",
            generations=self.generations.get(subjects.mac_token(mac)),
            params=menu.BootParams(
                cache_url=self.cfg.cache.public_url,
                public_key="",
                boot_id=boot_id,
                boot_token=security.boot_token(self.secret, boot_id),
            ),
            timeout_seconds=self.cfg.menu_timeout_seconds,
        )
        return menu.render_pxelinux(spec, self.cfg.cache.public_url.rstrip("/") + "/")


def _refuse_upload(*_: Any, **__: Any) -> None:
    return None  # tftpy answers a write request it cannot open with an error: read-only


def serve_tftp(cfg: Config, source: MenuSource, spool: Path) -> tftpy.TftpServer:
    root = spool / "root"
    root.mkdir(parents=True, exist_ok=True)

    def dynamic(filename: str, **_: Any) -> IO[bytes] | None:
        m = _PER_MAC.match(filename.lower())
        if not m:
            return None
        # tftpy needs a real file (it reads .name and locks it), not a BytesIO.
        f = tempfile.NamedTemporaryFile(dir=spool, prefix="menu-", delete=True)  # noqa: SIM115
        f.write(source.render(m.group(1)).encode())
        f.flush()
        f.seek(0)
        return f

    server = tftpy.TftpServer(str(root), dyn_file_func=dynamic, upload_open=_refuse_upload)
    thread = threading.Thread(
        target=server.listen, args=(cfg.tftp.host, cfg.tftp.port), name="tftp", daemon=True
    )
    thread.start()
    return server


async def setup(ctx: ServiceContext, app: FastAPI) -> None:
    generations: KvMirror[records.MachineGenerations] = KvMirror(
        ctx.kv[subjects.KV_GENERATIONS],
        lambda b: msgspec.json.decode(b, type=records.MachineGenerations),
    )
    ctx.spawn(generations.run(), "generations-view")
    spool = Path(tempfile.mkdtemp(prefix="nixboot-tftp-"))
    server = serve_tftp(ctx.cfg, MenuSource(ctx.cfg, generations), spool)
    log.info("tftp on %s:%d", ctx.cfg.tftp.host, ctx.cfg.tftp.port)

    async def stop() -> None:
        server.stop(now=True)

    ctx.cleanups.append(stop)


def main(cfg: Config) -> int:
    return run("tftp", cfg, cfg.tftp.http, setup)
