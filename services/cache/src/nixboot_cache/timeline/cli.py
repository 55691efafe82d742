"""Debugging commands over the event stream and the boot sessions (mounted into ``nixboot``):

nixboot events [--mac M] [--type T] [--since 10m | --start-seq N] [--until T] [--follow]
               [--json] [--dump FILE]
nixboot timeline MAC [--boot N] [--json]
nixboot replay [--mac M] [--type T] --since T [--until T] [--speed max|original] --to PREFIX
nixboot replay --load FILE --to PREFIX
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, NotFoundError
from rich.console import Console
from rich.table import Table

from nixboot_cache.timeline import replay as replay_mod
from nixboot_cache.timeline import session as se
from nixboot_cache.timeline import stream, views
from nixboot_shared import bus, config, subjects

app = typer.Typer(no_args_is_help=True, help="Boot events, timelines and replay.")
T = TypeVar("T")

SERVER_HELP = (
    "NATS URL (default: NIXBOOT_NATS__URL, the config's nats.url, else the embedded NATS of "
    "`nixboot up`); authentication and TLS always come from the configuration"
)


# How long a command waits for NATS before giving up with an error.
CONNECT_TIMEOUT = 10.0


def _server(explicit: str | None) -> tuple[str, config.NatsConfig]:
    """The URL and the authentication/TLS settings: the configuration's (with no ``nats.url``,
    the embedded server of ``nixboot up`` and its generated password); ``--server`` replaces
    only the URL."""
    try:
        settings = config.load().nats_client()
    except config.ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    return (explicit or settings.url), settings


def _run(server: str | None, work: Callable[[Client], Awaitable[T]]) -> T:
    async def main() -> T:
        url, settings = _server(server)
        shown = bus.redact(url)
        try:
            nc = await asyncio.wait_for(
                bus.connect(url, "nixboot-cli", settings=settings), timeout=CONNECT_TIMEOUT
            )
        except TimeoutError:
            # bus.connect retries what may be transient (a reset, a server still starting) and
            # logs each try; a TimeoutError itself has no text, so say what happened.
            raise typer.BadParameter(
                f"cannot use NATS at {shown}: no connection within {CONNECT_TIMEOUT:g} s"
            ) from None
        except (OSError, bus.NatsRefused) as e:
            raise typer.BadParameter(f"cannot use NATS at {shown}: {e}") from None
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(main())
    except stream.BadQuery as e:
        raise typer.BadParameter(str(e)) from None
    except KeyboardInterrupt:  # --follow ends with Ctrl-C
        raise typer.Exit(130) from None


def _query(
    mac: str | None,
    kind: str | None,
    since: str | None,
    start_seq: int | None,
    until: str | None,
) -> stream.Query:
    if since is not None and start_seq is not None:
        raise typer.BadParameter("use either --since or --start-seq")
    now = time.time()
    try:
        q = stream.Query(
            since=stream.parse_time(since, now) if since else None,
            start_seq=start_seq,
            until=stream.parse_time(until, now) if until else None,
            mac=mac,
            kind=kind,
        )
        q.filter_subject()
    except stream.BadQuery as e:
        raise typer.BadParameter(str(e)) from None
    return q


def _fmt_ts(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _summary(event: dict[str, Any]) -> str:
    skip = {"id", "ts", "mac", "type", "boot_id"}
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in skip and v not in (None, ""))


@app.command()
def events(
    mac: str | None = typer.Option(None, "--mac", help="only this machine"),
    kind: str | None = typer.Option(None, "--type", help="only this event type (lease, stage...)"),
    since: str | None = typer.Option(None, "--since", help="start time: 10m, 2h, Unix or ISO"),
    start_seq: int | None = typer.Option(None, "--start-seq", help="start at stream sequence"),
    until: str | None = typer.Option(None, "--until", help="skip events after this time"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    dump: Annotated[
        Path | None, typer.Option("--dump", help="write raw events as JSON lines")
    ] = None,
    server: str | None = typer.Option(None, "--server", "-s", help=SERVER_HELP),
) -> None:
    """Print events stored in the JetStream event stream."""
    q = _query(mac, kind, since, start_seq, until)

    async def work(nc: Client) -> int:
        out = dump.open("wb") if dump is not None else None
        n = 0
        try:
            async for stored in stream.read(nc.jetstream(), q, follow=follow):
                n += 1
                if out is not None:
                    out.write(stored.data.rstrip(b"\n") + b"\n")
                    continue
                if stored.event is None:
                    line = {"seq": stored.seq, "subject": stored.subject, "undecodable": True}
                    print(json.dumps(line) if as_json else f"{stored.seq:>8} {stored.subject} ?")
                    continue
                e = views.event_view(stored.event)
                if as_json:
                    print(json.dumps({"seq": stored.seq, **e}), flush=follow)
                else:
                    print(
                        f"{stored.seq:>8} {_fmt_ts(stored.event.ts)} {e['type']:<14} "
                        f"{e.get('mac') or '-':<17} {_summary(e)}",
                        flush=follow,
                    )
        finally:
            if out is not None:
                out.close()
        return n

    n = _run(server, work)
    if dump is not None:
        print(f"wrote {n} events to {dump}", file=sys.stderr)


@app.command()
def timeline(
    mac: str = typer.Argument(..., help="the machine's MAC address"),
    boot: int | None = typer.Option(None, "--boot", help="boot number (default: the latest)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    server: str | None = typer.Option(None, "--server", "-s", help=SERVER_HELP),
) -> None:
    """Show one boot's stages as a waterfall table (from KV nixboot-boots)."""
    try:
        token = subjects.mac_token(mac)
    except subjects.InvalidMac as e:
        raise typer.BadParameter(str(e)) from None
    cfg_rules = _rules()

    async def work(nc: Client) -> bytes | None:
        try:
            kv = await nc.jetstream().key_value(subjects.KV_BOOTS)
            entry = await kv.get(token)
        except (NotFoundError, KeyNotFoundError):
            return None
        return entry.value

    raw = _run(server, work)
    if not raw:
        typer.echo(f"no boots recorded for {subjects.normalize_mac(mac)}", err=True)
        raise typer.Exit(1)
    state = msgspec.json.decode(raw, type=se.MachineBoots)
    sessions = views.machine_timeline(state, time.time(), cfg_rules, boots=1, boot=boot)
    if not sessions:
        typer.echo(f"boot {boot} of {state.mac} is not kept", err=True)
        raise typer.Exit(1)
    s = sessions[0]
    if as_json:
        print(json.dumps({"mac": state.mac, **s}))
        return
    print_waterfall(state.mac, s)


def print_waterfall(mac: str, s: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=100)
    total = s["seconds"]
    head = f"{mac} boot {s['boot']} ({s['boot_id'] or 'no boot id'}): {s['result']}"
    head += f", {total:.2f} s" if total is not None else f", now in {s['stage']}"
    table = Table(title=head, title_justify="left")
    for col, justify in (("stage", "left"), ("start", "right"), ("seconds", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("", min_width=40)
    t0 = s["start"]
    end = max([st["end"] for st in s["stages"]] + [s["last_seen"]])
    span = max(end - t0, 1e-9)
    width = 40
    for st in s["stages"]:
        a = int((st["start"] - t0) / span * width)
        b = max(a + 1, int((st["end"] - t0) / span * width))
        bar = " " * a + "█" * (min(b, width) - a)
        table.add_row(st["stage"], f"+{st['start'] - t0:.2f}", f"{st['seconds']:.3f}", bar)
    console.print(table)


def _rules() -> se.Rules:
    try:
        t = config.load().timeline
    except config.ConfigError:
        t = config.TimelineConfig()
    return se.Rules(gap_seconds=t.gap_seconds, abandon_seconds=t.abandon_seconds)


@app.command()
def replay(
    to: str = typer.Option(..., "--to", help="subject prefix to republish under"),
    mac: str | None = typer.Option(None, "--mac", help="only this machine"),
    kind: str | None = typer.Option(None, "--type", help="only this event type"),
    since: str | None = typer.Option(None, "--since", help="start time: 10m, 2h, Unix or ISO"),
    start_seq: int | None = typer.Option(None, "--start-seq", help="start at stream sequence"),
    until: str | None = typer.Option(None, "--until", help="skip events after this time"),
    speed: str = typer.Option("max", "--speed", help="max, or original (keep the gaps)"),
    load: Annotated[
        Path | None, typer.Option("--load", help="republish a --dump file instead")
    ] = None,
    server: str | None = typer.Option(None, "--server", "-s", help=SERVER_HELP),
) -> None:
    """Republish past events under PREFIX.nixboot.evt...; live subjects stay untouched.
    A service consumes them with `nixboot serve <service> --replay PREFIX` (start it first)."""
    try:
        stream.check_prefix(to)
    except stream.BadQuery as e:
        raise typer.BadParameter(str(e)) from None
    if load is not None:
        payloads = _read_dump(load)

        async def from_file(nc: Client) -> int:
            for subject, data in payloads:
                await nc.publish(f"{to}.{subject}", data)
            await nc.flush()
            return len(payloads)

        n = _run(server, from_file)
    else:
        if since is None and start_seq is None:
            raise typer.BadParameter("give --since or --start-seq (or --load FILE)")
        q = _query(mac, kind, since, start_seq, until)
        n = _run(server, lambda nc: replay_mod.republish(nc, nc.jetstream(), q, to, speed))
    print(f"republished {n} events under {to}.", file=sys.stderr)


def _read_dump(path: Path) -> list[tuple[str, bytes]]:
    from nixboot_shared import events as ev

    out: list[tuple[str, bytes]] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = ev.decode(line)
        except ev.BadEvent as e:
            raise typer.BadParameter(f"{path}:{i}: {e}") from None
        out.append((event.subject, line))
    return out


if __name__ == "__main__":
    app()
