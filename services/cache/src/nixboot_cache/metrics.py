"""The cache's Prometheus metrics (labels bounded: route kinds and states, never paths)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("nixboot_cache_requests", "HTTP requests by kind and result", ["kind", "result"])
NAR_SERVED = Counter(
    "nixboot_cache_nar_served", "NAR responses by how they were served", ["state"]
)  # state: warm (file on disk) / streamed (compressed while sent)
NAR_BYTES = Counter("nixboot_cache_nar_bytes", "Compressed NAR bytes sent", ["state"])
COMPRESSED = Counter("nixboot_cache_compressed", "NARs compressed into the cache directory")
EVICTED = Counter("nixboot_cache_evicted", "Compressed NARs evicted (LRU)")
TRUNCATED = Counter("nixboot_cache_truncated_rebuilt", "Truncated cache files detected and rebuilt")
CACHE_BYTES = Gauge("nixboot_cache_bytes", "Bytes of compressed NARs on disk")
MAX_BYTES = Gauge("nixboot_cache_max_bytes", "Bound on compressed NAR bytes (cache.max_bytes)")
WARMS = Counter("nixboot_cache_warms", "Closure warms by result", ["result"])
WARM_SECONDS = Histogram(
    "nixboot_cache_warm_seconds",
    "Seconds to warm one closure",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300),
)
FORGED_REPORTS = Counter("nixboot_cache_forged_reports", "Stage reports with a bad token")
ONE_SHOT_CONSUMED = Counter(
    "nixboot_cache_one_shot_consumed", "One-shot pins spent by an iPXE menu that made them default"
)
DISK_FULL = Counter(
    "nixboot_cache_disk_full", "Compressions that failed because the cache directory was full"
)
LEASE_HANDOFF = Histogram(
    "nixboot_cache_lease_handoff_seconds",
    "From a warm decided on the lease thread to the main loop starting it",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
)
CHAIN_REQUESTERS = Counter(
    "nixboot_cache_ipxe_chain_requesters",
    "boot.ipxe requests by how the machine was named: lease (map), menu (its /ipxe/<mac>), unknown",
    ["via"],
)
