"""Bad input against the running stack: schemathesis over every service's OpenAPI, the cache's
plain routes by an explicit list, undecodable messages on every consumer's NATS subject, and the
TFTP option abuse tests/tftp does not already cover."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import httpx
import nats
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixboot_shared import events, subjects
from tests.faults.stack import SERVICES, FaultStack

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"/")
# POST /builds queues real nix builds: it gets its auth test in test_security, not a fuzz.
NOT_FUZZED = {("POST", "/builds")}


def metric(stack: FaultStack, service: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.url(service)}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("auth", [False, True], ids=["anonymous", "token"])
def test_openapi_fuzz_no_5xx_no_traceback(stack: FaultStack, service: str, auth: bool) -> None:
    base = stack.url(service)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {stack.token}"} if auth else {}
    session = requests.Session()
    tried = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in NOT_FUZZED:
            continue

        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=op.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            nonlocal tried
            if case.path == "/builds/{build_id}/follow":  # an endless stream by design
                return
            r = case.call(base_url=base, session=session, headers=headers, timeout=15)
            tried += 1
            assert r.status_code < 500, (case.method, case.formatted_path, r.status_code, r.text)
            assert not TRACEBACK.search(r.text), (case.method, case.formatted_path, r.text)

        fuzz()
    assert tried > 0
    assert all(stack.healthy(s) for s in SERVICES)


# The cache's plain Starlette route (/{hash}.narinfo) is not in its OpenAPI: an explicit list,
# with malformed hashes, MACs and ranges that must be 4xx.
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/" + "e" * 32 + ".narinfo", 400),  # 'e' is not in nix32
        ("/" + "0" * 31 + ".narinfo", 400),
        ("/" + "0" * 33 + ".narinfo", 400),
        ("/" + "0" * 32 + ".narinfo", 404),
        ("/%00" + "0" * 29 + ".narinfo", 400),
        ("/nar/" + "0" * 52 + ".nar", 400),
        ("/nar/" + "0" * 51 + ".nar.zst", 400),
        ("/nar/" + "0" * 52 + ".nar.zst", 404),
        ("/ipxe/00-11-22", 400),
        ("/ipxe/zz:zz:zz:zz:zz:zz", 400),
        ("/ipxe/" + "a" * 5000, 400),
        ("/boots/not-a-mac/timeline", 400),
        ("/boots/00:11:22:33:44:55/timeline?boots=0", 400),
        ("/boot/" + "0" * 32 + "/vmlinuz", 400),
    ],
)
def test_cache_malformed_is_4xx(stack: FaultStack, path: str, status: int) -> None:
    for method in ("GET", "HEAD"):
        r = httpx.request(method, stack.url("cache") + path, timeout=5)
        assert r.status_code == status, (method, path, r.status_code, r.text)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    name=st.text(st.characters(codec="utf-8", exclude_characters="/?#"), max_size=80),
    rng=st.one_of(st.none(), st.text(max_size=40), st.from_regex(r"bytes=-?\d{0,25}-?\d{0,25}")),
)
def test_cache_plain_routes_fuzz(stack: FaultStack, name: str, rng: str | None) -> None:
    headers = {"Range": rng} if rng is not None and rng.isascii() and rng.isprintable() else {}
    with httpx.Client(base_url=stack.url("cache"), timeout=5) as http:
        for path in (f"/{name}.narinfo", f"/nar/{name}", f"/ipxe/{name}", f"/log/{name}"):
            try:
                r = http.get(path, headers=headers)
            except httpx.InvalidURL:
                continue
            assert r.status_code < 500, (path, rng, r.status_code, r.text)
            assert not TRACEBACK.search(r.text)


async def test_range_abuse_on_boot_files(stack: FaultStack) -> None:
    nc = await nats.connect(stack.nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_GENERATIONS)
        entry = await kv.get(subjects.mac_token(stack.machines[0]))
    finally:
        await nc.close()
    top = re.search(rb"/nix/store/([0-9a-z]{32})-", entry.value or b"")
    assert top is not None
    async with httpx.AsyncClient(base_url=stack.url("cache"), timeout=5) as http:
        url = f"/boot/{top.group(1).decode()}/kernel"
        for rng in ("bytes=99999999999-", "bytes=5-1", "bytes=abc", "bytes=-0", "bytes=,,,",
                    "bytes=" + ",".join(["0-1"] * 3000), "items=0-1", "bytes=0-0,-1"):  # fmt: skip
            r = await http.get(url, headers={"Range": rng})
            assert r.status_code in (200, 206, 400, 416), (rng, r.status_code)


# -- NATS: messages that do not decode, on every consumer's subject -----------------------------
GARBAGE = [b"", b"\x00\xff", b"{", b'{"type":"lease"}', b'{"type":"nope","v":1}', b"[]" * 1000]


REJECTED = {
    "warm": ("cache", "nixboot-cache-warm"),
    "timeline": ("cache", "nixboot-timeline"),
    "builder": ("builder", "nixboot-builders"),
    "tftp": ("tftp", "tftp-leases"),
}


def rejected(stack: FaultStack) -> dict[str, float]:
    return {
        k: metric(stack, svc, "nixboot_events_rejected_total", consumer=c)
        for k, (svc, c) in REJECTED.items()
    }


async def consumer_state(
    js: nats.js.JetStreamContext, stream: str, durable: str
) -> tuple[int, int]:
    info = await js.consumer_info(stream, durable)
    return info.num_ack_pending or 0, info.num_redelivered or 0


async def test_undecodable_events_are_rejected_counted_and_consumers_go_on(
    stack: FaultStack,
) -> None:
    mac = "52:54:00:bb:00:01"
    before = rejected(stack)
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()
    try:
        lease_subject = subjects.event_subject("lease", mac)
        for payload in GARBAGE:
            await js.publish(lease_subject, payload)  # cache warm, timeline, tftp
            await js.publish(subjects.build_request_subject("demo"), payload)  # builder queue
        n = len(GARBAGE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = rejected(stack)
            if all(now[k] - before[k] >= n for k in now):
                break
            await asyncio.sleep(0.5)
        assert {k: now[k] - before[k] for k in now} == dict.fromkeys(now, n)
        # Terminated, not waiting for redelivery.
        await asyncio.sleep(1)
        for stream, durable in (
            (subjects.EVENTS_STREAM, "nixboot-cache-warm"),
            (subjects.EVENTS_STREAM, "nixboot-timeline"),
            (subjects.BUILDS_STREAM, "nixboot-builders"),
        ):
            pending, _ = await consumer_state(js, stream, durable)
            assert pending == 0, (durable, pending)
        # The builder's work queue holds none of the garbage any more.
        info = await js.stream_info(subjects.BUILDS_STREAM)
        assert info.state.messages == 0
        # ... and every consumer still works: a real lease warms and shows up on /boots.
        since = time.time()
        lease = events.LeaseSeen(mac=stack.machines[-1], ip="10.11.250.1", source="http")
        ack = await js.publish(
            lease.subject, events.encode(lease), headers={"Nats-Msg-Id": lease.id}
        )
        deadline = time.monotonic() + 20
        warmed = False
        while time.monotonic() < deadline and not warmed:
            sub = await js.subscribe(
                subjects.event_subject("warm-started", stack.machines[-1]),
                ordered_consumer=True,
                config=nats.js.api.ConsumerConfig(
                    deliver_policy=nats.js.api.DeliverPolicy.BY_START_TIME,
                    opt_start_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 1)),
                ),
            )
            try:
                msg = await sub.next_msg(timeout=2)
                warmed = isinstance(events.decode(msg.data), events.WarmStarted)
            except nats.errors.TimeoutError:
                pass
            finally:
                await sub.unsubscribe()
        assert warmed, "the cache's warm consumer stopped after the garbage"
        # ... and the timeline tracker acknowledges it (it went past the garbage).
        floor = 0
        for _ in range(40):
            info = await js.consumer_info(subjects.EVENTS_STREAM, "nixboot-timeline")
            floor = (info.ack_floor.stream_seq or 0) if info.ack_floor else 0
            if floor >= ack.seq:
                break
            await asyncio.sleep(0.25)
        assert floor >= ack.seq, (floor, ack.seq)
    finally:
        await nc.close()


# -- TFTP option and request abuse beyond tests/tftp ----------------------------------------------
def tftp_exchange(port: int, packet: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(packet, ("127.0.0.1", port))
        data, addr = s.recvfrom(70000)
        if data[:2] == b"\x00\x06":  # OACK: decline the transfer politely
            s.sendto(b"\x00\x05\x00\x08cancel\x00", addr)
        return data


@pytest.mark.parametrize(
    "packet",
    [
        b"\x00\x01lpxelinux.0\x00mail\x00",  # mail mode (RFC 1350: obsolete)
        b"\x00\x01lpxelinux.0\x00bogus\x00",
        b"\x00\x01lpxelinux.0\x00",  # no mode
        b"\x00\x01lpxelinux.0",  # no terminators
        b"\x00\x01" + b"a" * 600 + b"\x00octet\x00",  # longer than a datagram's name should be
        b"\x00\x01lpxelinux.0\x00octet\x00blksize\x00",  # option without value
        b"\x00\x01lpxelinux.0\x00octet\x00blksize\x00512\x00blksize\x0065464\x00",  # duplicate
        b"\x00\x01lpxelinux.0\x00octet\x00" + b"x\x001\x00" * 200,  # 200 unknown options
        b"\x00\x01lpxelinux.0\x00octet\x00tsize\x00" + b"9" * 300 + b"\x00",
        b"\x00\x01lpxelinux.0\x00octet\x00\xff\xfe\x001\x00",  # non-ASCII option name
        b"\x00\x01pxelinux.cfg/01-zz-zz-zz-zz-zz-zz\x00octet\x00",
        b"\x00\x02pxelinux.cfg/default\x00octet\x00",  # write request
        b"\x00\x02lpxelinux.0\x00octet\x00blksize\x001468\x00",
        b"\x00\x03\x00\x01data to the listening port",
        b"\x00\x04\x00\x01",
        b"\x00\x06blksize\x001468\x00",  # an OACK sent to the server
        b"\x00\x07",
    ],
)
def test_tftp_request_abuse(stack: FaultStack, packet: bytes) -> None:
    port = stack.ports["tftp-udp"]
    try:
        reply = tftp_exchange(port, packet)
    except TimeoutError:
        reply = b""  # ignoring garbage is fine
    assert reply[:2] in (b"", b"\x00\x03", b"\x00\x05", b"\x00\x06"), reply[:40]
    if packet[:2] == b"\x00\x02":
        assert reply[:4] == b"\x00\x05\x00\x02", reply  # access violation
    # Still serving.
    ok = tftp_exchange(port, b"\x00\x01lpxelinux.0\x00octet\x00")
    assert ok[:4] == b"\x00\x03\x00\x01"
