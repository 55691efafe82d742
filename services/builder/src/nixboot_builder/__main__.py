"""``python -m nixboot_builder``: run the builder service alone (config from NIXBOOT_CONFIG)."""

from __future__ import annotations

import faulthandler
import signal
import sys

from nixboot_builder.service import main
from nixboot_shared.config import ConfigError, load

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: dump every thread's stack
    try:
        config = load()
    except ConfigError as e:
        print(f"nixboot builder: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(main(config))
