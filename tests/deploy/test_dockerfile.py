"""Lint-level checks of deploy/docker/Dockerfile (no engine here: the image is not built). What
they catch: a COPY of a file that does not exist, a workspace member the dependency layer misses,
an unpinned base, a sync that ignores the lock, running as root."""

from __future__ import annotations

import fnmatch
import glob
import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stage_copies() -> list[list[str]]:
    """Sources of every COPY from the build context (not --from another stage)."""
    copies = []
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            parts = [p for p in args.split() if not p.startswith("--")]
            copies.append(parts[:-1])
    return copies


def workspace_members() -> list[Path]:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    members: list[Path] = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members += [Path(p) for p in sorted(glob.glob(str(REPO / pattern)))]
    return members


def test_every_copied_path_exists_in_the_build_context() -> None:
    copies = stage_copies()
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"


def test_the_dependency_layer_copies_the_lock_and_every_member_manifest() -> None:
    copied = {src for sources in stage_copies() for src in sources}
    assert {"pyproject.toml", "uv.lock"} <= copied
    members = workspace_members()
    assert len(members) >= 5  # shared and the four services
    for member in members:
        assert (member / "pyproject.toml").is_file()
        rel = str((member / "pyproject.toml").relative_to(REPO))
        assert rel in copied, f"workspace member {rel} is not copied before `uv sync`"
    # The root package's source is copied as well (the `nixboot` command lives there).
    assert "src" in copied and (REPO / "src" / "nixboot").is_dir()


def test_syncs_are_frozen_without_dev_and_the_image_runs_nixboot_serve() -> None:
    runs = [args for word, args in instructions() if word == "RUN"]
    syncs = [r for r in runs if "uv sync" in r]
    assert len(syncs) == 2
    assert all("--frozen" in s and "--no-dev" in s for s in syncs)
    entry = [args for word, args in instructions() if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["nixboot", "serve"]]


def test_pinned_slim_base_and_the_packages_services_need() -> None:
    args = dict(a.split("=", 1) for word, a in instructions() if word == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", args["UV_IMAGE"])
    froms = [a.split()[0] for word, a in instructions() if word == "FROM"]
    assert len(froms) >= 3  # uv, build, runtime: multi-stage
    apt = " ".join(a for word, a in instructions() if word == "RUN" and "apt-get install" in a)
    for pkg in ("nix-bin", "pxelinux", "syslinux-common", "ipxe"):
        assert re.search(rf"\b{re.escape(pkg)}\b", apt), pkg
    assert "--no-install-recommends" in apt


def test_runtime_user_is_not_root() -> None:
    users = [a for word, a in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_venv() -> None:
    rules = [
        line
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            neg = rule.startswith("!")
            pat = rule.lstrip("!").rstrip("/")
            pat = pat.removeprefix("**/")
            parts = path.split("/")
            hit = any(
                fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(parts[i], pat)
                for i in range(len(parts))
            )
            if hit:
                keep = neg
        return keep

    for sources in stage_copies():
        for src in sources:
            assert included(src), src
    assert included("shared/src/nixboot_shared/bus.py")
    assert not included(".venv/bin/python")
    assert not included("services/tftp/src/nixboot_tftp/__pycache__/x.pyc")
    assert not included("tests/deploy/test_dockerfile.py")
