"""Generations for e2e boots, built by real Nix from the test flake (tests/e2e/flake).

The flake is copied to a work directory together with the boot files it wraps (Debian's kernel,
the test initrd, static busybox, stage1.sh); ``generation.nix`` is the knob that changes one
package between generations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nixboot_shared.records import Generation

HERE = Path(__file__).resolve().parent
FLAKE_TEMPLATE = HERE / "flake"
STAGE1 = HERE.parents[1] / "deploy" / "nixos" / "client" / "stage1.sh"
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


@dataclass(frozen=True)
class BuiltGeneration:
    toplevel: str
    paths: dict[str, int]  # store path -> NAR size

    def record(self, number: int) -> Generation:
        """The KV record the menus render from (what the builder service writes)."""
        top = Path(self.toplevel)
        return Generation(
            number=number,
            toplevel=self.toplevel,
            kernel=os.readlink(top / "kernel"),
            initrd=os.readlink(top / "initrd"),
            kernel_params=(top / "kernel-params").read_text().strip(),
            init=f"{self.toplevel}/init",
            closure_size=sum(self.paths.values()),
        )


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
    for src, name in ((kernel, "kernel"), (initrd, "initrd"), (STAGE1, "stage1.sh")):
        dest = flake / name
        if not dest.exists() or dest.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dest)
    (flake / "generation.nix").write_text(f'{{ tag = "{tag}"; }}\n')
    return flake


def build(work: Path, flake: Path) -> BuiltGeneration:
    """Build the toplevel with real Nix; return it with its closure's NAR sizes."""
    ref = f"path:{flake}#nixosConfigurations.{ATTR}.config.system.build.toplevel"
    out = json.loads(
        _nix(
            ["nix", "build", "--json", "--out-link", str(work / f"result-{flake.name}"), ref], work
        )
    )
    toplevel = out[0]["outputs"]["out"]
    info = json.loads(_nix(["nix", "path-info", "--json", "-r", toplevel], work))
    return BuiltGeneration(toplevel=toplevel, paths={p["path"]: p["narSize"] for p in info})


def publish(work: Path, toplevel: str, cache_dir: Path, secret_key: Path) -> None:
    """Sign and copy a closure into a file:// binary cache (the interim cache, until the cache
    service serves from the store itself)."""
    _nix(
        [
            "nix",
            "copy",
            "--to",
            f"file://{cache_dir}?compression=zstd&secret-key={secret_key}",
            toplevel,
        ],
        work,
    )


def generate_key(work: Path, name: str = "nixboot-e2e-1") -> tuple[Path, str]:
    sk, pk = work / "cache.sk", work / "cache.pk"
    if not sk.exists():
        _nix(["nix-store", "--generate-binary-cache-key", name, str(sk), str(pk)], work)
    return sk, pk.read_text().strip()
