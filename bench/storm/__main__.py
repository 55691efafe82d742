"""bench/storm: a whole room powering on at once, against nixboot and against the classic stack
(tftpd-hpa + nginx + a `nix copy` zstd cache), side by side in one run.

    .venv/bin/python bench/storm [--n 10,50,100,200] [--generations 1,5] [--real-nix 2]
                                 [--json storm.json]

Each simulated machine has its own MAC and boot id: a lease through the real hook command (it runs
beside the boot, as dnsmasq runs it), the boot program and its per-MAC menu over TFTP, kernel and
initrd over HTTP, then the closure as Nix fetches it (narinfos 25 in flight, then NARs 16 at a
time), and its stage reports. A few machines run the real `nix-store -r` instead of the simulation.

Per cell it prints the wall-time ratio, lease → warm started p99 over every warm a lease started
(with the part up to the LeaseSeen event being stored in JetStream: the hook and the dhcp-hook
service; the rest is the cache), and the CPU milliseconds per machine of every process of both
stacks and of the load generator, read from /proc around each storm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpu
import httpx
import machine
import nats
from classic import ClassicStack
from machine import BootResult, Target
from nixboot_stack import NixbootStack, wait_generations

from nixboot_shared import events, menu, records, subjects

REPO = Path(__file__).resolve().parents[2]
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\nexperimental-features = nix-command flakes"}


def mac_of(i: int) -> str:
    return f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def prepare_flake(root: Path, configs: int, payload_kib: int) -> Path:
    flake = root / "flake"
    subprocess.run(["sh", str(REPO / "deploy/demo-flake/prepare.sh"), str(flake)], check=True)
    knobs = (flake / "knobs.nix").read_text()
    (flake / "knobs.nix").write_text(
        knobs.replace("payloadKiB = 64;", f"payloadKiB = {payload_kib};")
    )
    rooms = " ".join(f'nixosConfigurations.room{i} = mkSystem "room{i}";' for i in range(configs))
    (flake / "flake.nix").write_text(
        "{ outputs = { self }: let knobs = import ./knobs.nix;\n"
        "  mkSystem = hostName: import ./system.nix { inherit hostName knobs; };\n"
        f"  in {{ {rooms} }}; }}\n"
    )
    return flake


def render_classic_menus(classic: ClassicStack, gens: dict[str, records.Generation]) -> None:
    """The classic stack's menus are files rendered in advance (same text as nixboot's)."""
    for mac, gen in gens.items():
        spec = menu.MenuSpec(
            mac=mac,
            title="classic",
            generations=records.MachineGenerations(mac=mac, generations=[gen]),
            params=menu.BootParams(
                cache_url=classic.url, public_key="", boot_id="static", boot_token=""
            ),
            timeout_seconds=0,
        )
        name = classic.tftp_root / "pxelinux.cfg" / f"01-{mac.replace(':', '-')}"
        name.write_text(menu.render_pxelinux(spec, classic.url + "/"))
        for which, path in (("kernel", gen.kernel), ("initrd", gen.initrd)):
            classic.add_boot_file(menu.boot_file_path(gen, which), Path(path))


async def real_nix_boot(cache: str, key: str, toplevel: str, root: Path) -> BootResult:
    """A real `nix-store -r` into a fresh root: keeps the simulation honest."""
    result = BootResult("real-nix")
    env = {**NIX_ENV, "XDG_CACHE_HOME": str(root / "xdg")}
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "nix-store",
        "--store",
        f"local?root={root}",
        "-r",
        toplevel,
        "-j16",
        "--option",
        "substituters",
        cache,
        "--option",
        "trusted-public-keys",
        key,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    result.stages["closure"] = time.perf_counter() - t
    result.ok = proc.returncode == 0
    result.error = "" if result.ok else err.decode()[-300:]
    return result


async def storm(
    target: Target,
    cache: str,
    macs: list[str],
    gens: dict[str, records.Generation],
    hook_argv: list[str] | None,
    real_nix: int,
    key: str,
    scratch: Path,
) -> tuple[float, list[BootResult]]:
    hook_queue: asyncio.Queue[str] = asyncio.Queue()

    async def hook_worker() -> None:
        # dnsmasq runs its script one call at a time, beside the boot, not before it.
        while True:
            mac = await hook_queue.get()
            i = macs.index(mac)
            env = {
                "DNSMASQ_VENDOR_CLASS": "PXEClient:Arch:00000:UNDI:002001",
                "DNSMASQ_USER_CLASS0": "iPXE",
                "PATH": os.environ["PATH"],
            }
            assert hook_argv is not None
            p = await asyncio.create_subprocess_exec(
                *hook_argv,
                "add",
                mac,
                f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{(i & 255) + 1}",
                env=env,
            )
            await p.wait()
            hook_queue.task_done()

    async def announce(mac: str) -> None:
        hook_queue.put_nowait(mac)

    worker = asyncio.create_task(hook_worker()) if hook_argv else None
    t0 = time.perf_counter()
    jobs = []
    for i, mac in enumerate(macs):
        if i < real_nix:
            root = scratch / f"root-{target.name}-{i}"
            shutil.rmtree(root, ignore_errors=True)
            jobs.append(real_nix_boot(cache, key, gens[mac].toplevel, root))
        else:
            jobs.append(machine.boot(target, mac, cache, announce if hook_argv else None))
    results = await asyncio.gather(*jobs)
    wall = time.perf_counter() - t0
    if worker is not None:
        await hook_queue.join()
        worker.cancel()
    return wall, list(results)


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def lease_to_warm_ms(stack: NixbootStack, since: float) -> list[tuple[float, float]]:
    """From the event stream: each warm-started against the lease that caused it (same MAC), as
    (lease → warm started, lease → LeaseSeen stored in JetStream) in ms. The second part is the hook
    and the dhcp-hook service; the rest is the cache taking the event and deciding the warm."""
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    leases: dict[str, tuple[float, float]] = {}
    out: list[tuple[float, float]] = []
    sub = await js.subscribe(
        subjects.EVENTS_SUBJECTS,
        ordered_consumer=True,
        config=nats.js.api.ConsumerConfig(
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_TIME,
            opt_start_time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since)) + "Z",
        ),
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            e = events.decode(msg.data)
            if isinstance(e, events.LeaseSeen) and e.mac:
                stored = msg.metadata.timestamp.timestamp()
                leases.setdefault(e.mac, (e.ts, stored))
            elif isinstance(e, events.WarmStarted) and e.mac and e.mac in leases:
                seen, stored = leases[e.mac]
                out.append(((e.ts - seen) * 1000, (stored - seen) * 1000))
    finally:
        await nc.close()
    return out


def summarize(
    label: str, n: int, gens: int, mode: str, wall: float, results: list[BootResult]
) -> dict[str, object]:
    ok = [r for r in results if r.ok]
    stages = sorted({s for r in results for s in r.stages})
    return {
        "stack": label,
        "n": n,
        "generations": gens,
        "mode": mode,
        "wall_s": round(wall, 3),
        "per_machine_ms": round(wall / n * 1000, 2),
        "booted": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "p99_ms": {
            s: round(p([r.stages[s] for r in ok if s in r.stages], 0.99) * 1000, 1) for s in stages
        },
    }


async def render_share(stack: NixbootStack) -> tuple[float, float]:
    """From the tftp service's histogram: renders so far, and the share done within 1 ms."""
    body = httpx.get(f"http://127.0.0.1:{stack.ports['tftp']}/metrics", timeout=5).text
    le_1ms = total = 0.0
    for line in body.splitlines():
        if line.startswith('nixboot_tftp_menu_render_seconds_bucket{le="0.001"}'):
            le_1ms = float(line.split()[-1])
        elif line.startswith("nixboot_tftp_menu_render_seconds_count"):
            total = float(line.split()[-1])
    return total, le_1ms


async def one_cell(
    args: argparse.Namespace,
    stack: NixbootStack,
    classic: ClassicStack,
    targets: dict[str, Target],
    key: str,
    chosen: list[str],
    gens: dict[str, records.Generation],
    n: int,
    g: int,
    mode: str,
    root: Path,
) -> list[dict[str, object]]:
    """`--repeat` alternating runs of both stacks; the row holds the median wall time and the
    per-stage p99 over every run's machines (alternation spreads the machine's noise evenly)."""
    hook_argv = stack.hook_argv()
    walls: dict[str, list[float]] = {"nixboot": [], "classic": []}
    results: dict[str, list[BootResult]] = {"nixboot": [], "classic": []}
    cpu_s: dict[str, dict[str, float]] = {"nixboot": {}, "classic": {}}

    def add_cpu(name: str, used: dict[str, float]) -> None:
        for k, v in used.items():
            cpu_s[name][k] = cpu_s[name].get(k, 0.0) + v

    classic_pids = {"tftpd-hpa": classic.procs[0].pid, "nginx": classic.procs[1].pid}
    warm_ms: list[tuple[float, float]] = []
    renders_before = await render_share(stack)
    for _ in range(args.repeat):
        if mode == "cold":
            stack.restart_cache_cold()
        since = time.time()
        stack_pids = {name: proc.pid for name, proc in stack.procs.items()}
        before = cpu.snapshot(stack_pids)
        wall, res = await storm(
            targets["nixboot"],
            stack.cache_url,
            chosen,
            gens,
            hook_argv,
            args.real_nix,
            key,
            root,
        )
        add_cpu("nixboot", cpu.delta(before, cpu.snapshot(stack_pids)))
        walls["nixboot"].append(wall)
        results["nixboot"] += res
        warm_ms += await lease_to_warm_ms(stack, since)
        before = cpu.snapshot(classic_pids)
        wall, res = await storm(
            targets["classic"],
            classic.url,
            chosen,
            gens,
            None,
            args.real_nix,
            classic.public_key(),
            root,
        )
        add_cpu("classic", cpu.delta(before, cpu.snapshot(classic_pids)))
        walls["classic"].append(wall)
        results["classic"] += res
    renders_after = await render_share(stack)
    rows = []
    for name in ("nixboot", "classic"):
        wall = statistics.median(walls[name])
        row = summarize(name, n, g, mode, wall, results[name])
        row["runs_s"] = [round(w, 3) for w in walls[name]]
        # CPU per machine booted, by process (the hook commands run beside nixboot's storm).
        row["cpu_ms_per_machine"] = {
            k: round(v * 1000 / (n * args.repeat), 2) for k, v in sorted(cpu_s[name].items())
        }
        rows.append(row)
    totals = [t for t, _ in warm_ms]
    rows[0]["lease_to_warm_p99_ms"] = round(p(totals, 0.99), 2) if warm_ms else None
    # Where the time goes: hook + dhcp-hook service (to the event stored), then the cache.
    rows[0]["lease_to_warm_ms"] = [[round(t, 2), round(s, 2)] for t, s in warm_ms]
    count = renders_after[0] - renders_before[0]
    within = renders_after[1] - renders_before[1]
    rows[0]["menu_renders_within_1ms"] = round(within / count, 4) if count else None
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]  # type: ignore[operator]
    print(
        f"N={n:4d} gens={g} {mode:4s}  nixboot {rows[0]['wall_s']:7.2f}s "
        f"({rows[0]['failed']} failed)  classic {rows[1]['wall_s']:7.2f}s  ratio {ratio:.2f}"
        + (
            f"  lease→warm p99 {rows[0]['lease_to_warm_p99_ms']} ms"
            f" (to event stored: p99 {p([s for _, s in warm_ms], 0.99):.2f} ms, n={len(warm_ms)})"
            if warm_ms
            else ""
        ),
        flush=True,
    )
    for row in rows:
        used = row["cpu_ms_per_machine"]
        assert isinstance(used, dict)
        print(
            f"    CPU ms/machine {row['stack']:8}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in used.items() if v >= 0.05),
            flush=True,
        )
    return rows


async def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", default="10,50,100,200")
    ap.add_argument("--generations", default="1,5")
    ap.add_argument("--real-nix", type=int, default=2)
    ap.add_argument("--payload-kib", type=int, default=512)
    ap.add_argument("--json", default="storm.json")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per cell (median)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    gen_counts = [int(x) for x in args.generations.split(",")]
    root = Path(tempfile.mkdtemp(prefix="nixboot-storm-"))
    root.chmod(0o755)  # nginx's workers run as nobody and must read the classic stack's files
    max_n, max_g = max(sizes), max(gen_counts)
    # One room per generation count: room g's machines cycle through g configurations.
    rooms = {g: [mac_of(k * 1000 + i + 1) for i in range(max_n)] for k, g in enumerate(gen_counts)}
    macs = [mac for room in rooms.values() for mac in room]
    print(f"storm: preparing flake with {max_g} configurations in {root}", flush=True)
    flake = prepare_flake(root, max_g, args.payload_kib)
    assign = {mac: f"room{i % g}" for g, room in rooms.items() for i, mac in enumerate(room)}
    # The services run from compiled bytecode, as an installed package does: with
    # PYTHONDONTWRITEBYTECODE set (as in some CI shells) every start of a service, the cold
    # cache's restart included, compiled its imports again (py-spy: seconds of CPU per start, and
    # lazy imports compiled during the first requests of a cold storm).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    stack = NixbootStack(root / "nixboot", flake, list(assign.items()))
    classic = ClassicStack(root / "classic")
    rows: list[dict[str, object]] = []
    try:
        (root / "nixboot").mkdir()
        stack.start()
        print("storm: builder is building the generations …", flush=True)
        gens = await wait_generations(stack.nats_url, macs, timeout=900, poll=0.5)
        classic.prepare()
        for toplevel in sorted({g.toplevel for g in gens.values()}):
            classic.publish_closure(toplevel, NIX_ENV)
        render_classic_menus(classic, gens)
        shutil.copy("/usr/lib/PXELINUX/lpxelinux.0", classic.tftp_root / "lpxelinux.0")
        classic.start()
        key = stack.public_key()
        targets = {
            "nixboot": Target(
                "nixboot", ("127.0.0.1", stack.ports["tftp-udp"]), "lpxelinux.0", True
            ),
            "classic": Target("classic", ("127.0.0.1", classic.tftp_port), "lpxelinux.0", False),
        }
        for g in gen_counts:
            for n in sizes:
                # The machines of the room with g configurations.
                chosen = rooms[g][:n]
                if len(chosen) < n:
                    continue
                for mode in ("cold", "warm"):
                    rows += await one_cell(
                        args, stack, classic, targets, key, chosen, gens, n, g, mode, root
                    )
    finally:
        classic.stop()
        stack.stop()
    print()
    print(
        f"{'stack':8} {'N':>4} {'gens':>4} {'mode':5} {'wall s':>8} {'ms/machine':>10} "
        f"{'failed':>6}  p99 per stage (ms)"
    )
    for r in rows:
        print(
            f"{r['stack']:8} {r['n']:>4} {r['generations']:>4} {r['mode']:5} {r['wall_s']:>8} "
            f"{r['per_machine_ms']:>10} {r['failed']:>6}  {r['p99_ms']}"
            + (
                f"  lease→warm p99 {r['lease_to_warm_p99_ms']} ms,"
                f" menu renders ≤ 1 ms: {r['menu_renders_within_1ms']}"
                if r["stack"] == "nixboot"
                else ""
            )
        )
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.json}; work dir {root}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
