"""`nixboot cache key` prints the key the service signs with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nixboot_cache import signing


def test_cache_key_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXBOOT_")}
    env["NIXBOOT_STATE_DIR"] = str(tmp_path)
    nixboot = Path(sys.executable).parent / "nixboot"
    out = subprocess.run([str(nixboot), "cache", "key"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pub = signing.PublicKey.parse(out.stdout.strip())
    assert pub.name == "nixboot-1"
    assert (tmp_path / "cache-key.pub").read_text().strip() == out.stdout.strip()
    assert oct((tmp_path / "cache-key.sec").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([str(nixboot), "cache", "key"], env=env, capture_output=True, text=True)
    assert again.stdout == out.stdout
    env["NIXBOOT_CACHE__SECRET_KEY_FILE"] = str(tmp_path / "missing")
    bad = subprocess.run([str(nixboot), "cache", "key"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "error:" in bad.stderr
