"""The test flake (nixboot/vmlab/flake) for lab boots, which nixboot's builder builds.

The flake is copied to a work directory together with the boot files it wraps (Debian's kernel,
the test initrd, static busybox, stage1.sh); ``generation.nix`` is the knob that changes one
package between generations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from nixboot.vmlab import deploy_file

HERE = Path(__file__).resolve().parent
FLAKE_TEMPLATE = HERE / "flake"
ATTR = "e2e"

NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes\nsandbox = false\n"


def nix_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_CONFIG"] = NIX_CONFIG
    env["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    return env


def _nix(args: list[str], work: Path) -> str:
    proc = subprocess.run(
        args, capture_output=True, text=True, env=nix_env(work), check=False, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def prepare_flake(work: Path, kernel: Path, initrd: Path, tag: str) -> Path:
    """A flake directory (the test's own copy) for one generation."""
    flake = work / "flake"
    flake.mkdir(parents=True, exist_ok=True)
    for name in ("flake.nix", "system.nix"):
        shutil.copyfile(FLAKE_TEMPLATE / name, flake / name)
    bb = flake / "busybox" / "bin"
    if not (bb / "busybox").exists():
        bb.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("/bin/busybox", bb / "busybox")
        (bb / "busybox").chmod(0o755)
        (bb / "sh").symlink_to("busybox")
    for src, name in (
        (kernel, "kernel"),
        (initrd, "initrd"),
        (deploy_file("nixos", "client", "stage1.sh"), "stage1.sh"),
    ):
        dest = flake / name
        if not dest.exists() or dest.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dest)
    (flake / "generation.nix").write_text(f'{{ tag = "{tag}"; }}\n')
    return flake


def path_sizes(work: Path, toplevel: str) -> dict[str, int]:
    """Store path -> NAR size of every path in ``toplevel``'s closure (what stage 1 fetches)."""
    info = json.loads(_nix(["nix", "path-info", "--json", "-r", toplevel], work))
    return {p["path"]: p["narSize"] for p in info}
