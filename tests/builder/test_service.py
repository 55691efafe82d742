"""The builder service end to end: a real nats-server, the real nix, the service as a process."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nixboot_builder import demo
from nixboot_shared import bus, events
from tests.builder.harness import BuilderProcess, EventLog

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
MAC_C = "52:54:00:00:00:0c"


@pytest.fixture
async def evlog(nats_url: str) -> AsyncIterator[EventLog]:
    log = await EventLog().start(nats_url)
    yield log
    await log.close()


def closure(path: str) -> set[str]:
    out = subprocess.run(["nix-store", "-qR", path], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def name_of(store_path: str) -> str:
    return store_path.split("-", 1)[1]


async def build_and_wait(b: BuilderProcess, evlog: EventLog, body: dict[str, object]) -> list[str]:
    async with b.client() as http:
        r = await http.post("/builds", json=body)
    assert r.status_code == 202, r.text
    ids = [x["build_id"] for x in r.json()["builds"]]

    def finished() -> bool:
        return all(
            evlog.of(events.BuildSucceeded, build_id=i) or evlog.of(events.BuildFailed, build_id=i)
            for i in ids
        )

    await evlog.wait_for(finished, 90, f"builds {ids}")
    return ids


async def test_generations_shared_build_changed_paths_and_gc_roots(
    tmp_path: Path, nats_url: str, flake_dir: Path, evlog: EventLog
) -> None:
    machines = [
        {"mac": MAC_A, "name": "pc-a", "attr": "demo"},
        {"mac": MAC_B, "name": "pc-b", "attr": "demo"},
    ]
    b = BuilderProcess(tmp_path, nats_url, f"path:{flake_dir}", machines, keep=2)
    b.start()
    try:
        # Two machines sharing a configuration: one build, both get generation 1.
        ids = await build_and_wait(b, evlog, {"all": True})
        assert len(ids) == 1
        assert len(evlog.of(events.BuildStarted)) == 1
        await evlog.wait_for(lambda: len(evlog.of(events.GenerationCreated)) == 2)
        async with b.client() as http:
            gens = [(await http.get(f"/machines/{n}/generations")).json() for n in ("pc-a", "pc-b")]
        assert [g["default"] for g in gens] == [1, 1]
        g1 = gens[0]["generations"][0]
        assert g1["toplevel"] == gens[1]["generations"][0]["toplevel"]
        assert g1["kernel"].endswith("/bzImage") and g1["initrd"].endswith("/initrd")
        assert g1["kernel_params"] == "loglevel=4" and g1["init"] == g1["toplevel"] + "/init"
        assert g1["closure_size"] > 0 and g1["flake_rev"].startswith("sha256-")

        # A rebuild of unchanged content makes no new generation.
        await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        async with b.client() as http:
            again = (await http.get("/machines/pc-a/generations")).json()
        assert [g["number"] for g in again["generations"]] == [1]

        # Changing one package: generation 2 differs only in it and its dependents.
        version = "changed-" + flake_dir.parent.name
        demo.set_knob(flake_dir, "appVersion", version)
        await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        async with b.client() as http:
            g = (await http.get("/machines/pc-a/generations")).json()
        assert [x["number"] for x in g["generations"]] == [2, 1]
        old, new = closure(g1["toplevel"]), closure(g["generations"][0]["toplevel"])
        changed = {name_of(p) for p in new - old}
        expected = {f"demo-app-{version}", "system-path", "etc", "nixos-system-demo-24.05"}
        assert changed == expected
        assert {name_of(p) for p in old - new} - {n for n in expected if "app" not in n} == {
            name_of(p) for p in old if "demo-app-" in p
        }
        assert g["generations"][0]["kernel"] == g1["kernel"]  # kernel untouched

        # GC roots: with keep=2, generation 3 drops generation 1's root.
        demo.set_knob(flake_dir, "appVersion", "third-" + flake_dir.parent.name)
        await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        roots = b.state_dir / "gcroots" / "52-54-00-00-00-0a"
        assert sorted(p.name for p in roots.iterdir()) == ["2", "3"]
        # The per-build roots nix made are let go once the numbered roots exist.
        assert list((b.state_dir / "building").iterdir()) == []
        async with b.client() as http:
            g = (await http.get("/machines/pc-a/generations")).json()
        assert [x["number"] for x in g["generations"]] == [3, 2]
        # The shared /nix/store serves other users too, so instead of a global `nix-store --gc`
        # we ask nix to delete each toplevel: it refuses paths that are still rooted.
        for kept in g["generations"]:
            r = subprocess.run(["nix-store", "--delete", kept["toplevel"]], capture_output=True)
            assert r.returncode != 0, f"generation {kept['number']} was not pinned"
        # pc-b still has generation 1 pinned: remove pc-b, then generation 1 is collectable.
        async with b.client() as http:
            assert (await http.delete("/machines/pc-b")).status_code == 204
        r = subprocess.run(["nix-store", "--delete", g1["toplevel"]], capture_output=True)
        assert r.returncode == 0, r.stderr
    finally:
        b.stop()


async def test_killed_builder_request_is_redone(
    tmp_path: Path, nats_url: str, flake_dir: Path, evlog: EventLog
) -> None:
    demo.set_knob(flake_dir, "buildDelaySeconds", 4)
    machines = [{"mac": MAC_C, "name": "pc-c", "attr": "demo"}]
    first = BuilderProcess(tmp_path, nats_url, f"path:{flake_dir}", machines, name="first")
    first.start()
    async with first.client() as http:
        r = await http.post("/builds", json={"machines": ["pc-c"]})
    build_id = r.json()["builds"][0]["build_id"]
    try:
        await evlog.wait_for(lambda: bool(evlog.of(events.BuildStarted, build_id=build_id)))
        first.kill()  # mid-build: the request is unacked
    finally:
        first.stop()
    assert not evlog.of(events.BuildSucceeded, build_id=build_id)
    second = BuilderProcess(tmp_path, nats_url, f"path:{flake_dir}", machines, name="second")
    second.start()
    try:
        await evlog.wait_for(
            lambda: bool(evlog.of(events.BuildSucceeded, build_id=build_id)), 60, "redelivery"
        )
        await evlog.wait_for(lambda: bool(evlog.of(events.GenerationCreated, mac=MAC_C)))
        assert len(evlog.of(events.BuildStarted, build_id=build_id)) == 2
        async with second.client() as http:
            g = (await http.get("/machines/pc-c/generations")).json()
        assert [x["number"] for x in g["generations"]] == [1]
    finally:
        second.stop()


async def test_failing_flake_keeps_generation_and_bad_input_is_refused(
    tmp_path: Path, nats_url: str, flake_dir: Path, evlog: EventLog
) -> None:
    machines = [{"mac": MAC_A, "name": "pc-a", "attr": "demo"}]
    b = BuilderProcess(tmp_path, nats_url, f"path:{flake_dir}", machines)
    b.start()
    try:
        await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        system = flake_dir / "system.nix"
        good = system.read_text()
        # A builder that fails, then an expression that does not evaluate.
        system.write_text(good.replace("chmod +x $out/init", "echo kaput-line; exit 7"))
        (bid,) = await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        (failed,) = evlog.of(events.BuildFailed, build_id=bid)
        assert "failed with exit code 7" in failed.error
        assert "kaput-line" in failed.log_tail
        system.write_text(good.replace("in {", "in {{"))
        (bid,) = await build_and_wait(b, evlog, {"machines": ["pc-a"]})
        (failed,) = evlog.of(events.BuildFailed, build_id=bid)
        assert "syntax error" in failed.error
        system.write_text(good)
        async with b.client() as http:
            g = (await http.get("/machines/pc-a/generations")).json()
            assert [x["number"] for x in g["generations"]] == [1]

            before = (await http.get("/machines")).json()
            r = await http.get("/machines/nosuch")
            assert r.status_code == 404 and "unknown machine" in r.json()["error"]
            bad_mac = {"mac": "52:54:zz:00:00:01", "name": "x", "attr": "demo"}
            r = await http.post("/machines", json=bad_mac)
            assert r.status_code == 422 and "invalid MAC" in r.json()["error"]
            r = await http.post("/machines", json={"mac": MAC_B, "name": "x", "attr": "nope"})
            assert r.status_code == 422 and "no nixosConfigurations.nope" in r.json()["error"]
            assert "demo, lab" in r.json()["error"]
            r = await http.post("/machines", json={"mac": MAC_B, "name": "x", "attr": "a.b"})
            assert r.status_code == 422
            r = await http.post("/machines", json={"mac": MAC_A, "name": "y", "attr": "demo"})
            assert r.status_code == 409
            r = await http.post("/machines/pc-a/pin", json={"number": 9})
            assert r.status_code == 404 and "no generation 9" in r.json()["error"]
            r = await http.post("/builds", json={"machines": ["nosuch"]})
            assert r.status_code == 404
            r = await http.post("/builds", json={"bogus": 1})
            assert r.status_code == 422
            assert (await http.get("/machines")).json() == before
        async with b.client(auth=False) as anon:
            body = {"mac": MAC_B, "name": "x", "attr": "demo"}
            assert (await anon.post("/machines", json=body)).status_code == 401
            assert (await anon.delete("/machines/pc-a")).status_code == 401
            assert (await anon.post("/builds", json={"all": True})).status_code == 401
            anon.headers["Authorization"] = "Bearer wrong"
            assert (await anon.post("/machines/pc-a/pin", json={"number": 1})).status_code == 401
            assert (await anon.get("/machines")).json() == before
        # Runtime add / pin work with the token.
        async with b.client() as http:
            r = await http.post("/machines", json={"mac": MAC_B, "name": "pc-b", "attr": "lab"})
            assert r.status_code == 201, r.text
            r = await http.post("/machines/pc-a/pin", json={"number": 1, "once": True})
            assert r.status_code == 200 and r.json()["next_boot"] == 1
        await evlog.wait_for(lambda: bool(evlog.of(events.GenerationPinned, mac=MAC_A)))
        # A `booted` report leaves the one-shot pin alone: only a menu that makes it the
        # default spends it (nixboot_shared.pins, tested with the tftp and cache services).
        assert evlog.nc is not None
        await bus.publish(evlog.nc.jetstream(), events.StageReported(mac=MAC_A, stage="booted"))
        await asyncio.sleep(0.5)
        async with b.client() as http:
            g = (await http.get("/machines/pc-a/generations")).json()
        assert g["next_boot"] == 1
        # The machine added at run time got its first generation without being asked.
        await evlog.wait_for(lambda: bool(evlog.of(events.GenerationCreated, mac=MAC_B)))
        assert {e.reason for e in evlog.of(events.BuildRequested)} == {"manual", "machine-added"}
    finally:
        b.stop()


async def test_flake_change_is_detected_by_polling(
    tmp_path: Path, nats_url: str, flake_dir: Path, evlog: EventLog
) -> None:
    machines = [{"mac": MAC_A, "name": "pc-a", "attr": "lab"}]
    b = BuilderProcess(
        tmp_path, nats_url, f"path:{flake_dir}", machines, poll_seconds=0.3, fallback_attr="demo"
    )
    b.start()
    try:
        # First start: no generation yet, so the poller builds one by itself.
        await evlog.wait_for(lambda: len(evlog.of(events.GenerationCreated, mac=MAC_A)) == 1)
        demo.set_knob(flake_dir, "kernelParams", "quiet")
        await evlog.wait_for(lambda: len(evlog.of(events.GenerationCreated, mac=MAC_A)) == 2)
        async with b.client() as http:
            g = (await http.get("/machines/pc-a/generations")).json()
        assert g["generations"][0]["kernel_params"] == "quiet"
        reasons = {e.reason for e in evlog.of(events.BuildRequested)}
        assert reasons == {"flake-change"}
        # The fallback configuration (what unknown MACs boot) is built and recorded too.
        await evlog.wait_for(
            lambda: len(evlog.of(events.GenerationCreated, mac=None, attr="demo")) == 2
        )
    finally:
        b.stop()
