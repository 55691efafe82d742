"""``nixboot demo vm``: see nixboot boot a machine, on one host.

The demo runs its own small stack in a private network namespace (nixboot.vmlab, the same lab
the e2e tests use): nats-server, the four services on the namespace's bridge address, dnsmasq
with the shipped config and hook, the lab's test flake built by the real builder. A QEMU VM
(TCG) with an empty disk PXE-boots through it (iPXE → menu → kernel/initrd over HTTP → stage 1
partitions the disk and fetches the closure from the cache → stage 2 reports ``booted``), and
the cache's timeline of that boot is printed as a table. Everything is removed afterwards
(processes by PID, the namespace); only the store paths the builder made stay in /nix/store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from nixboot.vmlab import VmLabError, initrd
from nixboot.vmlab.lab import Lab, console_lines, new_disk
from nixboot.vmlab.stack import RealStack

app = typer.Typer(no_args_is_help=True, help="See nixboot work on one machine.")

DEMO_MAC = "52:54:00:de:00:01"
TOOLS = ("qemu-system-x86_64", "qemu-img", "dnsmasq", "ip", "ss", "nix", "git", "curl")
MARKERS = ("NIXBOOT-INITRD", "NIXBOOT-STAGE2", "NIXBOOT-BOOTED")
TIMELINE_WAIT = 20.0  # the cache's tracker consumes the event stream asynchronously


def _say(line: str) -> None:
    typer.echo(f"nixboot demo: {line}", err=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"nixboot demo: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _preflight() -> None:
    if os.geteuid() != 0:
        raise _fail("needs root (it creates a network namespace, a bridge and a tap)", 2)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise _fail(
            f"missing programs: {', '.join(missing)} "
            "(apt packages: deploy/packages/e2e.txt, installed by `make deps`)",
            2,
        )


def _terminate_as_exit(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the lab is still torn down."""
    raise SystemExit(128 + signum)


@app.command()
def vm(
    timeout: Annotated[
        float, typer.Option("--timeout", help="seconds the VM may take to boot and power off")
    ] = 240.0,
    cache_dir: Annotated[
        Path,
        typer.Option(
            "--cache-dir", help="where Debian's kernel is unpacked and the test initrd is kept"
        ),
    ] = initrd.DEFAULT_CACHE,
    keep: Annotated[
        bool, typer.Option("--keep", help="keep the work directory (logs, console) afterwards")
    ] = False,
) -> None:
    """Boot a VM (QEMU, TCG) through nixboot's services in a private namespace; print its timeline.

    Needs root. Downloads Debian's kernel package once (unpacked into --cache-dir, never
    installed); takes about a minute on two cores."""
    _preflight()
    if timeout <= 0:
        raise _fail("--timeout must be positive", 2)
    previous = signal.signal(signal.SIGTERM, _terminate_as_exit)
    work = Path(tempfile.mkdtemp(prefix="nixboot-demo-"))
    ok = False
    try:
        ok = _run(work, timeout, cache_dir)
    except VmLabError as e:
        raise _fail(str(e)) from None
    except (RuntimeError, TimeoutError, OSError) as e:
        raise _fail(f"{e} (logs in {work})") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _say(f"work directory kept: {work}")
    if not ok:
        raise typer.Exit(1)


def _run(work: Path, timeout: float, cache_dir: Path) -> bool:
    t0 = time.monotonic()
    _say(f"kernel and test initrd (cached in {cache_dir}) ...")
    files = initrd.build(cache_dir)
    with Lab(work / "lab", name="demo") as lab:
        _say(f"network namespace {lab.ns}: nats-server, cache, builder, dhcp-hook, tftp, dnsmasq")
        stack = RealStack(lab, work / "stack", files, DEMO_MAC)
        stack.start()
        _say("nixboot build (the lab's flake, real Nix) ...")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the timeline only
            built = stack.build()
        _say(f"generation {built.number}: {built.toplevel} ({len(built.paths)} paths)")
        disk = new_disk(work / "vm-disk.qcow2", "512M")
        _say(f"booting VM {DEMO_MAC} (QEMU TCG, iPXE, empty disk), up to {timeout:.0f} s ...")
        result = lab.boot("demo", DEMO_MAC, disk, timeout, MARKERS)
        if result.timed_out or not result.has("NIXBOOT-BOOTED"):
            console = lab.work / "demo.console.log"
            typer.echo(result.console[-3000:], err=True)
            _say(f"the VM did not boot (timed out: {result.timed_out}); console: {console}")
            return False
        session = _booted_session(stack)
        if session is None:
            _say("the VM booted but the cache's timeline does not show it as booted")
            return False
        _print(stack, session, result.seconds, result.console, time.monotonic() - t0)
    return True


def _booted_session(stack: RealStack) -> dict[str, Any] | None:
    deadline = time.monotonic() + TIMELINE_WAIT
    while True:
        try:
            boots: list[dict[str, Any]] = stack.timeline(DEMO_MAC)["boots"]
        except (subprocess.CalledProcessError, KeyError, ValueError):
            boots = []  # the cache answers 404 until its tracker has seen the machine
        if boots and boots[-1]["result"] == "booted":
            return boots[-1]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _print(
    stack: RealStack, session: dict[str, Any], vm_seconds: float, console: str, total: float
) -> None:
    from nixboot_cache.timeline.cli import print_waterfall

    print_waterfall(DEMO_MAC, session)
    per_stage = ", ".join(f"{s['stage']} {s['seconds']:.2f} s" for s in session["stages"])
    print(f"per stage: {per_stage}")
    for e in session.get("events", []):
        if e.get("type") == "stage" and e.get("status") == "done" and e.get("detail"):
            took = f" ({e['seconds']} s)" if e.get("seconds") is not None else ""
            print(f"  {e['stage']}: {e['detail']}{took}")
    stage2 = console_lines(console, "NIXBOOT-STAGE2")
    if stage2:
        print(f"  console: {stage2[0]}")
    print(
        f"QEMU start -> power-off {vm_seconds:.1f} s; whole demo {total:.1f} s "
        f"(cache {stack.url}, in the demo's namespace)"
    )
    sys.stdout.flush()
