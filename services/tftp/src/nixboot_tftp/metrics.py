"""Prometheus metrics of the TFTP service. Labels are bounded: file kind and result only."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSFERS = Counter("nixboot_tftp_transfers", "Finished TFTP transfers", ["kind", "result"])
TRANSFER_SECONDS = Histogram(
    "nixboot_tftp_transfer_seconds",
    "Duration of TFTP transfers",
    ["kind", "result"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BYTES = Counter("nixboot_tftp_bytes", "Bytes delivered over TFTP", ["kind"])
ACTIVE = Gauge("nixboot_tftp_active_transfers", "TFTP transfers in progress")
RENDER_SECONDS = Histogram(
    "nixboot_tftp_menu_render_seconds",
    "Time to render a pxelinux menu",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01),
)
EVENTS_DROPPED = Counter(
    "nixboot_tftp_events_dropped", "Transfer events dropped because the publish queue was full"
)
ONE_SHOT_CLEARED = Counter(
    "nixboot_tftp_one_shot_cleared", "One-shot boot pins consumed by a served menu"
)
