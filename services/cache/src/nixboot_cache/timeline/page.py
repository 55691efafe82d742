"""The status page at ``/``: one server-rendered HTML table, no scripts, no build step."""

from __future__ import annotations

import datetime as dt
import html
import time
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from nixboot_cache.timeline import views
from nixboot_cache.timeline.tracker import Tracker
from nixboot_shared import records, subjects

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.booted { color: #17702d; } .failed, .abandoned { color: #b3261e; } .active { color: #8a5a00; }
"""


def _ago(now: float, ts: float) -> str:
    s = max(0, int(now - ts))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _get(kv: KeyValue | None, key: str, kind: type[Any]) -> Any:
    if kv is None:
        return None
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return msgspec.json.decode(entry.value, type=kind)
    except msgspec.DecodeError:
        return None


async def render(tracker: Tracker, kv: dict[str, KeyValue]) -> str:
    now = time.time()
    rows = []
    for token, state in sorted(tracker.machines.items()):
        status = views.machine_status(state, now, tracker.rules)
        if status is None:
            continue
        machine = await _get(kv.get(subjects.KV_MACHINES), token, records.Machine)
        gens = await _get(kv.get(subjects.KV_GENERATIONS), token, records.MachineGenerations)
        default = gens.default() if gens is not None else None
        last = status["last_boot_seconds"]
        cells = [
            f'<a href="/boots/{token}/timeline">{html.escape(state.mac)}</a>',
            html.escape(machine.name if machine is not None else "-"),
            f'<span class="{status["result"]}">{html.escape(status["stage"])}</span>',
            html.escape(status["result"]),
            html.escape(_ago(now, status["last_seen"])),
            f"{last:.1f} s" if last is not None else "-",
            str(default.number) if default is not None else "-",
        ]
        classes = ["", "", "", "", "", "n", "n"]
        rows.append(
            "<tr>"
            + "".join(f'<td class="{c}">{v}</td>' for c, v in zip(classes, cells, strict=True))
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("MAC", "name", "stage", "result", "last seen", "last boot", "generation")
    )
    body = "\n".join(rows) or '<tr><td colspan="7">no boots seen yet</td></tr>'
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>nixboot</title>"
        f'<meta http-equiv="refresh" content="10"><style>{STYLE}</style></head><body>'
        f"<h1>nixboot machines</h1><table><thead><tr>{head}</tr></thead><tbody>{body}"
        "</tbody></table><p><a href=/boots>/boots</a> · <a href=/metrics>/metrics</a></p>"
        "</body></html>"
    )
