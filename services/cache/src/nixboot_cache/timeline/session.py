"""Boot sessions: which events belong to one boot of one machine, and how long each stage took.

Pure functions over a machine's retained events; no I/O, no clock (``now`` is a parameter). The
sessions are *derived* from the set of events every time, never built up incrementally, so the
arrival order of events cannot change the result: late, duplicated and out-of-order events give
the same sessions and stages as a perfectly ordered stream. Order is by event ``ts``.

Conventions the producers follow (docs/observability.md):
- ``BootFileRequested`` is published when a transfer ends; ``seconds`` is its duration, so the
  request happened at ``ts - seconds``. With ``seconds == 0`` the transfer's end is unknown and
  the next event of the session closes it.
- A boot id first appears on ``MenuServed``; later events of that boot carry it.
- A lease event's ``ts`` is when the DHCP server's script ran, after the ACK: on the iPXE path
  (``boot.ipxe`` asked for over HTTP within milliseconds) it may be a little *after* the boot
  program's request. Such a late lease still is the boot's (see ``_boot_lease``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from nixboot_shared import events as ev

# Stages in boot order; the label values of nixboot_boot_stage_duration_seconds{stage}.
STAGES = ("dhcp", "bootloader", "menu", "kernel", "initrd", "stage1", "closure", "activation")
Result = Literal["active", "booted", "failed", "abandoned"]
FINAL_RESULTS = ("booted", "failed", "abandoned")

# Events that describe one machine's boot. Leases that end (release, expire) say nothing about a
# boot; build and progress events concern no single boot.
# How much later than the boot program's request the boot's own lease event may be stamped.
LATE_LEASE_SECONDS = 5.0
# A boot program is asked for right after the DHCP ACK: a lease older than this before the request
# is an earlier one (the running system's renewal) when a late lease of this boot is there.
LEASE_TO_PROGRAM_SECONDS = 60.0

BOOT_EVENT_TYPES = (ev.LeaseSeen, ev.BootFileRequested, ev.MenuServed, ev.StageReported)
TIMELINE_ONLY_TYPES = (ev.WarmStarted, ev.WarmFinished)


def is_boot_event(event: ev.Event) -> bool:
    if event.mac is None:
        return False
    if isinstance(event, ev.LeaseSeen):
        return event.lease_kind in ("new", "renew")
    return isinstance(event, BOOT_EVENT_TYPES + TIMELINE_ONLY_TYPES)


@dataclass(frozen=True)
class Rules:
    """Where one boot ends and the next begins."""

    # A gap this long between two events of a machine starts a new session.
    gap_seconds: float = 900.0
    # The newest session without an outcome is abandoned this long after its last event.
    abandon_seconds: float = 900.0


@dataclass(frozen=True)
class Interval:
    stage: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        # Services' clocks differ by a little: a negative interval is skew, not a duration.
        return max(0.0, self.end - self.start)


@dataclass
class Session:
    events: list[ev.AnyEvent] = field(default_factory=list)
    # Boot ids seen in this session, first first (a menu fetched twice renders two).
    boot_ids: list[str] = field(default_factory=list)

    @property
    def boot_id(self) -> str | None:
        return self.boot_ids[0] if self.boot_ids else None

    @property
    def start(self) -> float:
        return self.events[0].ts

    @property
    def last(self) -> float:
        return self.events[-1].ts

    @property
    def key(self) -> str:
        """Stable enough to remember that a session's metrics were recorded."""
        return self.boot_id or self.events[0].id

    def terminal(self) -> ev.StageReported | None:
        for e in self.events:
            if _is_terminal(e):
                assert isinstance(e, ev.StageReported)
                return e
        return None

    def is_boot(self) -> bool:
        """A session of only leases is a running OS renewing its address, not a boot."""
        return any(not isinstance(e, (ev.LeaseSeen, *TIMELINE_ONLY_TYPES)) for e in self.events)

    def result(self, now: float, rules: Rules, superseded: bool) -> Result:
        t = self.terminal()
        if t is not None:
            return "booted" if _is_booted(t) else "failed"
        if superseded or now - self.last >= rules.abandon_seconds:
            return "abandoned"
        return "active"

    def current_stage(self) -> str:
        """The stage the machine is in now (or the last it reached)."""
        t = self.terminal()
        if t is not None:
            return "booted" if _is_booted(t) else "failed"
        points = _points(self)
        # The stage after the last completed one, named by what has started.
        started = [
            s
            for s, begun in (
                ("dhcp", points.lease is not None),
                ("bootloader", points.boot_program is not None),
                ("menu", points.menu is not None),
                ("kernel", points.kernel is not None),
                ("initrd", points.initrd is not None),
                ("stage1", points.stage1 is not None),
                ("closure", points.disk is not None),
                ("activation", points.closure is not None),
            )
            if begun
        ]
        return started[-1] if started else "dhcp"


def _is_booted(e: ev.StageReported) -> bool:
    return e.stage == "booted" or (e.stage == "stage2" and e.status == "done")


def _is_terminal(e: ev.AnyEvent) -> bool:
    if not isinstance(e, ev.StageReported):
        return False
    return _is_booted(e) or e.stage == "failed" or e.status == "failed"


def _is_boot_program(e: ev.AnyEvent) -> bool:
    return isinstance(e, ev.BootFileRequested) and e.file_kind == "boot-program"


def _starts_boot(e: ev.AnyEvent) -> bool:
    return isinstance(e, ev.LeaseSeen) or _is_boot_program(e)


def order_key(e: ev.Event) -> tuple[float, str]:
    return (e.ts, e.id)


def segment(events: list[ev.AnyEvent], rules: Rules) -> list[Session]:
    """Split one machine's events (any order, no duplicates) into sessions, oldest first.

    A new session begins at: a lease or boot-program request after the session's outcome; any
    event after a gap of ``rules.gap_seconds``; an event carrying a boot id other than the
    session's (the machine rebooted: its trailing lease and boot-program request, which carry no
    boot id yet, move along into the new session: ``_take_reboot_prefix``). A menu rendered
    again before the kernel was asked for (the boot loader fetched it twice) is the same boot:
    its boot id is adopted.
    """
    sessions: list[Session] = []
    cur: Session | None = None
    for e in sorted(events, key=order_key):
        if cur is not None and _opens_new(cur, e, rules):
            nxt = Session()
            if _other_boot_id(cur, e):
                nxt.events = _take_reboot_prefix(cur, e)
            sessions.append(cur)
            cur = nxt
        if cur is None:
            cur = Session()
        cur.events.append(e)
        if e.boot_id is not None and e.boot_id not in cur.boot_ids:
            cur.boot_ids.append(e.boot_id)
    if cur is not None:
        sessions.append(cur)
    return [s for s in sessions if s.events]


def _other_boot_id(cur: Session, e: ev.AnyEvent) -> bool:
    return e.boot_id is not None and bool(cur.boot_ids) and e.boot_id not in cur.boot_ids


def _opens_new(cur: Session, e: ev.AnyEvent, rules: Rules) -> bool:
    if not cur.events:
        return False
    if e.ts - cur.last >= rules.gap_seconds:
        return True
    if _other_boot_id(cur, e):
        return not _menu_fetched_again(cur, e)
    return cur.terminal() is not None and _starts_boot(e)


def _menu_fetched_again(cur: Session, e: ev.AnyEvent) -> bool:
    """``e`` is another menu render within the same boot: nothing past the menu happened yet,
    and no lease since the session's last event with a boot id."""
    is_menu = isinstance(e, ev.MenuServed) or (
        isinstance(e, ev.BootFileRequested) and e.file_kind == "menu"
    )
    if not is_menu:
        return False
    last_with_id = max(i for i, x in enumerate(cur.events) if x.boot_id is not None)
    for i, x in enumerate(cur.events):
        if isinstance(x, ev.StageReported) or (
            isinstance(x, ev.BootFileRequested) and x.file_kind in ("kernel", "initrd")
        ):
            return False
        if i > last_with_id and isinstance(x, ev.LeaseSeen):
            return False
    return True


def _take_reboot_prefix(cur: Session, e: ev.AnyEvent) -> list[ev.AnyEvent]:
    """Remove and return the events that began the boot ``e`` belongs to: from ``cur``'s last
    lease on (when that lease is not the session's first event), those that carry no boot id.

    The boot-program requests right before that lease (or, with no such lease, right before
    ``e``), within LATE_LEASE_SECONDS, go along: a lease's script may run after the machine asked
    for its boot program (iPXE path), and its lease may even come after the menu."""
    evs = cur.events
    lease = next((i for i in range(len(evs) - 1, 0, -1) if isinstance(evs[i], ev.LeaseSeen)), None)
    start = len(evs) if lease is None else lease
    anchor = e.ts if lease is None else evs[lease].ts
    while (
        start > 1
        and _is_boot_program(evs[start - 1])
        and evs[start - 1].boot_id is None
        and anchor - evs[start - 1].ts <= LATE_LEASE_SECONDS
    ):
        start -= 1
    moved = [x for x in evs[start:] if x.boot_id is None]
    cur.events = evs[:start] + [x for x in evs[start:] if x.boot_id is not None]
    return moved


@dataclass
class _Points:
    lease: float | None = None
    boot_program: float | None = None
    menu: float | None = None
    kernel: float | None = None
    kernel_done: float | None = None
    initrd: float | None = None
    initrd_done: float | None = None
    stage1: float | None = None
    disk: float | None = None
    closure: float | None = None
    booted: float | None = None


def _transfer(session: Session, kind: str) -> tuple[float | None, float | None]:
    """First request and last successful end of the transfers of one file kind."""
    start: float | None = None
    end: float | None = None
    evs = session.events
    for i, e in enumerate(evs):
        if not (isinstance(e, ev.BootFileRequested) and e.file_kind == kind):
            continue
        requested = e.ts - e.seconds if e.seconds > 0 else e.ts
        start = requested if start is None else min(start, requested)
        if e.result != "ok":
            continue
        if e.seconds > 0:
            done: float | None = e.ts
        else:
            # Its end is unknown: the machine's next event shows it had the file by then.
            done = next((n.ts for n in evs[i + 1 :] if n.ts > e.ts), None)
        if done is not None:
            end = done if end is None else max(end, done)
    return start, end


def _first(session: Session, test: Callable[[ev.AnyEvent], bool]) -> float | None:
    return next((e.ts for e in session.events if test(e)), None)


def _boot_lease(leases: list[float], program: float | None, kernel: float | None) -> float | None:
    """When the lease that started this boot was granted, as far as the events tell.

    The last lease before the boot program was asked for (a stage-1 DHCP request later in the
    boot is not it). When the first lease stamped just after the request (LATE_LEASE_SECONDS,
    and before the kernel was asked for) is there and no lease precedes the request closely
    (LEASE_TO_PROGRAM_SECONDS; a renewal by the system that ran before may), that late one is
    the boot's: its script ran after the client had already used the address, so it was granted
    no later than the request, which is the best time known for it (a ``dhcp`` stage of 0 s).
    """
    if program is None:
        return max(leases) if leases else None
    before = [t for t in leases if t <= program]
    late = [
        t
        for t in leases
        if program < t <= program + LATE_LEASE_SECONDS and (kernel is None or t < kernel)
    ]
    if before and (not late or program - max(before) <= LEASE_TO_PROGRAM_SECONDS):
        return max(before)
    return program if late else None


def _points(session: Session) -> _Points:
    p = _Points()
    p.boot_program, _ = _transfer(session, "boot-program")
    p.kernel, p.kernel_done = _transfer(session, "kernel")
    leases = [e.ts for e in session.events if isinstance(e, ev.LeaseSeen)]
    p.lease = _boot_lease(leases, p.boot_program, p.kernel)
    p.menu = _first(session, lambda e: isinstance(e, ev.MenuServed))
    if p.menu is None:
        p.menu = _transfer(session, "menu")[1]
    p.initrd, p.initrd_done = _transfer(session, "initrd")

    def reported(stage: str, status: str) -> float | None:
        return _first(
            session,
            lambda e: isinstance(e, ev.StageReported) and e.stage == stage and e.status == status,
        )

    p.stage1 = reported("stage1", "started") or reported("stage1", "done") or p.initrd_done
    p.disk = reported("disk", "done")
    p.closure = reported("closure", "done")
    t = session.terminal()
    p.booted = t.ts if t is not None and _is_booted(t) else None
    return p


def stages(session: Session) -> list[Interval]:
    """The stage intervals whose both ends are known, in boot order."""
    p = _points(session)
    pairs = {
        "dhcp": (p.lease, p.boot_program),
        "bootloader": (p.boot_program, p.menu),
        "menu": (p.menu, p.kernel),
        "kernel": (p.kernel, p.kernel_done),
        "initrd": (p.initrd, p.initrd_done),
        "stage1": (p.stage1, p.disk),
        "closure": (p.disk, p.closure),
        "activation": (p.closure, p.booted),
    }
    return [
        Interval(stage, start, end)
        for stage, (start, end) in pairs.items()
        if start is not None and end is not None
    ]


def total(session: Session) -> Interval | None:
    """The whole boot: from the lease (or the first event) to ``booted``."""
    p = _points(session)
    if p.booted is None:
        return None
    start = p.lease if p.lease is not None else session.start
    return Interval("total", start, p.booted)


class MachineBoots(msgspec.Struct, kw_only=True):
    """What the tracker keeps per machine (KV ``nixboot-boots``, key: MAC token)."""

    mac: str
    events: list[ev.AnyEvent] = msgspec.field(default_factory=list)
    # Events older than this were dropped with their sessions; a later arrival that old is ignored.
    horizon: float = 0.0
    # Keys of sessions whose outcome was counted in the metrics (newest last, bounded).
    counted: list[str] = msgspec.field(default_factory=list)
    # Boot number of the oldest retained session (boots are numbered 1, 2, ... per machine).
    first_boot: int = 1


def add_event(state: MachineBoots, event: ev.AnyEvent, rules: Rules, keep_sessions: int) -> bool:
    """Add one event; drop the oldest sessions beyond ``keep_sessions``. Return False (and change
    nothing) for a duplicate id or an event older than what was already dropped."""
    if event.ts < state.horizon or any(e.id == event.id for e in state.events):
        return False
    state.events.append(event)
    state.events.sort(key=order_key)
    sessions = segment(state.events, rules)
    if len(sessions) > keep_sessions:
        dropped = sessions[: len(sessions) - keep_sessions]
        kept = sessions[len(sessions) - keep_sessions :]
        state.first_boot += len(dropped)
        state.horizon = kept[0].start
        state.events = sorted((e for s in kept for e in s.events), key=order_key)
    return True


@dataclass(frozen=True)
class Outcome:
    """A finished session to record in the metrics."""

    key: str
    result: Result
    stages: list[Interval]
    total: Interval | None


def settled(
    state: MachineBoots, now: float, rules: Rules, settle_seconds: float, max_counted: int = 64
) -> list[Outcome]:
    """Sessions whose outcome is final and not yet counted; marks them counted in ``state``.

    A booted or failed session is final once every stage is known or ``settle_seconds`` passed
    after its outcome, so that slightly late transfer events still make it into the metrics.
    """
    out: list[Outcome] = []
    sessions = segment(state.events, rules)
    counted = set(state.counted)
    for i, s in enumerate(sessions):
        # A session without a boot id is keyed by its first event; a late event may become
        # its new first event, so any of its events being a counted key means counted.
        if not s.is_boot() or s.key in counted or any(e.id in counted for e in s.events):
            continue
        result = s.result(now, rules, superseded=i < len(sessions) - 1)
        if result == "active":
            continue
        ivs = stages(s)
        t = s.terminal()
        if (
            result != "abandoned"
            and t is not None
            and len(ivs) < len(STAGES)
            and now - t.ts < settle_seconds
            and i == len(sessions) - 1
        ):
            continue
        out.append(Outcome(s.key, result, ivs, total(s)))
        state.counted.append(s.key)
    del state.counted[:-max_counted]
    return out
