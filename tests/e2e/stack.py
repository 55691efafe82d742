"""What the e2e VMs boot against, inside the lab's namespace.

``InterimStack``: the interim boot server (labserver.py: cache routes, menus, reports) plus
dnsmasq, until the cache/tftp/dhcp-hook services serve these routes themselves. The tests talk
to it only through this class (publish a generation, pin one, read reports), so switching to
the real services changes this file, not the tests.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from nixboot_shared.menu import BootParams, MenuSpec, render_pxelinux
from nixboot_shared.records import Generation, MachineGenerations
from nixboot_shared.subjects import normalize_mac
from tests.e2e.lab import SERVER_IP, Lab

HERE = Path(__file__).resolve().parent
HTTP_PORT = 8080


class InterimStack:
    def __init__(self, lab: Lab, cache_dir: Path, public_key: str) -> None:
        self.lab = lab
        self.cache_dir = cache_dir
        self.public_key = public_key
        self.state = lab.work / "machines.json"
        self.log = lab.work / "server-events.jsonl"
        self.url = f"http://{SERVER_IP}:{HTTP_PORT}"

    def start(self, pxelinux: bool = False) -> None:
        self.state.write_text("{}")
        self.log.write_text("")
        self.lab.spawn(
            [
                sys.executable,
                str(HERE / "labserver.py"),
                "--listen",
                f"{SERVER_IP}:{HTTP_PORT}",
                "--url",
                self.url,
                "--cache",
                str(self.cache_dir),
                "--state",
                str(self.state),
                "--key",
                self.public_key,
                "--log",
                str(self.log),
            ],
            self.lab.work / "labserver.out",
        )
        self.lab.wait_listening(HTTP_PORT)
        self.lab.prepare_tftp_root()
        self.lab.start_dnsmasq(self.url + "/boot.ipxe", pxelinux=pxelinux)

    def restart_dhcp(self, pxelinux: bool) -> None:
        self.lab.stop_dnsmasq()
        self.lab.start_dnsmasq(self.url + "/boot.ipxe", pxelinux=pxelinux)

    # ------------------------------------------------------------------ machine state
    def _machines(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state.read_text())
        return data

    def set_generations(
        self,
        mac: str,
        gens: list[Generation],
        next_boot: int | None = None,
    ) -> None:
        mac = normalize_mac(mac)
        data = self._machines()
        data[mac] = msgspec.to_builtins(
            MachineGenerations(mac=mac, generations=gens, next_boot=next_boot)
        )
        self.state.write_text(json.dumps(data))

    def pin_once(self, mac: str, number: int) -> None:
        data = self._machines()
        data[normalize_mac(mac)]["next_boot"] = number
        self.state.write_text(json.dumps(data))

    def write_pxelinux_menu(self, mac: str) -> str:
        """The per-MAC pxelinux.cfg file (lpxelinux: kernel and initrd over HTTP)."""
        mac = normalize_mac(mac)
        gens = msgspec.convert(self._machines()[mac], MachineGenerations)
        boot_id = uuid.uuid4().hex
        params = BootParams(
            cache_url=self.url,
            public_key=self.public_key,
            boot_id=boot_id,
            boot_token="t" + boot_id,
        )
        spec = MenuSpec(
            mac=mac, title="nixboot e2e", generations=gens, params=params, timeout_seconds=1
        )
        cfg = self.lab.tftp_root / "pxelinux.cfg" / ("01-" + mac.replace(":", "-"))
        cfg.write_text(render_pxelinux(spec, self.url + "/"))
        return boot_id

    # ------------------------------------------------------------------ observations
    def entries(self, since: float = 0.0) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            e = json.loads(line)
            if e["ts"] >= since:
                out.append(e)
        return out

    def reports(self, boot_id: str) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["kind"] == "report" and e["boot_id"] == boot_id]

    def menus(self, since: float) -> list[dict[str, Any]]:
        return [e for e in self.entries(since) if e["kind"] == "menu"]

    def nar_bytes(self, since: float) -> int:
        """Bytes of NARs the cache served since ``since`` (what the cache's metrics count)."""
        return sum(
            e["bytes"]
            for e in self.entries(since)
            if e["kind"] == "get" and e["path"].startswith("/nar/")
        )


def now() -> float:
    return time.time()
