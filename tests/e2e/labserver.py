"""Interim boot server for e2e boots, until the cache service serves these routes itself.

A stand-in (stdlib HTTP, run inside the test's network namespace) for the cache service's HTTP
side: the signed binary cache (a ``nix copy`` file cache), ``/boot/<hash>/kernel|initrd`` from
the store, ``/boot.ipxe`` and ``/ipxe/<mac>`` rendered with nixboot_shared.menu, and
``POST /report/<boot_id>``. Menus come from a JSON state file the test rewrites (generations,
pins); a one-shot pin is cleared once a menu has used it, as the real service must.

    python labserver.py --listen IP:PORT --url URL --cache DIR --state FILE --key PUBKEY --log FILE
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec

from nixboot_shared.menu import BootParams, MenuSpec, render_ipxe, render_ipxe_chain
from nixboot_shared.records import MachineGenerations
from nixboot_shared.subjects import InvalidMac, normalize_mac

_lock = threading.Lock()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url.rstrip("/")
        self.cache = Path(args.cache)
        self.state = Path(args.state)
        self.key: str = args.key
        self.log = Path(args.log)

    def record(self, entry: dict[str, Any]) -> None:
        entry["ts"] = time.time()
        with _lock, self.log.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def menu(self, mac: str) -> str | None:
        with _lock:
            state = json.loads(self.state.read_text()) if self.state.exists() else {}
            raw = state.get(mac)
            if raw is None:
                return None
            gens = msgspec.convert(raw, MachineGenerations)
            if gens.next_boot is not None:  # one-shot: this boot only
                raw["next_boot"] = None
                self.state.write_text(json.dumps(state))
        boot_id = uuid.uuid4().hex
        params = BootParams(
            cache_url=self.url, public_key=self.key, boot_id=boot_id, boot_token="t" + boot_id
        )
        spec = MenuSpec(
            mac=mac, title="nixboot e2e", generations=gens, params=params, timeout_seconds=1
        )
        default = gens.default()
        self.record(
            {
                "kind": "menu",
                "mac": mac,
                "boot_id": boot_id,
                "default": default.number if default else None,
            }
        )
        return render_ipxe(spec, self.url + "/")


class Handler(BaseHTTPRequestHandler):
    server_state: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, path: Path) -> None:
        if not path.is_file():
            self._send(404, b"not found\n", "text/plain")
            return
        data = path.read_bytes()
        self.server_state.record({"kind": "get", "path": self.path, "bytes": len(data)})
        self._send(200, data)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        s = self.server_state
        p = self.path.split("?", 1)[0]
        if p == "/boot.ipxe":
            self._send(200, render_ipxe_chain(s.url).encode(), "text/plain")
        elif m := re.fullmatch(r"/ipxe/([0-9a-fA-F:-]+)", p):
            try:
                mac = normalize_mac(m.group(1))
            except InvalidMac:
                self._send(400, b"bad mac\n", "text/plain")
                return
            menu = s.menu(mac)
            self._send(200, (menu or "#!ipxe\nexit 1\n").encode(), "text/plain")
        elif m := re.fullmatch(r"/boot/([0-9a-z]{32})/(kernel|initrd)", p):
            tops = list(Path("/nix/store").glob(f"{m.group(1)}-*"))
            self._file(tops[0] / m.group(2) if tops else Path("/nonexistent"))
        elif p == "/nix-cache-info" or re.fullmatch(r"/([0-9a-z]{32}\.narinfo|nar/[\w.]+)", p):
            self._file(s.cache / p.lstrip("/"))
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        m = re.fullmatch(r"/report/([\w-]+)", self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if not m:
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            report = json.loads(body)
        except ValueError:
            self._send(400, b"bad json\n", "text/plain")
            return
        self.server_state.record({"kind": "report", "boot_id": m.group(1), **report})
        self._send(204, b"")


def main() -> None:
    ap = argparse.ArgumentParser()
    for opt in ("--listen", "--url", "--cache", "--state", "--key", "--log"):
        ap.add_argument(opt, required=True)
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    Handler.server_state = Server(args)
    httpd = ThreadingHTTPServer((host, int(port)), Handler)
    print("ready", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
