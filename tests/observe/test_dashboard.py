"""deploy/grafana: the dashboard queries only metrics that exist (names defined in code or in
the documented contract deploy/prometheus/metric-names.txt), its structure is sound, and the
provisioning YAML is valid (parsed with Debian's python3-yaml: PyYAML is not in the venv)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = GRAFANA / "dashboards" / "nixboot.json"

# Where metrics are defined: imported so that they register in the default registry.
METRIC_MODULES = (
    "nixboot_shared.metrics",
    "nixboot_cache.timeline.metrics",
    "nixboot_cache.metrics",
    "nixboot_tftp.metrics",
    "nixboot_builder.metrics",
    "nixboot_dhcp_hook.metrics",
)
NAME = re.compile(r"\b(nixboot(?::[a-z0-9_]+)+|nixboot_[a-z0-9_]+)\b")


def contract() -> dict[str, tuple[str, set[str], str]]:
    out = {}
    for line in (PROM / "metric-names.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, labels, owner = line.split(None, 3)
        out[name] = (kind, set() if labels == "-" else set(labels.split(",")), owner)
    return out


def recorded() -> set[str]:
    names: set[str] = set()
    for f in (PROM / "rules").glob("*.yml"):
        names |= set(re.findall(r"^\s*- record: (\S+)", f.read_text(), re.M))
    return names


def base_name(series: str, kinds: dict[str, tuple[str, set[str], str]]) -> str:
    for suffix, kind in (
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_count", "histogram"),
        ("_sum", "histogram"),
    ):
        stem = series.removesuffix(suffix)
        if stem != series and kinds.get(stem, ("",))[0] == kind:
            return stem
    return series


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def prometheus_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [
        t["expr"]
        for p in dash["panels"]
        for t in p.get("targets", [])
        if t.get("datasource", p.get("datasource", {})).get("type") == "prometheus"
    ]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(v["query"]["query"])
    return exprs


def defined_metrics() -> dict[str, tuple[str, set[str]]]:
    for module in METRIC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    out = {}
    for collector in list(REGISTRY._collector_to_names):
        for m in collector.describe() if hasattr(collector, "describe") else []:
            labels = set(getattr(collector, "_labelnames", ()))
            out[m.name] = (m.type, labels)
    return out


def test_every_queried_metric_exists() -> None:
    kinds = contract()
    known = set(kinds) | recorded() | {"up"}
    exprs = prometheus_exprs(dashboard())
    rules = "\n".join(f.read_text() for f in (PROM / "rules").glob("*.yml"))
    assert len(exprs) > 20
    unknown = set()
    for text in [*exprs, rules]:
        for series in NAME.findall(text):
            if base_name(series, kinds) not in known:
                unknown.add(series)
    assert not unknown, f"queries name metrics nobody defines: {sorted(unknown)}"


def test_contract_matches_the_code() -> None:
    defined = defined_metrics()
    missing = []
    for name, (kind, labels, owner) in contract().items():
        if name not in defined:
            missing.append(f"{name} ({owner})")
            continue
        assert defined[name] == (kind, labels), (name, defined[name])
    # Every name in the contract is defined by now: a missing one is a failure.
    assert not missing, f"metrics in the contract that no service defines: {', '.join(missing)}"


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] == "nixboot-boots"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in ("${datasource}", "${api}"), p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("boots per minute", "heatmap", "slowest stage", "slowest machines", "warm",
                   "tftp", "build", "event"):  # fmt: skip
        assert needed in titles, needed


def _yaml(path: Path) -> Any:
    out = subprocess.run(
        ["/usr/bin/python3", "-c",
         "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
         str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, f"{path}: {out.stderr}"
    return json.loads(out.stdout)


def test_provisioning_yaml() -> None:
    ds = _yaml(GRAFANA / "provisioning" / "datasources" / "nixboot.yml")
    assert ds["apiVersion"] == 1
    by_type = {d["type"]: d for d in ds["datasources"]}
    prom = by_type["prometheus"]
    assert prom["access"] == "proxy" and prom["url"].startswith("http")
    assert sum(1 for d in ds["datasources"] if d.get("isDefault")) == 1
    assert len({d["uid"] for d in ds["datasources"]}) == len(ds["datasources"])
    dashboards = _yaml(GRAFANA / "provisioning" / "dashboards" / "nixboot.yml")
    assert dashboards["apiVersion"] == 1
    [provider] = dashboards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
