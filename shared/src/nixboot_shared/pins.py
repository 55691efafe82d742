"""One-shot pins: ONE rule for every menu server (GRUB's ``next_entry``).

``MachineGenerations.next_boot = N`` makes generation N the default of the next menu served to
the machine. The pin is consumed when a menu that makes it the default is served (tftp: after
the pxelinux.cfg transfer completed; cache: when the iPXE menu is answered), not when the machine
reports it booted: a boot that fails half-way must fall back to the newest generation, as GRUB
does after a failed ``grub-reboot``.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from nixboot_shared import subjects
from nixboot_shared.records import MachineGenerations

log = logging.getLogger(__name__)

ATTEMPTS = 10


def once_made_default(record: MachineGenerations | None) -> int | None:
    """The one-shot pin a menu rendered from ``record`` makes default, if any (a pin naming a
    generation that no longer exists makes nothing default and is left alone)."""
    if record is None or record.next_boot is None:
        return None
    default = record.default()
    if default is None or default.number != record.next_boot:
        return None
    return record.next_boot


async def consume_next_boot(kv: KeyValue, mac: str, number: int) -> bool:
    """Compare-and-set the machine's ``next_boot`` from ``number`` back to None in the
    generations bucket. True when this call consumed it; False when it was already gone or
    changed meanwhile (a newer pin is never cleared by an older menu)."""
    key = subjects.mac_token(mac)
    for _ in range(ATTEMPTS):
        try:
            entry = await kv.get(key)
        except NotFoundError:  # KeyNotFoundError too
            return False
        if entry.value is None:
            return False
        rec = msgspec.json.decode(entry.value, type=MachineGenerations)
        if rec.next_boot != number:
            return False
        rec.next_boot = None
        try:
            await kv.update(key, msgspec.json.encode(rec), last=entry.revision)
            return True
        except KeyWrongLastSequenceError:
            continue  # changed under us: read again
    log.error("could not consume the one-shot pin of %s after %d attempts", mac, ATTEMPTS)
    return False
