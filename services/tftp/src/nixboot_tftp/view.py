"""The TFTP service's local view of machines, generations and leases.

Filled by KV watches (and LeaseSeen events) on the asyncio thread, read by the TFTP loop thread.
Reads never wait: every value is replaced whole (a dict assignment is atomic under the GIL), and
the one computed value read across threads (the fallback's generations) is recomputed on update.
"""

from __future__ import annotations

import logging
import os

import msgspec

from nixboot_shared import subjects
from nixboot_shared.records import Generation, Lease, Machine, MachineGenerations
from nixboot_shared.subjects import InvalidMac, normalize_mac

log = logging.getLogger(__name__)

STORE_DIR = "/nix/store"


class LocalView:
    def __init__(self, fallback_attr: str = "") -> None:
        self.fallback_attr = fallback_attr
        self.machines: dict[str, Machine] = {}
        self.generations: dict[str, MachineGenerations] = {}
        self.leases: dict[str, Lease] = {}
        self.ip_to_mac: dict[str, str] = {}
        # boot/<hash>/... -> the generation holding that toplevel
        self.by_hash: dict[str, Generation] = {}
        self.fallback: MachineGenerations | None = None
        # The builder's record of the fallback configuration (KV key subjects.FALLBACK_KEY).
        self.fallback_record: MachineGenerations | None = None
        # One-shot pins already used: mac -> number, until the KV record shows it cleared.
        self.consumed_once: dict[str, int] = {}

    # -- updates (asyncio thread) ---------------------------------------------------------------
    def apply(self, bucket: str, key: str, value: bytes | None) -> None:
        """Apply one KV entry (``value`` None: deleted). Bad records are logged and skipped."""
        try:
            if bucket == subjects.KV_MACHINES:
                self._apply_machine(key, value)
            elif bucket == subjects.KV_GENERATIONS:
                self._apply_generations(key, value)
            elif bucket == subjects.KV_LEASES:
                self._apply_lease(key, value)
        except (msgspec.ValidationError, msgspec.DecodeError, InvalidMac, ValueError) as e:
            log.warning("ignoring bad record %s/%s: %s", bucket, key, e)

    def _mac_of_key(self, key: str) -> str:
        return normalize_mac(key)

    def _apply_machine(self, key: str, value: bytes | None) -> None:
        mac = self._mac_of_key(key)
        if value is None:
            self.machines.pop(mac, None)
        else:
            self.machines[mac] = msgspec.json.decode(value, type=Machine)
        self._recompute()

    def _apply_generations(self, key: str, value: bytes | None) -> None:
        if key == subjects.FALLBACK_KEY:
            self.fallback_record = (
                None if value is None else msgspec.json.decode(value, type=MachineGenerations)
            )
            self._recompute()
            return
        mac = self._mac_of_key(key)
        if value is None:
            self.generations.pop(mac, None)
        else:
            rec = msgspec.json.decode(value, type=MachineGenerations)
            self.generations[mac] = rec
            used = self.consumed_once.get(mac)
            if used is not None and rec.next_boot != used:
                del self.consumed_once[mac]  # our clear (or a newer pin) has landed
        self._recompute()

    def _apply_lease(self, key: str, value: bytes | None) -> None:
        if key.startswith("ip."):
            ip = key[3:].replace("-", ".")
            if value is None:
                self.ip_to_mac.pop(ip, None)
            else:
                self.ip_to_mac[ip] = normalize_mac(value.decode().strip().strip('"'))
            return
        mac = self._mac_of_key(key)
        if value is None:
            self.leases.pop(mac, None)
        else:
            self.set_lease(msgspec.json.decode(value, type=Lease))

    def set_lease(self, lease: Lease) -> None:
        mac = normalize_mac(lease.mac)
        self.leases[mac] = lease
        self.ip_to_mac[lease.ip] = mac

    def _recompute(self) -> None:
        by_hash: dict[str, Generation] = {}
        records = list(self.generations.values())
        if self.fallback_record is not None:
            records.append(self.fallback_record)
        for rec in records:
            for gen in rec.generations:
                by_hash[_store_hash(gen.toplevel)] = gen
        self.by_hash = by_hash
        self.fallback = self._fallback_generations()

    def _fallback_generations(self) -> MachineGenerations | None:
        """What unknown machines boot: the builder's record of the fallback configuration (KV
        key subjects.FALLBACK_KEY); before it has one, the generations of the machine of that
        attribute with the newest generation (generations are builds of the attribute, so every
        machine of it has the same ones). Pins belong to machines, never to the fallback."""
        if not self.fallback_attr:
            return None
        rec = self.fallback_record
        if rec is not None and rec.generations:
            return MachineGenerations(mac=rec.mac, generations=list(rec.generations))
        best: MachineGenerations | None = None
        for mac, machine in list(self.machines.items()):
            if machine.attr != self.fallback_attr:
                continue
            rec = self.generations.get(mac)
            if rec is None or not rec.generations:
                continue
            if best is None or _newest(rec) > _newest(best):
                best = rec
        if best is None:
            return None
        # Pins belong to that machine, not to the fallback.
        return MachineGenerations(mac=best.mac, generations=list(best.generations))

    # -- reads (TFTP thread) --------------------------------------------------------------------
    def known(self, mac: str) -> bool:
        return mac in self.machines or mac in self.generations or mac in self.leases

    def mac_for_ip(self, ip: str) -> str | None:
        return self.ip_to_mac.get(ip)

    def generations_for(self, mac: str) -> MachineGenerations | None:
        rec = self.generations.get(mac)
        if rec is None:
            return None
        used = self.consumed_once.get(mac)
        if used is not None and rec.next_boot == used:
            return msgspec.structs.replace(rec, next_boot=None)
        return rec

    def boot_file(self, store_hash: str, which: str) -> str | None:
        """The store path of a generation's kernel/initrd, only if it lies in the Nix store."""
        gen = self.by_hash.get(store_hash)
        if gen is None:
            return None
        path = gen.kernel if which == "kernel" else gen.initrd if which == "initrd" else None
        if not path:
            return None
        real = os.path.realpath(path)
        if not real.startswith(STORE_DIR + "/"):
            return None
        return real


def _store_hash(toplevel: str) -> str:
    return toplevel.removeprefix(STORE_DIR + "/").split("-", 1)[0]


def _newest(rec: MachineGenerations) -> int:
    return max((g.number for g in rec.generations), default=-1)
