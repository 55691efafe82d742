"""The classic stack admins run today, started on loopback by the benchmark: tftpd-hpa serving
the same boot program and pre-rendered menus, nginx serving kernels, initrds and a
`nix copy --to file://…?compression=zstd` binary cache of the same closures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  types {{ text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {www};
  }}
}}
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ClassicStack:
    root: Path
    tftp_port: int = 0
    http_port: int = 0
    procs: tuple[subprocess.Popen[bytes], ...] = ()

    @property
    def tftp_root(self) -> Path:
        return self.root / "tftp"

    @property
    def www(self) -> Path:
        return self.root / "www"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def prepare(self) -> None:
        # Ports first: the pre-rendered menus name the HTTP server.
        self.tftp_port, self.http_port = free_port(socket.SOCK_DGRAM), free_port()
        for d in (self.tftp_root / "pxelinux.cfg", self.www, self.root / "tmp"):
            d.mkdir(parents=True, exist_ok=True)

    def publish_closure(self, toplevel: str, nix_env: dict[str, str]) -> None:
        """`nix copy` the closure into nginx's root as a signed zstd file:// cache, as admins do
        (`nix copy --to 'file://…?compression=zstd&secret-key=…'`)."""
        secret = self.root / "cache-key.sec"
        if not secret.exists():
            subprocess.run(
                [
                    "nix-store",
                    "--generate-binary-cache-key",
                    "classic-1",
                    str(secret),
                    str(self.root / "cache-key.pub"),
                ],
                check=True,
                env=nix_env,
            )
        url = f"file://{self.www}?compression=zstd&secret-key={secret}"
        subprocess.run(
            ["nix", "copy", "--to", url, toplevel], check=True, env=nix_env, capture_output=True
        )

    def public_key(self) -> str:
        return (self.root / "cache-key.pub").read_text().strip()

    def add_boot_file(self, url_path: str, source: Path) -> None:
        dest = self.www / url_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            dest.symlink_to(source.resolve())

    def start(self) -> None:
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, www=self.www, port=self.http_port))
        tftpd = subprocess.Popen(
            [
                shutil.which("in.tftpd") or "/usr/sbin/in.tftpd",
                "--foreground",
                "--secure",
                "--address",
                f"127.0.0.1:{self.tftp_port}",
                str(self.tftp_root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        nginx = subprocess.Popen(
            [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs = (tftpd, nginx)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start: see " + str(self.root / "nginx-error.log"))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(5)
