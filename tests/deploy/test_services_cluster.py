"""The four real services on a real 3-node NATS cluster (JetStream R3), each on another node:
a lease posted to dhcp-hook (node A) makes the cache (node B) warm the machine's generation,
built by the builder (node C), and tftp (node C) serves its per-MAC menu. Node A is SIGKILLed
while leases keep coming: no event lost (counted by id in the stream), the services reconnect
(healthz 200), KV intact; node A restarted catches up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import nats
import pytest

from nixboot_builder import demo
from nixboot_shared import events, menu, records, subjects

from .natsproc import NatsNode, free_port
from .test_nats_cluster import cluster, until_available, wait_caught_up

__all__ = ["cluster"]  # the fixture, imported for this module's tests

# A ceiling for a hang, not an expected duration (about 15 s here). Each wait below is its own
# generous ceiling (cluster start 90 s, services healthy 60 s, first nix build 120 s, events 90 s,
# catch-up 2 x 60 s, ...); 400 s lets several steps be slow at once on a loaded CI machine.
pytestmark = pytest.mark.timeout(400)

MAC = "52:54:00:5c:a1:01"
NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes"


def free_udp_port() -> int:
    return free_port()  # free for UDP too, below the ephemeral range


class Service:
    """``nixboot serve <name>`` as a process; ``nats_url`` names its home node only: the other
    nodes are learnt from the cluster's INFO (what a client reconnects to when its node dies)."""

    def __init__(self, name: str, port: int, config: Path, nats_url: str, work: Path) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = work / f"{name}.log"
        env = dict(os.environ, NIXBOOT_CONFIG=str(config), NIXBOOT_NATS__URL=nats_url)
        env["NIX_CONFIG"] = NIX_CONFIG
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nixboot", "serve", name],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def healthz(self) -> int:
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    async def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.healthz() != 200:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"{self.name} unhealthy: {self.log.read_text()[-3000:]}"
            )
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


def write_config(work: Path, ports: dict[str, int], tftp_port: int, flake: str) -> Path:
    state = work / "state"
    cfg = work / "nixboot.toml"
    cfg.write_text(f"""state_dir = "{state}"
menu_timeout_seconds = 1
[nats]
replicas = 3
[cache]
public_url = "http://127.0.0.1:{ports["cache"]}"
[cache.http]
host = "127.0.0.1"
port = {ports["cache"]}
[tftp]
host = "127.0.0.1"
port = {tftp_port}
[tftp.http]
port = {ports["tftp"]}
[builder]
flake = "{flake}"
poll_seconds = 0
[builder.http]
port = {ports["builder"]}
[dhcp_hook]
socket = "{work / "hook.sock"}"
[dhcp_hook.http]
port = {ports["dhcp-hook"]}
[[machines]]
mac = "{MAC}"
name = "pc-1"
attr = "demo"
""")
    return cfg


async def stream_events(url: str) -> list[events.AnyEvent]:
    """Every message of the events stream, read by sequence (no consumer needed)."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await until_available(lambda: js.stream_info(subjects.EVENTS_STREAM))
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await until_available(lambda s=seq: js.get_msg(subjects.EVENTS_STREAM, s))  # type: ignore[misc]
            out.append(events.decode(msg.data or b""))
        return out
    finally:
        await nc.close()


async def test_services_on_three_nodes_survive_a_node_loss(
    cluster: list[NatsNode], tmp_path: Path
) -> None:
    work = tmp_path
    a, b, c = cluster
    flake_dir = work / "flake"
    demo.prepare(flake_dir)
    demo.set_knob(flake_dir, "appVersion", f"cluster{os.getpid()}-{time.monotonic_ns()}")
    ports = {s: free_port() for s in ("cache", "tftp", "builder", "dhcp-hook")}
    tftp_port = free_udp_port()
    config = write_config(work, ports, tftp_port, f"path:{flake_dir.resolve()}")
    home = {"dhcp-hook": a, "cache": b, "tftp": c, "builder": c}
    services: dict[str, Service] = {}
    try:
        # The cache first: the tftp service puts its public key in menus.
        for name in ("cache", "builder", "dhcp-hook", "tftp"):
            services[name] = Service(name, ports[name], config, home[name].url, work)
            await services[name].wait_healthy()
        token = (work / "state" / "api-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}

        watch = await nats.connect(c.url)  # the test's own view, through node C
        seen: list[events.AnyEvent] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            seen.append(events.decode(msg.data))

        await watch.subscribe("nixboot.evt.>", cb=on_msg)

        async def wait_event(pred: object, timeout: float = 90) -> events.AnyEvent:
            deadline = time.monotonic() + timeout
            while True:
                for e in seen:
                    if pred(e):  # type: ignore[operator]
                        return e
                assert time.monotonic() < deadline, [type(e).__name__ for e in seen]
                await asyncio.sleep(0.1)

        # The builder (node C) builds the machine's generation 1.
        async with httpx.AsyncClient(base_url=services["builder"].url, headers=auth) as http:
            r = await http.post("/builds", json={"all": True})
            assert r.status_code == 202, r.text
        created = await wait_event(lambda e: isinstance(e, events.GenerationCreated), 120)
        assert isinstance(created, events.GenerationCreated)
        toplevel = created.toplevel
        # The build is counted before BuildSucceeded goes out (GenerationCreated comes earlier).
        await wait_event(lambda e: isinstance(e, events.BuildSucceeded), 60)
        builder_metrics = httpx.get(services["builder"].url + "/metrics").text
        assert 'nixboot_builder_builds_total{result="ok"} 1.0' in builder_metrics
        assert "nixboot_builder_build_seconds_count 1.0" in builder_metrics

        posted: list[str] = []

        async def post_lease(http: httpx.AsyncClient, mac: str, ip: str) -> None:
            """As a DHCP server's hook would: retry while the service answers 503."""
            deadline = time.monotonic() + 60
            while True:
                try:
                    r = await http.post("/leases", json={"mac": mac, "ip": ip, "kind": "new"})
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 202:
                    posted.append(r.json()["id"])
                    return
                assert r is None or r.status_code == 503, r.text
                assert time.monotonic() < deadline, "dhcp-hook never took the lease"
                await asyncio.sleep(0.2)

        hook = httpx.AsyncClient(base_url=services["dhcp-hook"].url, headers=auth, timeout=40)
        try:
            # A lease on node A -> the cache on node B warms the generation.
            await post_lease(hook, MAC, "10.0.0.10")
            await wait_event(
                lambda e: isinstance(e, events.WarmFinished) and e.toplevel == toplevel
            )
            # tftp on node C serves the per-MAC menu naming that generation.
            menu_file = work / "menu"
            name = f"pxelinux.cfg/01-{MAC.replace(':', '-')}"
            r = subprocess.run(
                ["curl", "-sS", "--max-time", "20", f"tftp://127.0.0.1:{tftp_port}/{name}",
                 "-o", str(menu_file)], capture_output=True, timeout=30,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            text = menu_file.read_text()
            assert f"KERNEL boot/{menu.store_hash(toplevel)}/kernel" in text, text
            assert f"nixboot.toplevel={toplevel} " in text

            # Leases keep coming; node A (the dhcp-hook's) dies after 10 of 40.
            for i in range(40):
                if i == 10:
                    a.kill()
                await post_lease(hook, f"52:54:00:5c:b0:{i:02x}", f"10.0.1.{i + 1}")
            # The machine leases another address after the loss (the same grant again within
            # seconds would be a retransmit, not an event): the cache still warms on it.
            n_warm = sum(isinstance(e, events.WarmFinished) for e in seen)
            await post_lease(hook, MAC, "10.0.0.11")
        finally:
            await hook.aclose()
        await wait_event(lambda e: sum(isinstance(x, events.WarmFinished) for x in seen) > n_warm)

        # Every service is connected again (the dhcp-hook to a node it learnt from the cluster).
        for s in services.values():
            await s.wait_healthy(30)
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", f"tftp://127.0.0.1:{tftp_port}/{name}"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0 and f"boot/{menu.store_hash(toplevel)}/".encode() in r.stdout

        # No lease event lost or doubled: every id the hook answered is in the stream once.
        stored = await stream_events(b.url)
        lease_ids = [e.id for e in stored if isinstance(e, events.LeaseSeen)]
        assert len(posted) == 42
        assert sorted(lease_ids) == sorted(set(posted)) and len(set(posted)) == 42

        # KV state intact, read through a surviving node.
        js = watch.jetstream()
        gens = await until_available(lambda: js.key_value(subjects.KV_GENERATIONS))
        entry = await until_available(lambda: gens.get(subjects.mac_token(MAC)))
        mg = msgspec.json.decode(entry.value or b"", type=records.MachineGenerations)
        assert [g.toplevel for g in mg.generations] == [toplevel]
        leases = await until_available(lambda: js.key_value(subjects.KV_LEASES))
        assert (await until_available(lambda: leases.get(subjects.ip_key("10.0.1.40")))).value

        # Node A restarted on its store catches up with what it missed.
        a.start()
        await wait_caught_up(watch, subjects.EVENTS_STREAM, a.name, timeout=60)
        await wait_caught_up(watch, f"KV_{subjects.KV_GENERATIONS}", a.name, timeout=60)
        from_a = await stream_events(a.url)
        assert [e.id for e in from_a][: len(stored)] == [e.id for e in stored]
        await watch.close()
    finally:
        for s in services.values():
            s.stop()
