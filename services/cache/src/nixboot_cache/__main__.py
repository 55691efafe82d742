"""``python -m nixboot_cache``: run the cache service alone (config from NIXBOOT_CONFIG / env)."""

from __future__ import annotations

import sys

from nixboot_cache.service import main
from nixboot_shared.config import ConfigError, load

if __name__ == "__main__":
    try:
        cfg = load()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(cfg))
