"""Secret files that several services create on first start (the API token): they start
together, so the file is raced for. Every racer must get the same, complete secret."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from nixboot_shared.security import read_or_create_secret


def test_racing_creators_all_read_one_whole_secret(tmp_path: Path) -> None:
    with ProcessPoolExecutor(8) as pool:
        for round_ in range(30):
            path = tmp_path / f"round-{round_}" / "api-token"
            got = list(pool.map(read_or_create_secret, [path] * 16))
            assert len(set(got)) == 1 and len(got[0]) == 64, got
            assert path.read_text() == got[0] + "\n"
            assert (path.stat().st_mode & 0o777) == 0o600
            assert os.listdir(path.parent) == ["api-token"]  # nothing left aside


def test_an_existing_secret_is_kept_and_an_empty_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "boot-secret"
    path.write_text("mine\n")
    assert read_or_create_secret(path) == "mine"
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_or_create_secret(path)
