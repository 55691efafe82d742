from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def tftp_root(tmp_path: Path) -> Path:
    """A TFTP root with boot-program-like files; a secret outside it and links leading out."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "prog.0").write_bytes(os.urandom(70_000))
    (root / "exact.efi").write_bytes(os.urandom(512 * 8))  # ends with an empty block
    (root / "empty.c32").write_bytes(b"")
    (root / "sub" / "inner.txt").write_bytes(b"line one\nline two\r\nend\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"TOP-SECRET")
    (root / "link-out").symlink_to(outside / "secret")
    (root / "dir-out").symlink_to(outside)
    (root / "link-in").symlink_to(root / "prog.0")
    os.mkfifo(root / "fifo")
    return root
