"""``nixboot machines|build|generations|pin``: the builder's commands. They talk to the builder's
HTTP API (``builder.http`` in the configuration) with the token from the API token file, so the
token check lives in one place."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nixboot_builder import wire
from nixboot_shared.config import Config, ConfigError, load

app = typer.Typer(no_args_is_help=True)
machines_app = typer.Typer(help="The machine registry.", no_args_is_help=True)
app.add_typer(machines_app, name="machines")

console = Console()
URL_ENV = "NIXBOOT_BUILDER_URL"

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $NIXBOOT_CONFIG)."),
]


class Api:
    def __init__(self, config: str | None) -> None:
        try:
            cfg: Config = load(config)
        except ConfigError as e:
            fail(f"configuration error: {e}", 2)
        host = cfg.builder.http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.url = os.environ.get(URL_ENV) or f"http://{host}:{cfg.builder.http.port}"
        self.token_path = cfg.api_token_path()
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _auth(self) -> dict[str, str]:
        try:
            token = self.token_path.read_text().strip()
        except OSError as e:
            fail(f"cannot read the API token ({e}); is this the builder's host and user?", 2)
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, body: Any = None, mutate: bool = False) -> Any:
        headers = self._auth() if mutate else {}
        try:
            r = self.client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as e:
            fail(f"builder at {self.url} unreachable: {e}", 3)
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            fail(f"{message} (HTTP {r.status_code})", 1)
        return r.json() if r.content else None


def fail(message: str, code: int) -> Any:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _labels(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"label {pair!r} is not KEY=VALUE", 2)
        out[key] = value
    return out


@machines_app.command("add")
def machines_add(
    mac: str,
    name: str,
    attr: Annotated[str, typer.Argument(help="nixosConfigurations attribute to boot.")],
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE")] = None,
    replace: Annotated[bool, typer.Option(help="Change the machine if the MAC exists.")] = False,
    config: ConfigOption = None,
) -> None:
    """Register a machine (MAC, name, configuration attribute, labels)."""
    api = Api(config)
    body = {"mac": mac, "name": name, "attr": attr, "labels": _labels(label or [])}
    if replace:
        m = api.call("PUT", f"/machines/{mac}", body, mutate=True)
    else:
        m = api.call("POST", "/machines", body, mutate=True)
    console.print(f"machine {m['name']} ({m['mac']}) boots {m['attr']}", highlight=False)


@machines_app.command("list")
def machines_list(
    config: ConfigOption = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """All registered machines."""
    machines = Api(config).call("GET", "/machines")
    if as_json:
        typer.echo(json.dumps(machines, indent=2))
        return
    table = Table("name", "mac", "attr", "labels")
    for m in machines:
        labels = " ".join(f"{k}={v}" for k, v in sorted(m["labels"].items()))
        table.add_row(m["name"], m["mac"], m["attr"], labels)
    console.print(table)


@machines_app.command("show")
def machines_show(
    machine: Annotated[str, typer.Argument(help="MAC or name.")], config: ConfigOption = None
) -> None:
    """One machine and its generations."""
    data = Api(config).call("GET", f"/machines/{machine}")
    typer.echo(json.dumps(data, indent=2))


@machines_app.command("remove")
def machines_remove(
    machine: Annotated[str, typer.Argument(help="MAC or name.")], config: ConfigOption = None
) -> None:
    """Forget a machine, its generations and their GC roots."""
    Api(config).call("DELETE", f"/machines/{machine}", mutate=True)
    console.print(f"removed {machine}")


@app.command()
def build(
    machines: Annotated[list[str] | None, typer.Argument(help="MACs or names.")] = None,
    all_machines: Annotated[bool, typer.Option("--all", help="Every machine.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show progress and log.")] = False,
    config: ConfigOption = None,
) -> None:
    """Queue builds (machines sharing a configuration share one build)."""
    if all_machines == bool(machines):
        fail("name machines or give --all", 2)
    api = Api(config)
    body: dict[str, Any] = {"all": True} if all_machines else {"machines": machines}
    result = api.call("POST", "/builds", body, mutate=True)
    for b in result["builds"]:
        console.print(f"build {b['build_id']}: {b['attr']} for {', '.join(b['machines'])}")
    if follow:
        ok = all(_follow(api, b["build_id"], b["attr"], result["since"]) for b in result["builds"])
        raise typer.Exit(0 if ok else 1)


def _follow(api: Api, build_id: str, attr: str, since: float) -> bool:
    """Render a build's progress and log lines until it ends; True when it succeeded."""
    columns = (
        TextColumn("[bold]{task.fields[attr]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(attr, total=None, attr=attr, current="queued")
        with api.client.stream(
            "GET", f"/builds/{build_id}/follow", params={"since": since}, timeout=None
        ) as r:
            for raw in r.iter_lines():
                if not raw.strip():
                    continue
                rec = wire.decode_log(raw.encode())
                if rec.kind == "line":
                    progress.console.print(rec.text, highlight=False, markup=False)
                elif rec.kind == "progress":
                    progress.update(
                        task,
                        completed=rec.done,
                        total=max(rec.expected, 1),
                        current=rec.current or "",
                    )
                else:
                    progress.update(task, current="done" if rec.ok else "FAILED")
                    if rec.ok:
                        progress.console.print(f"[green]built[/green] {rec.toplevel}")
                    else:
                        progress.console.print(f"[red]failed:[/red] {rec.text}", markup=True)
                    return bool(rec.ok)
    return False


@app.command()
def generations(
    machine: Annotated[str, typer.Argument(help="MAC or name.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A machine's generations, newest first (* default, ! next boot only)."""
    data = Api(config).call("GET", f"/machines/{machine}/generations")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    import datetime

    table = Table("", "gen", "created", "closure", "flake")
    table.add_column("toplevel", overflow="fold")
    for g in data["generations"]:
        mark = ("*" if g["number"] == data["default"] else "") + (
            "!" if g["number"] == data["next_boot"] else ""
        )
        created = datetime.datetime.fromtimestamp(g["created"]).strftime("%Y-%m-%d %H:%M:%S")
        size = f"{g['closure_size'] / 2**20:.1f} MiB"
        rev = (g["flake_rev"] or "")[:16]
        table.add_row(mark, str(g["number"]), created, size, rev, g["toplevel"])
    console.print(table)


@app.command()
def pin(
    machine: Annotated[str, typer.Argument(help="MAC or name.")],
    number: Annotated[int, typer.Argument(help="Generation number (0 unpins).")],
    once: Annotated[bool, typer.Option("--once", help="Next boot only (rollback).")] = False,
    config: ConfigOption = None,
) -> None:
    """Make a generation the default, or the next boot's only (--once)."""
    body = {"number": number or None, "once": once}
    data = Api(config).call("POST", f"/machines/{machine}/pin", body, mutate=True)
    console.print(f"{machine}: default generation {data['default']}")
