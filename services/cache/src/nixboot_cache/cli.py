"""``nixboot cache ...`` commands."""

from __future__ import annotations

import typer
from nixboot_shared import config

from nixboot_cache.service import cache_key

app = typer.Typer(help="The binary cache: keys and maintenance.", no_args_is_help=True)


@app.command()
def key() -> None:
    """Print the cache's public key (for trusted-public-keys); creates the key on first use."""
    try:
        cfg = config.load()
        typer.echo(str(cache_key(cfg).public()))
    except (config.ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
