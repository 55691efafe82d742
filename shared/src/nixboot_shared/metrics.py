"""Prometheus metrics shared by every service. Labels stay bounded: no MAC, path or file name."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

EVENTS_PUBLISHED = Counter("nixboot_events_published", "Events published to JetStream", ["type"])
EVENTS_FAILED = Counter(
    "nixboot_events_publish_failed", "Events that could not be published", ["type"]
)
EVENTS_REJECTED = Counter(
    "nixboot_events_rejected", "Messages on nixboot subjects that did not decode", ["consumer"]
)
BAD_INPUT = Counter("nixboot_bad_input", "Rejected input (payloads, packets, requests)", ["source"])


def exposition() -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer."""
    return generate_latest(), CONTENT_TYPE_LATEST
