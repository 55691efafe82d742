"""Boot timing metrics. Names are fixed: the dashboards and alert rules in deploy/ rely on them.
Labels are bounded: ``stage`` is one of ``session.STAGES``, ``result`` one of three outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from nixboot_cache.timeline.session import FINAL_RESULTS, STAGES, Outcome

# 10 ms .. 10 min: a TFTP menu fetch on a LAN up to a slow closure download.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

STAGE_DURATION = Histogram(
    "nixboot_boot_stage_duration_seconds",
    "Duration of one stage of a network boot",
    ["stage"],
    buckets=BUCKETS,
)
BOOT_DURATION = Histogram(
    "nixboot_boot_duration_seconds",
    "Whole network boot, DHCP lease to booted",
    buckets=BUCKETS,
)
BOOTS = Counter("nixboot_boots", "Boot sessions by outcome", ["result"])
MACHINES_IN_STAGE = Gauge(
    "nixboot_boot_machines", "Machines whose current boot is in this stage", ["stage"]
)
EVENTS_TRACKED = Counter(
    "nixboot_timeline_events", "Events the boot tracker took into a session", ["type"]
)

# Create every child up front so a dashboard sees zeros instead of "no data".
for _stage in STAGES:
    STAGE_DURATION.labels(_stage)
    MACHINES_IN_STAGE.labels(_stage)
for _result in FINAL_RESULTS:
    BOOTS.labels(_result)


def record(outcome: Outcome) -> None:
    BOOTS.labels(outcome.result).inc()
    if outcome.result != "booted":
        # A failed or abandoned boot's partial stages would skew the quantiles of good boots.
        return
    for iv in outcome.stages:
        STAGE_DURATION.labels(iv.stage).observe(iv.seconds)
    if outcome.total is not None:
        BOOT_DURATION.observe(outcome.total.seconds)


def set_in_progress(counts: dict[str, int]) -> None:
    for stage in STAGES:
        MACHINES_IN_STAGE.labels(stage).set(counts.get(stage, 0))
