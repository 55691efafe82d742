"""``nixboot cache ...`` commands (the CLI merges this ``app`` into its top level)."""

from __future__ import annotations

import typer

from nixboot_cache.service import cache_key
from nixboot_shared import config

app = typer.Typer()
cache_app = typer.Typer(help="The binary cache: keys and maintenance.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command()
def key() -> None:
    """Print the cache's public key (for trusted-public-keys); creates the key on first use."""
    try:
        cfg = config.load()
        typer.echo(str(cache_key(cfg).public()))
    except (config.ConfigError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@cache_app.command()
def status() -> None:
    """Bytes and files in the compressed NAR directory."""
    cfg = config.load()
    nar_dir = cfg.state_path / "cache" / "nar"
    files = list(nar_dir.glob("*.nar.zst")) if nar_dir.is_dir() else []
    total = sum(f.stat().st_size for f in files)
    typer.echo(
        f"{len(files)} NARs, {total / 2**20:.1f} MiB of {cfg.cache.max_bytes / 2**20:.0f} MiB"
    )
