"""A machine's generation history as pure functions over ``records.MachineGenerations``: add a
build's result, keep the last N, pin. The service stores the result in KV and syncs GC roots."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from nixboot_shared.records import Generation, MachineGenerations


class UnknownGeneration(LookupError):
    pass


@dataclass(frozen=True)
class Added:
    record: MachineGenerations
    created: Generation | None  # None: the newest generation already has this toplevel
    dropped: list[Generation]


def add_build(record: MachineGenerations, new: Generation, keep: int) -> Added:
    """Append ``new`` (its number is assigned here) unless the newest generation has the same
    toplevel; then keep the ``keep`` newest, plus any pinned one so the default never vanishes."""
    ordered = record.newest_first()
    if ordered and ordered[0].toplevel == new.toplevel:
        return Added(record, None, [])
    number = ordered[0].number + 1 if ordered else 1
    created = Generation(
        number=number,
        toplevel=new.toplevel,
        kernel=new.kernel,
        initrd=new.initrd,
        kernel_params=new.kernel_params,
        init=new.init,
        flake_rev=new.flake_rev,
        closure_size=new.closure_size,
        created=new.created,
    )
    everything = [created, *ordered]
    protected = {record.pinned, record.next_boot} - {None}
    kept = [g for i, g in enumerate(everything) if i < keep or g.number in protected]
    dropped = [g for g in everything if g not in kept]
    out = MachineGenerations(
        mac=record.mac,
        generations=sorted(kept, key=lambda g: g.number),
        pinned=record.pinned,
        next_boot=record.next_boot,
    )
    return Added(out, created, dropped)


def set_closure_size(record: MachineGenerations, toplevel: str, size: int) -> MachineGenerations:
    """Fill in the closure size of the generations of ``toplevel`` that have none yet (it is
    measured after the generation is registered); the same record when there is nothing to do."""
    if not any(g.toplevel == toplevel and not g.closure_size for g in record.generations):
        return record
    return msgspec.structs.replace(
        record,
        generations=[
            msgspec.structs.replace(g, closure_size=size)
            if g.toplevel == toplevel and not g.closure_size
            else g
            for g in record.generations
        ],
    )


def pin(record: MachineGenerations, number: int | None, once: bool) -> MachineGenerations:
    """Pin ``number`` as the default (``once``: for the next boot only); ``None`` unpins."""
    if number is not None and number not in {g.number for g in record.generations}:
        have = ", ".join(str(g.number) for g in record.newest_first()) or "none"
        raise UnknownGeneration(f"machine {record.mac} has no generation {number} (has: {have})")
    out = MachineGenerations(
        mac=record.mac,
        generations=list(record.generations),
        pinned=record.pinned,
        next_boot=record.next_boot,
    )
    if once:
        out.next_boot = number
    else:
        out.pinned = number
    return out
