"""Print the JetStream event stream as JSON lines (run inside the lab's namespace, where NATS is).

    python -m nixboot.vmlab.eventlog NATS_URL [MAC]

Each line is the decoded event plus ``seq`` (its stream sequence): the order JetStream stored it
in, which is the order the tests assert on. With MAC only that machine's events (its subjects).
"""

from __future__ import annotations

import asyncio
import json
import sys

import msgspec
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from nixboot_shared import events, subjects


async def dump(url: str, mac: str | None) -> None:
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(subjects.EVENTS_STREAM)
        except NotFoundError:
            return
        last = info.state.last_seq
        if last == 0:
            return
        subject = subjects.event_subject("*", mac) if mac else subjects.EVENTS_SUBJECTS
        sub = await js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        out = sys.stdout
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                break  # nothing (more) for this filter up to the stream's end
            seq = msg.metadata.sequence.stream
            ev = events.decode(msg.data)
            row = msgspec.to_builtins(ev)
            row["type"] = ev.kind
            row["seq"] = seq
            out.write(json.dumps(row) + "\n")
            if seq >= last or msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(dump(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
