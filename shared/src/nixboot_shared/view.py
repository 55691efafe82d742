"""A local, always-current mirror of a KV bucket, kept by a watch. Readers (menu rendering on the
TFTP hot path) look values up in a dict and never wait on NATS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = logging.getLogger(__name__)

T = TypeVar("T")


class KvMirror(Generic[T]):
    def __init__(self, kv: KeyValue, decode: Callable[[bytes], T]) -> None:
        self._kv = kv
        self._decode = decode
        self.values: dict[str, T] = {}
        self.ready = asyncio.Event()

    def get(self, key: str) -> T | None:
        return self.values.get(key)

    async def run(self) -> None:
        """Watch forever; the nats client re-creates the ordered consumer across reconnects."""
        watcher = await self._kv.watchall()
        async for entry in watcher:
            if entry is None:  # end of the initial snapshot
                self.ready.set()
                continue
            if entry.operation in (KV_DEL, KV_PURGE):
                self.values.pop(entry.key, None)
                continue
            try:
                self.values[entry.key] = self._decode(entry.value or b"")
            except Exception as e:  # a bad value must not stop the mirror
                log.error("bucket %s key %s: undecodable value: %s", self._kv._name, entry.key, e)
