"""shared/ is the common ground: it must never import a service (or the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("nixboot_dhcp_hook", "nixboot_tftp", "nixboot_builder", "nixboot_cache", "nixboot")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_shared_imports_no_service() -> None:
    files = sorted((ROOT / "shared" / "src").rglob("*.py"))
    assert files, "shared/src has no modules"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_modules(f) & set(FORBIDDEN)) for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_check_catches_a_service_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from nixboot_tftp.service import main\nimport nixboot_cache\n")
    assert imported_modules(bad) & set(FORBIDDEN) == {"nixboot_tftp", "nixboot_cache"}


def test_every_service_has_one_entry_point() -> None:
    for pkg in ("dhcp-hook", "tftp", "builder", "cache"):
        module = pkg.replace("-", "_")
        service = ROOT / "services" / pkg / "src" / f"nixboot_{module}" / "service.py"
        assert "def main(cfg: Config) -> int" in service.read_text(), service
