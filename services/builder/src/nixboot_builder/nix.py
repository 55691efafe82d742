"""The real ``nix`` client, driven as a subprocess: build a toplevel, read its boot files, measure
its closure, fingerprint the flake, pin it with a GC root. Parsing lives in ``nixlog`` and the pure
helpers below; this module only runs commands."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nixboot_builder import narhash, nixlog

# Nix's offline defaults: no substituter (every command would retry cache.nixos.org) and the
# experimental commands we use. Added to, never replacing, what the environment sets.
NIX_CONFIG_DEFAULT = "experimental-features = nix-command flakes"

_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class NixError(RuntimeError):
    """A nix command failed; ``log_tail`` holds the end of its output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class InvalidAttr(ValueError):
    pass


def check_attr(attr: str) -> str:
    """A ``nixosConfigurations`` attribute we accept: also a NATS subject token."""
    if not _ATTR_RE.match(attr):
        raise InvalidAttr(
            f"invalid configuration attribute {attr!r}: use letters, digits, '_' and '-', "
            "starting with a letter or '_'"
        )
    return attr


def toplevel_installable(flake: str, attr: str) -> str:
    return f"{flake}#nixosConfigurations.{check_attr(attr)}.config.system.build.toplevel"


def option_args(options: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for name, value in sorted(options.items()):
        args += ["--option", name, value]
    return args


def nix_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    current = env.get("NIX_CONFIG", "")
    if "experimental-features" not in current:
        env["NIX_CONFIG"] = (current + "\n" + NIX_CONFIG_DEFAULT).strip()
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class BootFiles:
    """What NixOS puts in a toplevel for a boot loader."""

    toplevel: str
    kernel: str
    initrd: str
    kernel_params: str
    init: str


def read_boot_files(toplevel: str) -> BootFiles:
    """Resolve ``toplevel/{kernel,initrd,init}`` and read ``kernel-params`` like NixOS's boot
    loader installers do; a toplevel without them cannot boot, which is an error."""
    top = Path(toplevel)
    try:
        kernel = os.path.realpath(top / "kernel")
        initrd = os.path.realpath(top / "initrd")
        params = (top / "kernel-params").read_text().strip()
    except OSError as e:
        raise NixError(f"{toplevel} is not a NixOS toplevel: {e}") from None
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if not os.path.isfile(path):
            raise NixError(f"{toplevel} is not a NixOS toplevel: no {what} file")
    init = str(top / "init")
    if not os.path.exists(init):
        raise NixError(f"{toplevel} is not a NixOS toplevel: no init")
    return BootFiles(toplevel, kernel, initrd, params, init)


def parse_build_json(stdout: str) -> str:
    """The toplevel's out path from ``nix build --json``."""
    try:
        results: Any = json.loads(stdout)
        return str(results[0]["outputs"]["out"])
    except (ValueError, LookupError, TypeError) as e:
        raise NixError(f"unexpected `nix build --json` output: {stdout[:200]!r}") from e


def parse_closure_size(stdout: str, path: str) -> int:
    """``nix path-info -S --json`` (a list in nix 2.8, an object keyed by path later)."""
    data: Any = json.loads(stdout)
    entries = data if isinstance(data, list) else [dict(v, path=k) for k, v in data.items()]
    for entry in entries:
        if entry.get("path") == path:
            return int(entry.get("closureSize", 0))
    raise NixError(f"nix path-info did not describe {path}")


def path_flake_dir(flake: str) -> Path | None:
    """The directory of a plain ``path:/abs/dir`` flake (no query, a real directory holding a
    flake.nix): its fingerprint is the NAR hash of the directory, computable without nix."""
    if not flake.startswith("path:/") or "?" in flake or "#" in flake:
        return None
    directory = Path(flake[len("path:") :])
    if not directory.is_dir() or directory.is_symlink() or not (directory / "flake.nix").is_file():
        return None
    return directory


def parse_flake_fingerprint(stdout: str) -> str:
    """The flake's git revision, else the NAR hash of its source (path flakes, dirty trees)."""
    meta: Any = json.loads(stdout)
    locked = meta.get("locked", {})
    for key in ("revision", "rev"):
        if meta.get(key) or locked.get(key):
            return str(meta.get(key) or locked.get(key))
    if locked.get("narHash"):
        return str(locked["narHash"])
    raise NixError("nix flake metadata gave neither a revision nor a narHash")


LineHandler = Callable[[list[nixlog.Update]], Awaitable[None]]


class Nix:
    def __init__(self, options: Mapping[str, str] | None = None) -> None:
        self.options = dict(options or {})

    async def _run(self, *args: str, timeout: float = 120.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=nix_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NixError(f"{' '.join(args[:3])} timed out after {timeout:.0f}s") from None
        if proc.returncode != 0:
            text = nixlog.strip_ansi(err.decode(errors="replace")).strip()
            raise NixError(f"{' '.join(args[:3])} failed: {text[-2000:]}", text[-4000:])
        return out.decode()

    async def build(
        self,
        flake: str,
        attr: str,
        on_update: LineHandler | None = None,
        out_link: Path | None = None,
    ) -> tuple[str, nixlog.BuildLog, list[str]]:
        """Build the toplevel of ``attr``; stream parsed log updates to ``on_update``. With
        ``out_link``, nix itself pins the result with that indirect GC root as it finishes (no
        window in which a garbage collection could take it, no extra process).
        Returns (toplevel, final log state, log lines)."""
        if out_link is not None:
            out_link.parent.mkdir(parents=True, exist_ok=True)
        link_args = ["--out-link", str(out_link)] if out_link is not None else ["--no-link"]
        proc = await asyncio.create_subprocess_exec(
            "nix",
            "build",
            "--json",
            *link_args,
            "--log-format",
            "internal-json",
            *option_args(self.options),
            toplevel_installable(flake, attr),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=nix_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        log = nixlog.BuildLog()
        # The full log goes to NATS as it comes; only the tail is kept for the failure event.
        lines: collections.deque[str] = collections.deque(maxlen=200)
        stdout_task = asyncio.ensure_future(proc.stdout.read())
        try:
            async for raw in proc.stderr:
                updates = log.feed(raw.decode(errors="replace"))
                for u in updates:
                    if isinstance(u, nixlog.LogLine | nixlog.ErrorMessage):
                        lines.append(u.text)
                if updates and on_update is not None:
                    await on_update(updates)
            stdout = (await stdout_task).decode()
            rc = await proc.wait()
        except BaseException:
            # Cancelled (shutdown): do not leave a nix process behind.
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stdout_task.cancel()
            raise
        if rc != 0:
            message = log.errors[-1] if log.errors else f"nix build exited with {rc}"
            raise NixError(message, "\n".join(list(lines)[-40:]))
        return parse_build_json(stdout), log, list(lines)

    async def closure_size(self, path: str) -> int:
        return parse_closure_size(await self._run("nix", "path-info", "-S", "--json", path), path)

    async def flake_fingerprint(self, flake: str) -> str:
        """The flake's git revision or source narHash (see ``parse_flake_fingerprint``)."""
        directory = path_flake_dir(flake)
        if directory is not None:
            # The same narHash nix would report, without starting nix; on any trouble (a file
            # vanished mid-walk, a socket in the tree) nix itself answers, or reports the error.
            with contextlib.suppress(OSError, narhash.UnsupportedFile):
                return await asyncio.to_thread(narhash.nar_hash_sri, str(directory))
        return await self.nix_flake_fingerprint(flake)

    async def nix_flake_fingerprint(self, flake: str) -> str:
        out = await self._run(
            "nix", "flake", "metadata", "--json", *option_args(self.options), flake
        )
        try:
            return parse_flake_fingerprint(out)
        except (ValueError, AttributeError) as e:
            raise NixError(f"unexpected `nix flake metadata` output: {e}") from None

    async def configuration_names(self, flake: str) -> list[str]:
        out = await self._run(
            "nix",
            "eval",
            "--json",
            *option_args(self.options),
            f"{flake}#nixosConfigurations",
            "--apply",
            "builtins.attrNames",
        )
        try:
            names: Any = json.loads(out)
        except ValueError as e:
            raise NixError(f"unexpected `nix eval` output: {e}") from None
        if not isinstance(names, list):
            raise NixError("nixosConfigurations is not an attribute set")
        return [str(n) for n in names]

    async def add_root(self, link: Path, path: str) -> None:
        """Register ``link`` -> ``path`` as an indirect GC root (nix follows it from
        /nix/var/nix/gcroots/auto; deleting the link unpins the path)."""
        link.parent.mkdir(parents=True, exist_ok=True)
        await self._run("nix-store", "--add-root", str(link), "--indirect", "--realise", path)
