"""The real nix client substitutes from our cache into a fresh store root."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cache.cache_helpers import CacheServer, NixFixture


def substitute(nixfx: NixFixture, server: CacheServer, root: Path, xdg: Path, path: str) -> None:
    env = dict(nixfx.env, XDG_CACHE_HOME=str(xdg))
    r = subprocess.run(
        ["nix-store", "--store", f"local?root={root}", "-r", path, "-j16",
         "--option", "substituters", server.url,
         "--option", "trusted-public-keys", server.public_key()],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + server.log.read_text()[-3000:]
    v = subprocess.run(
        ["nix", "store", "verify", "--store", f"local?root={root}", "-r", path,
         "--trusted-public-keys", server.public_key()],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert v.returncode == 0, v.stderr


def nar_gets(server: CacheServer) -> float:
    return server.metric("nixboot_cache_nar_served_total")


def test_substitute_two_generations(
    nixfx: NixFixture, cache_server: CacheServer, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    substitute(nixfx, cache_server, root, tmp_path / "xdg1", nixfx.gen1.toplevel)
    first = nar_gets(cache_server)
    assert first == len(nixfx.gen1.paths)
    assert (root / nixfx.gen1.toplevel.lstrip("/") / "init").is_file()

    substitute(nixfx, cache_server, root, tmp_path / "xdg2", nixfx.gen2.toplevel)
    changed = set(nixfx.gen2.store_paths) - set(nixfx.gen1.store_paths)
    assert len(changed) == 2  # the app and the toplevel
    assert nar_gets(cache_server) - first == len(changed)
