"""The bundled demo flake (deploy/demo-flake): where it lives and how to make a usable copy.

The flake's derivations use a static busybox as their builder; the binary is not committed, so a
copy of the flake is prepared (by ``deploy/demo-flake/prepare.sh``) in a directory of its own and
referred to as a ``path:`` flake, which sees every file (a flake inside a git checkout would only
see tracked files).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

DEMO_FLAKE_ENV = "NIXBOOT_DEMO_FLAKE_DIR"


class DemoFlakeMissing(RuntimeError):
    pass


def source_dir() -> Path:
    """deploy/demo-flake of the checkout this package runs from (or ``$NIXBOOT_DEMO_FLAKE_DIR``)."""
    override = os.environ.get(DEMO_FLAKE_ENV)
    if override:
        return Path(override)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "deploy" / "demo-flake"
        if (candidate / "flake.nix").is_file():
            return candidate
    raise DemoFlakeMissing(
        "demo flake not found: set builder.flake, or NIXBOOT_DEMO_FLAKE_DIR to deploy/demo-flake"
    )


def prepare(dest: Path, busybox: str = "/bin/busybox") -> str:
    """Copy the demo flake (plus busybox) into ``dest``, keeping knobs already there; return its
    ``path:`` flake reference."""
    script = source_dir() / "prepare.sh"
    subprocess.run(["sh", str(script), str(dest), busybox], check=True, capture_output=True)
    return f"path:{dest.resolve()}"


def set_knob(flake_dir: Path, name: str, value: str | int) -> None:
    """Rewrite one knob in ``flake_dir/knobs.nix`` (tests, benchmarks, `make run` demos)."""
    path = flake_dir / "knobs.nix"
    text = path.read_text()
    literal = str(value) if isinstance(value, int) else '"' + value.replace('"', '\\"') + '"'
    pattern = rf"(?m)^(\s*{re.escape(name)}\s*=\s*)[^;]*;"
    new, count = re.subn(pattern, lambda m: f"{m.group(1)}{literal};", text)
    if count != 1:
        raise KeyError(f"knob {name!r} not found in {path}")
    path.write_text(new)
