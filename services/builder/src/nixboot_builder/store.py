"""The builder's KV state: machines (``nixboot-machines``) and their generations
(``nixboot-generations``), both keyed by MAC token. Updates are compare-and-set with retries, so
several builder instances and API calls never lose each other's writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from nixboot_shared import subjects
from nixboot_shared.records import Machine, MachineGenerations

# Key of the fallback configuration's generations (what unknown MACs boot); not a MAC token.
FALLBACK_KEY = subjects.FALLBACK_KEY

T = TypeVar("T")


class Conflict(RuntimeError):
    pass


async def _get(kv: KeyValue, key: str, kind: type[T]) -> tuple[T | None, int]:
    """The decoded value and its revision; (None, 0) when missing or deleted."""
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return None, 0
    if not entry.value:
        return None, 0
    return msgspec.json.decode(entry.value, type=kind), entry.revision or 0


async def update(
    kv: KeyValue, key: str, kind: type[T], fn: Callable[[T | None], T | None], attempts: int = 50
) -> T | None:
    """Read-modify-write ``key`` with CAS; ``fn`` returning None deletes. Returns the new value."""
    for _ in range(attempts):
        current, revision = await _get(kv, key, kind)
        new = fn(current)
        if new is not None and new == current:
            return new  # nothing changed: no write (KV watchers see no spurious update)
        try:
            if new is None:
                if current is not None:
                    await kv.delete(key, last=revision)
                return None
            payload = msgspec.json.encode(new)
            if revision == 0:
                await kv.create(key, payload)  # also re-creates a deleted key
            else:
                await kv.update(key, payload, last=revision)
            return new
        except KeyWrongLastSequenceError:
            continue  # someone else wrote in between: read again
    raise Conflict(f"{key}: too many concurrent updates")


class Store:
    def __init__(self, js: JetStreamContext, machines: KeyValue, generations: KeyValue) -> None:
        self.js = js
        self.machines_kv = machines
        self.generations_kv = generations

    async def machines(self) -> list[Machine]:
        out = []
        for key in await self._keys(subjects.KV_MACHINES):
            m, _ = await _get(self.machines_kv, key, Machine)
            if m is not None:
                out.append(m)
        return sorted(out, key=lambda m: m.name)

    async def _keys(self, bucket: str) -> list[str]:
        # KeyValue.keys() (a watcher) was seen here to return early with a partial list; the
        # stream's per-subject state is exact. Deleted keys are listed too and skipped by _get.
        prefix = f"$KV.{bucket}."
        info = await self.js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
        return sorted(s[len(prefix) :] for s in (info.state.subjects or {}))

    async def machine(self, mac: str) -> Machine | None:
        m, _ = await _get(self.machines_kv, subjects.mac_token(mac), Machine)
        return m

    async def put_machine(self, machine: Machine) -> None:
        await self.machines_kv.put(subjects.mac_token(machine.mac), msgspec.json.encode(machine))

    async def delete_machine(self, mac: str) -> None:
        key = subjects.mac_token(mac)
        await self.machines_kv.delete(key)
        await self.generations_kv.delete(key)

    async def generations(self, key: str) -> MachineGenerations | None:
        g, _ = await _get(self.generations_kv, key, MachineGenerations)
        return g

    async def update_generations(
        self,
        key: str,
        mac: str,
        fn: Callable[[MachineGenerations], MachineGenerations],
    ) -> MachineGenerations:
        def apply(current: MachineGenerations | None) -> MachineGenerations:
            return fn(current if current is not None else MachineGenerations(mac=mac))

        result = await update(self.generations_kv, key, MachineGenerations, apply)
        assert result is not None
        return result
