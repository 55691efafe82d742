"""GC roots for generations: ``<state_dir>/gcroots/<mac-token>/<n>`` -> toplevel, registered with
nix as indirect roots. Syncing is idempotent (roots of kept generations exist, others are gone),
so a builder that crashed between recording and rooting repairs it on the next build."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from nixboot_builder.nix import Nix
from nixboot_shared.records import MachineGenerations

log = logging.getLogger(__name__)


def roots_dir(state_dir: Path, key: str) -> Path:
    return state_dir / "gcroots" / key


async def sync(nix: Nix, state_dir: Path, key: str, record: MachineGenerations) -> None:
    directory = roots_dir(state_dir, key)
    wanted = {str(g.number): g.toplevel for g in record.generations}
    if directory.is_dir():
        for link in directory.iterdir():
            if link.name not in wanted:
                link.unlink()  # the auto root in /nix/var/nix/gcroots/auto now dangles: unpinned
                log.info("gc root dropped: %s", link)
    for name, toplevel in wanted.items():
        link = directory / name
        if link.is_symlink() and str(link.readlink()) == toplevel:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        await nix.add_root(link, toplevel)


def remove_all(state_dir: Path, key: str) -> None:
    shutil.rmtree(roots_dir(state_dir, key), ignore_errors=True)
