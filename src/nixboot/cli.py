"""The one nixboot command: run the stack, one service, or ask its state."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Annotated

import typer

from nixboot import demo
from nixboot import status as status_mod
from nixboot.supervisor import SERVICES, Supervisor
from nixboot_shared import replay, subjects
from nixboot_shared.config import Config, ConfigError, load

app = typer.Typer(help="Network boot for fleets of NixOS machines.", no_args_is_help=True)

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $NIXBOOT_CONFIG)."),
]


def _load(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        typer.secho(f"configuration error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def up(config: ConfigOption = None) -> None:
    """Run NATS (embedded unless nats.url is set) and all four services, supervised."""
    cfg = _load(config)
    if config:
        import os

        os.environ["NIXBOOT_CONFIG"] = config

    def say(line: str) -> None:
        typer.echo(f"nixboot: {line}", err=False)
        sys.stdout.flush()

    raise typer.Exit(Supervisor(cfg, say).run_forever())


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")],
    config: ConfigOption = None,
    replay_prefix: Annotated[
        str | None,
        typer.Option(
            "--replay",
            metavar="PREFIX",
            help="Replay mode: consume events republished under PREFIX (`nixboot replay --to "
            "PREFIX`), publish under PREFIX, KV copies, a temporary state dir, ephemeral ports.",
        ),
    ] = None,
) -> None:
    """Run one service in the foreground (containers, systemd)."""
    if service not in SERVICES:
        typer.secho(f"unknown service {service!r}: choose one of {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    if replay_prefix is not None:
        try:
            subjects.check_replay_prefix(replay_prefix)
        except subjects.InvalidPrefix as e:
            typer.secho(f"--replay: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        if service == "builder":
            typer.secho(
                "--replay: the builder has no replay mode: it consumes no events, and its "
                "builds would write the live Nix store and work queue",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(2)
    cfg = _load(config)
    module = importlib.import_module(f"nixboot_{service.replace('-', '_')}.service")
    if replay_prefix is None:
        raise typer.Exit(module.main(cfg))
    with replay.session(cfg, replay_prefix) as replay_cfg:
        code = module.main(replay_cfg)
    raise typer.Exit(code)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Health of each service and the NATS streams and buckets."""
    state = status_mod.collect(_load(config))
    if as_json:
        typer.echo(json.dumps(state, indent=2))
    else:
        for name, s in state["services"].items():
            mark = "healthy" if s["healthy"] else "DOWN"
            typer.echo(f"{name:10} {mark:8} {s['url']}")
        n = state["nats"]
        typer.echo(f"{'nats':10} {'up' if n['connected'] else 'DOWN':8} {n['url']}")
        for kind in ("streams", "buckets"):
            for name, info in n.get(kind, {}).items():
                typer.echo(f"  {name:22} {info}")
    healthy = all(s["healthy"] for s in state["services"].values()) and state["nats"]["connected"]
    raise typer.Exit(0 if healthy else 1)


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Load and validate the configuration; print it as JSON."""
    import msgspec

    typer.echo(msgspec.json.format(msgspec.json.encode(_load(config)), indent=2).decode())


def _mount_service_clis() -> None:
    """Services add their own commands (`nixboot machines …`) as a Typer `app` in `<pkg>.cli`;
    they are merged into the top level."""
    for pkg in (
        "nixboot_builder",
        "nixboot_cache",
        "nixboot_cache.timeline",
        "nixboot_tftp",
        "nixboot_dhcp_hook",
    ):
        try:
            module = importlib.import_module(f"{pkg}.cli")
        except ModuleNotFoundError as e:
            if e.name != f"{pkg}.cli":
                raise
            continue
        app.add_typer(module.app)


_mount_service_clis()
app.add_typer(demo.app, name="demo")


def main() -> None:
    app()
