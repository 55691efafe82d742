"""deploy/prometheus against the real tools: promtool checks, and Debian's prometheus server
scraping a real service process (the service frame running the timeline tracker) while a
simulated boot is published to a real nats-server; then the recorded quantiles are queried."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from nixboot_cache.timeline import session as se
from nixboot_shared import bus
from tests.conftest import free_port, tool, wait_port
from tests.observe.observe_bootgen import boot_events

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

SERVICE = """
import sys
from nixboot_shared import config, service
from nixboot_cache.timeline import setup_timeline
cfg = config.load()
sys.exit(service.run("cache", cfg, cfg.cache.http, setup_timeline))
"""


def test_promtool_accepts_config_and_rules() -> None:
    promtool = tool("promtool")  # Debian package prometheus (deploy/packages/observe.txt)
    out = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rules = sorted(str(p) for p in (DEPLOY / "rules").glob("*.yml"))
    assert len(rules) == 2
    out = subprocess.run(
        [promtool, "check", "rules", *rules], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_rules() -> None:
    """Synthetic series: failing boots, a slow stage, a service down, a full cache."""
    out = subprocess.run(
        [tool("promtool"), "test", "rules", "tests/nixboot-alerts.test.yml"],
        capture_output=True, text=True, timeout=60, cwd=DEPLOY,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def query(base: str, expr: str) -> list[dict[str, Any]]:
    answer = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def wait_until(what: str, cond: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def service(isolated_nats_url: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {
        **os.environ,
        "NIXBOOT_CONFIG": "",
        "NIXBOOT_NATS__URL": isolated_nats_url,
        "NIXBOOT_STATE_DIR": str(tmp_path / "state"),
        "NIXBOOT_CACHE__HTTP__HOST": "127.0.0.1",
        "NIXBOOT_CACHE__HTTP__PORT": str(port),
        "NIXBOOT_TIMELINE__SETTLE_SECONDS": "0.5",
        "NIXBOOT_TIMELINE__TICK_SECONDS": "0.2",
    }
    log = (tmp_path / "service.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", SERVICE], env=env, stdout=log, stderr=log)
    try:
        wait_port(port, 20)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def prometheus(service: int, tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus with deploy/prometheus/prometheus.yml: the cache target rewritten to
    the test service's port, 1 s scrape and rule intervals, its own tmp storage."""
    conf_dir = tmp_path / "prom"
    shutil.copytree(DEPLOY, conf_dir)
    text = (DEPLOY / "prometheus.yml").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{service}")
    text = re.sub(r"(scrape|evaluation)_interval: 15s", r"\1_interval: 1s", text)
    (conf_dir / "prometheus.yml").write_text(text)
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={conf_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_port(port, 30)
        base = f"http://127.0.0.1:{port}"
        wait_until("prometheus to be ready", lambda: _ready(base))
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


async def test_prometheus_scrapes_boot_timing_and_records_quantiles(
    isolated_nats_url: str, prometheus: str
) -> None:
    base = prometheus
    wait_until(
        "the service to be scraped",
        lambda: (
            query(base, 'up{job="nixboot-cache"} == 1')
            and query(base, 'nixboot_boots_total{result="booted"}')
        ),
    )
    # Six boots, each stage with its own duration (closure: 3 s, menu: 0.5 s).
    gaps = [0.2, 0.1, 0.05, 0.5, 0.8, 0.3, 0.9, 0.4, 6.0, 3.0, 1.2]
    nc = await nats.connect(isolated_nats_url)
    js = nc.jetstream()
    t0 = time.time() - 300
    for i in range(6):
        evs, _ = boot_events(f"52:54:00:bb:00:{i:02x}", t0 + i * 20, gaps, f"p{i}")
        for e in evs:
            await bus.publish(js, e)
    await nc.close()

    counts = wait_until(
        "six boots in every stage's _count",
        lambda: (
            (r := query(base, "nixboot_boot_stage_duration_seconds_count"))
            and all(float(s["value"][1]) == 6 for s in r)
            and r
        ),
    )
    assert {s["metric"]["stage"] for s in counts} == set(se.STAGES)
    booted = query(base, 'nixboot_boots_total{result="booted"}')
    assert float(booted[0]["value"][1]) == 6

    def p90(stage: str) -> float | None:
        r = query(base, f'nixboot:boot_stage_duration_seconds:p90_5m{{stage="{stage}"}}')
        if not r or r[0]["value"][1] == "NaN":
            return None
        return float(r[0]["value"][1])

    closure = wait_until("the recorded closure p90", lambda: p90("closure"))
    # 3 s lies in the (2.5, 5] bucket: the quantile is interpolated inside it.
    assert 2.5 < closure <= 5.0
    menu = wait_until("the recorded menu p90", lambda: p90("menu"))
    assert 0.25 < menu <= 0.5
    total = wait_until(
        "the recorded boot p90",
        lambda: (
            (r := query(base, "nixboot:boot_duration_seconds:p90_5m"))
            and r[0]["value"][1] != "NaN"
            and float(r[0]["value"][1])
        ),
    )
    assert 10 < total <= 20  # 13.45 s per boot

    # Every rule Prometheus loaded evaluates without error; recording rules over the boot
    # metrics return data.
    groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 12
    for rule in rules:
        result = query(base, rule["query"])
        if rule["type"] == "recording":
            assert result, rule["name"]
        assert rule.get("health") in ("ok", "unknown"), rule

    # Every Prometheus query of the Grafana dashboard runs; those over the boot metrics this
    # test produced return data.
    dash = json.loads((DEPLOY.parent / "grafana" / "dashboards" / "nixboot.json").read_text())
    variables = {"$__rate_interval": "1m", "$__range": "5m", "$stage": ".*"}
    ran = 0
    for p in dash["panels"]:
        for t in p.get("targets", []):
            if t["datasource"]["type"] != "prometheus":
                continue
            expr = t["expr"]
            for k, v in variables.items():
                expr = expr.replace(k, v)
            result = query(base, expr)
            ran += 1
            if re.search(r"nixboot_boots?_|nixboot:boot", expr):
                assert result, (p["title"], expr)
    assert ran > 20
