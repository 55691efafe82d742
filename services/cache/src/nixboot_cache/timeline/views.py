"""Plain-data views of sessions for the HTTP API and the CLI (JSON-ready dicts)."""

from __future__ import annotations

from typing import Any

import msgspec

from nixboot_cache.timeline import session as se
from nixboot_shared import events as ev


def event_view(e: ev.AnyEvent) -> dict[str, Any]:
    d: dict[str, Any] = msgspec.to_builtins(e)
    d.pop("v", None)
    return d


def session_view(
    s: se.Session, number: int, now: float, rules: se.Rules, superseded: bool, with_events: bool
) -> dict[str, Any]:
    tot = se.total(s)
    ivs = se.stages(s)
    view: dict[str, Any] = {
        "boot": number,
        "boot_id": s.boot_id,
        "result": s.result(now, rules, superseded),
        "stage": s.current_stage(),
        # A transfer event is stamped at its end: the first stage may start before the first
        # event (boot.ipxe requested, its late lease stamped after it).
        "start": min([s.start, *(iv.start for iv in ivs)]),
        "last_seen": s.last,
        "seconds": tot.seconds if tot is not None else None,
        "stages": [
            {"stage": iv.stage, "start": iv.start, "end": iv.end, "seconds": iv.seconds}
            for iv in ivs
        ],
    }
    if with_events:
        view["events"] = [event_view(e) for e in s.events]
    return view


def numbered_boots(state: se.MachineBoots, rules: se.Rules) -> list[tuple[int, se.Session]]:
    """(boot number, session) of the sessions that are boots, oldest first."""
    sessions = se.segment(state.events, rules)
    return [(state.first_boot + i, s) for i, s in enumerate(sessions) if s.is_boot()]


def machine_status(state: se.MachineBoots, now: float, rules: se.Rules) -> dict[str, Any] | None:
    boots = numbered_boots(state, rules)
    if not boots:
        return None
    number, s = boots[-1]
    view = session_view(s, number, now, rules, superseded=False, with_events=False)
    view["mac"] = state.mac
    last_booted = next((se.total(b) for _, b in reversed(boots) if se.total(b) is not None), None)
    view["last_boot_seconds"] = last_booted.seconds if last_booted is not None else None
    return view


def machine_timeline(
    state: se.MachineBoots, now: float, rules: se.Rules, boots: int, boot: int | None = None
) -> list[dict[str, Any]]:
    """The machine's latest ``boots`` sessions (or only boot number ``boot``), oldest first."""
    numbered = numbered_boots(state, rules)
    last_number = numbered[-1][0] if numbered else None
    chosen = [(n, s) for n, s in numbered if n == boot] if boot is not None else numbered[-boots:]
    return [
        session_view(s, n, now, rules, superseded=n != last_number, with_events=True)
        for n, s in chosen
    ]
