"""What the e2e VMs boot against: nixboot's real services, inside the lab's network namespace.

``RealStack`` runs a nats-server with JetStream and the four services (``python -m nixboot serve
<svc>``, one TOML config) in the namespace, and dnsmasq as the lab's DHCP server whose lease script
hands every lease to the dhcp-hook service (deploy/dhcp: the shipped dnsmasq config and hook
wrapper, placeholders filled). The builder builds generations from a git copy of the
test flake; the cache serves kernels, initrds, iPXE menus and the closure from the store and takes
stage reports; the tftp service serves lpxelinux and per-MAC menus. The tests drive it the way an
operator does (``nixboot build``, ``nixboot pin --once`` in the namespace) and read what happened
from the JetStream event stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nixboot_dhcp_hook.hook
from nixboot.vmlab import REPO, closure, deploy_file
from nixboot.vmlab.initrd import TestBootFiles
from nixboot.vmlab.lab import SERVER_IP, Lab

VENV_BIN = Path(sys.executable).parent
NATS_PORT = 4222
CACHE_PORT = 8080
BUILDER_PORT = 8081
DHCP_HOOK_PORT = 8082
TFTP_HTTP_PORT = 8083
MACHINE_NAME = "vm1"
FALLBACK_ATTR = "e2e-fallback"  # nixboot/vmlab/flake: what unregistered MACs boot

SYSTEM_PYTHON = "/usr/bin/python3"  # what a DHCP server's host runs the hook with


@dataclass(frozen=True)
class Built:
    """A generation the builder recorded, with its closure's NAR sizes (from the store)."""

    number: int
    toplevel: str
    paths: dict[str, int]


class RealStack:
    def __init__(self, lab: Lab, work: Path, files: TestBootFiles, mac: str) -> None:
        self.lab = lab
        self.work = work
        self.files = files
        self.mac = mac
        self.state = work / "state"
        self.config = work / "nixboot.toml"
        self.flake = work / "flake-repo" / "flake"
        self.url = f"http://{SERVER_IP}:{CACHE_PORT}"
        self.nats_url = f"nats://127.0.0.1:{NATS_PORT}"
        self.env = closure.nix_env(work)
        self.env["NIXBOOT_CONFIG"] = str(self.config)
        self.env["PYTHONPATH"] = str(REPO)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._init_flake("v1")
        self._write_config()
        self.lab.spawn(
            [
                str(VENV_BIN / "nats-server"),
                "-js",
                "-sd",
                str(self.work / "jetstream"),
                "-a",
                "127.0.0.1",
                "-p",
                str(NATS_PORT),
            ],
            self.work / "nats.log",
        )
        self.lab.wait_listening(NATS_PORT)
        for svc, port in (
            ("cache", CACHE_PORT),
            ("builder", BUILDER_PORT),
            ("dhcp-hook", DHCP_HOOK_PORT),
            ("tftp", TFTP_HTTP_PORT),
        ):
            self.lab.spawn(
                [sys.executable, "-m", "nixboot", "serve", svc, "--config", str(self.config)],
                self.work / f"{svc}.log",
                env=self.env,
            )
            # the cache first: it writes the signing key the tftp service puts in its menus
            self.lab.wait_listening(port, timeout=60)
        self.lab.wait_listening(69, "u")
        sock = self.state / "dhcp-hook.sock"  # where the hook command delivers leases
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dhcp-hook service did not create {sock}")
            time.sleep(0.05)
        self.hook = self._render_hook()
        self.lab.start_dnsmasq(self.url, self.hook)

    def restart_dhcp(self, pxelinux: bool) -> None:
        self.lab.stop_dnsmasq()
        self.lab.start_dnsmasq(self.url, self.hook, pxelinux=pxelinux)

    def _render_hook(self) -> Path:
        """deploy/dhcp/nixboot-dhcp-hook.sh, filled in as an install would."""
        text = deploy_file("dhcp", "nixboot-dhcp-hook.sh").read_text()
        for key, value in {
            "PYTHON": SYSTEM_PYTHON,
            "HOOK_PY": nixboot_dhcp_hook.hook.__file__,
            "STATE_DIR": str(self.state),
        }.items():
            text = text.replace(f"@{key}@", value)
        hook = self.work / "nixboot-dhcp-hook"
        hook.write_text(text)
        hook.chmod(0o755)
        return hook

    def _write_config(self) -> None:
        self.config.write_text(
            f"""state_dir = "{self.state}"
log_level = "INFO"
menu_timeout_seconds = 1
fallback_attr = "{FALLBACK_ATTR}"

[nats]
url = "{self.nats_url}"

[cache]
public_url = "{self.url}"
[cache.http]
host = "{SERVER_IP}"
port = {CACHE_PORT}

[tftp]
host = "{SERVER_IP}"
port = 69
[tftp.http]
port = {TFTP_HTTP_PORT}

[builder]
flake = "git+file://{urllib.parse.quote(str(self.flake))}"
poll_seconds = 0
keep_generations = 5
[builder.http]
port = {BUILDER_PORT}

[dhcp_hook.http]
port = {DHCP_HOOK_PORT}

[[machines]]
mac = "{self.mac}"
name = "{MACHINE_NAME}"
attr = "{closure.ATTR}"
"""
        )

    # ------------------------------------------------------------------ the flake (git)
    def _git(self, *args: str) -> None:
        subprocess.run(
            ["git", "-C", str(self.flake), *args],
            check=True,
            capture_output=True,
            env={
                **os.environ,
                "GIT_AUTHOR_NAME": "e2e",
                "GIT_AUTHOR_EMAIL": "e2e@nixboot",
                "GIT_COMMITTER_NAME": "e2e",
                "GIT_COMMITTER_EMAIL": "e2e@nixboot",
            },
        )

    def _init_flake(self, tag: str) -> None:
        closure.prepare_flake(self.flake.parent, self.files.kernel, self.files.initrd, tag)
        self._git("init", "-q", "-b", "main")
        self._git("add", "-A")
        self._git("commit", "-q", "-m", f"generation {tag}")

    def set_knob(self, tag: str) -> None:
        """Change the flake's knob (one package) and commit, as an operator's push would."""
        (self.flake / "generation.nix").write_text(f'{{ tag = "{tag}"; }}\n')
        self._git("commit", "-q", "-a", "-m", f"generation {tag}")

    # ------------------------------------------------------------------ operator commands
    def nixboot(self, *args: str, timeout: float = 300.0) -> str:
        """``nixboot ARGS`` in the namespace (where the builder's API listens)."""
        proc = subprocess.run(
            self.lab.exec_argv([sys.executable, "-m", "nixboot", *args]),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"nixboot {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def build(self) -> Built:
        """``nixboot build vm1 --follow``; return the newest generation the builder recorded."""
        before = self.generations()["generations"]
        t0 = time.monotonic()
        self.nixboot("build", MACHINE_NAME, "--follow")
        gens = self.generations()
        newest = gens["generations"][0]
        print(f"\n== builder: generation {newest['number']} in {time.monotonic() - t0:.1f} s")
        assert not before or newest["number"] > before[0]["number"], (before, gens)
        return Built(
            newest["number"], newest["toplevel"], closure.path_sizes(self.work, newest["toplevel"])
        )

    def build_all(self) -> None:
        """``nixboot build --all --follow``: every machine's configuration and the fallback."""
        self.nixboot("build", "--all", "--follow")

    def timeline(self, mac: str) -> dict[str, Any]:
        """GET <cache>/boots/<mac>/timeline (the cache's boot tracker), from the namespace."""
        proc = subprocess.run(
            self.lab.exec_argv(["curl", "-sS", "-m", "5", f"{self.url}/boots/{mac}/timeline"]),
            capture_output=True,
            text=True,
            check=True,
        )
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def generations(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.nixboot("generations", MACHINE_NAME, "--json"))
        return data

    def pin_once(self, number: int) -> None:
        self.nixboot("pin", MACHINE_NAME, str(number), "--once")

    # ------------------------------------------------------------------ observations
    def events(self, since_seq: int = 0, mac: str | None = None) -> list[dict[str, Any]]:
        """A machine's events (default: the VM's) from JetStream, in stream order, after
        ``since_seq``."""
        proc = subprocess.run(
            self.lab.exec_argv(
                [sys.executable, "-m", "nixboot.vmlab.eventlog", self.nats_url, mac or self.mac]
            ),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=True,
        )
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return [r for r in rows if r["seq"] > since_seq]

    def last_seq(self, mac: str | None = None) -> int:
        rows = self.events(mac=mac)
        return rows[-1]["seq"] if rows else 0

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a Prometheus sample of the cache's /metrics (``labels``: a substring)."""
        proc = subprocess.run(
            self.lab.exec_argv(["curl", "-sS", "-m", "5", f"{self.url}/metrics"]),
            capture_output=True,
            text=True,
            check=True,
        )
        total = 0.0
        for line in proc.stdout.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total
