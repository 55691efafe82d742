"""The project's demo flake (deploy/demo-flake): our NAR of every path of its closure equals
`nix-store --dump`, and the real nix substitutes the whole closure from our cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nixboot_cache import nar
from tests.cache.cache_helpers import CacheServer, NixFixture
from tests.cache.test_substitute import substitute

FLAKE = Path(__file__).parents[2] / "deploy" / "demo-flake"


@pytest.fixture(scope="module")
def demo_toplevel(nixfx: NixFixture) -> tuple[str, list[str]]:
    dest = nixfx.work / "demo-flake"
    subprocess.run(["sh", str(FLAKE / "prepare.sh"), str(dest)], check=True, timeout=60)
    out = nixfx.run(
        "nix", "build", "--no-link", "--json",
        f"path:{dest}#nixosConfigurations.demo.config.system.build.toplevel",
    ).stdout  # fmt: skip
    top = json.loads(out)[0]["outputs"]["out"]
    paths = json.loads(nixfx.run("nix", "path-info", "--json", "-r", top).stdout)
    return top, [p["path"] for p in paths]


def test_demo_closure_nar_equals_dump(demo_toplevel: tuple[str, list[str]]) -> None:
    _, paths = demo_toplevel
    assert len(paths) >= 8
    for path in paths:
        theirs = subprocess.run(["nix-store", "--dump", path], check=True, capture_output=True)
        assert b"".join(nar.dump(path)) == theirs.stdout, path


def test_demo_closure_substitutes(
    nixfx: NixFixture,
    cache_server: CacheServer,
    demo_toplevel: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    top, paths = demo_toplevel
    substitute(nixfx, cache_server, tmp_path / "root", tmp_path / "xdg", top)
    assert cache_server.metric("nixboot_cache_nar_served_total") == len(paths)
