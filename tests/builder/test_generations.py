"""Generation bookkeeping (pure) and the poller's cheap change check."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from nixboot_builder import generations
from nixboot_builder.poller import local_flake_dir, tree_stamp
from nixboot_shared.records import Generation, MachineGenerations


def gen(toplevel: str) -> Generation:
    return Generation(
        number=0, toplevel=toplevel, kernel="k", initrd="i", kernel_params="p", init="x"
    )


def test_numbering_dedupe_and_keep() -> None:
    record = MachineGenerations(mac="52:54:00:00:00:01")
    for name in ("a", "b", "c"):
        record = generations.add_build(record, gen(name), keep=2).record
    assert [g.number for g in record.newest_first()] == [3, 2]
    same = generations.add_build(record, gen("c"), keep=2)
    assert same.created is None and same.record is record
    out = generations.add_build(record, gen("d"), keep=2)
    assert out.created is not None and out.created.number == 4
    assert [g.number for g in out.dropped] == [2]


def test_pinned_generation_is_never_dropped_and_pins_validate() -> None:
    record = MachineGenerations(mac="52:54:00:00:00:01")
    record = generations.add_build(record, gen("a"), keep=1).record
    record = generations.pin(record, 1, once=False)
    for name in ("b", "c"):
        record = generations.add_build(record, gen(name), keep=1).record
    assert [g.number for g in record.newest_first()] == [3, 1]
    assert record.default() is not None and record.default().number == 1  # type: ignore[union-attr]
    record = generations.pin(record, 3, once=True)
    assert record.default().number == 3  # type: ignore[union-attr]
    record = msgspec.structs.replace(record, next_boot=None)  # as a served menu spends it
    assert record.default().number == 1  # type: ignore[union-attr]
    with pytest.raises(generations.UnknownGeneration, match="no generation 2"):
        generations.pin(record, 2, once=False)
    assert generations.pin(record, None, once=False).default().number == 3  # type: ignore[union-attr]


def test_local_flake_dir_and_stamp(tmp_path: Path) -> None:
    assert local_flake_dir("path:/srv/flake") == Path("/srv/flake")
    assert local_flake_dir("git+file:///srv/flake?ref=main") == Path("/srv/flake")
    assert local_flake_dir("/srv/flake") == Path("/srv/flake")
    assert local_flake_dir("github:owner/repo") is None
    (tmp_path / "flake.nix").write_text("{}")
    before = tree_stamp(tmp_path)
    assert tree_stamp(tmp_path) == before
    (tmp_path / "flake.nix").write_text("{ }")
    assert tree_stamp(tmp_path) != before


def test_closure_size_is_filled_in_once() -> None:
    record = MachineGenerations(mac="52:54:00:00:00:01")
    for name in ("a", "b"):
        record = generations.add_build(record, gen(name), keep=5).record
    filled = generations.set_closure_size(record, "b", 4096)
    assert [(g.toplevel, g.closure_size) for g in filled.generations] == [("a", 0), ("b", 4096)]
    # Already measured, or another toplevel: the very same record (no KV write follows).
    assert generations.set_closure_size(filled, "b", 1) is filled
    assert generations.set_closure_size(filled, "zzz", 1) is filled
