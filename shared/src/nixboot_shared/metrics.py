"""Prometheus metrics shared by every service. Labels stay bounded: no MAC, path or file name."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

EVENTS_PUBLISHED = Counter("nixboot_events_published", "Events published to JetStream", ["type"])
EVENTS_FAILED = Counter(
    "nixboot_events_publish_failed", "Events that could not be published", ["type"]
)
EVENTS_REJECTED = Counter(
    "nixboot_events_rejected", "Messages on nixboot subjects that did not decode", ["consumer"]
)
BAD_INPUT = Counter("nixboot_bad_input", "Rejected input (payloads, packets, requests)", ["source"])
# Every service's HTTP API (service.HttpMetrics). Labels: the route *pattern* (e.g.
# "/boot/{toplevel_hash}/{which}", "unmatched" for 404s of unknown paths), a fixed method set and
# the status code; the process (Prometheus' job label) tells the services apart.
HTTP_REQUESTS = Counter(
    "nixboot_http_requests", "HTTP requests by route pattern, method and status",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_SECONDS = Histogram(
    "nixboot_http_request_seconds",
    "Time to answer an HTTP request (until the response is handed to the server)",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
)


@functools.cache
def labelled(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, kept: ``labels()`` costs ~2 µs a call, and the hot paths
    count every request. Only for label sets that are bounded (route patterns, kinds, results)."""
    return metric.labels(*labels)


def exposition() -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer."""
    return generate_latest(), CONTENT_TYPE_LATEST
