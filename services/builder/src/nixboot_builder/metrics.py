"""The builder's Prometheus metrics (labels bounded: the result only, never an attribute)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUILDS = Counter("nixboot_builder_builds", "Finished builds by result", ["result"])  # ok / failed
BUILD_SECONDS = Histogram(
    "nixboot_builder_build_seconds",
    "Seconds from taking a request to the built toplevel (successful builds)",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
