"""Boot menus, rendered per machine: newest generation first (or the pinned one), older ones for
rollback, then the local disk. Pure functions: the TFTP service (pxelinux) and the cache service
(iPXE) render from the same ``MenuSpec``, so both menus always agree."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from nixboot_shared.records import Generation, MachineGenerations
from nixboot_shared.subjects import InvalidMac, normalize_mac

_GIT_REV = re.compile(r"^[0-9a-f]{7,40}$")


@dataclass(frozen=True)
class BootParams:
    """What stage 1 reads from the kernel command line (see deploy/nixos/client)."""

    cache_url: str  # binary cache and boot files, e.g. http://10.0.0.1:8080
    public_key: str  # Nix `name:base64` public key of the cache
    boot_id: str
    boot_token: str


@dataclass(frozen=True)
class MenuSpec:
    mac: str
    title: str
    generations: MachineGenerations | None
    params: BootParams
    timeout_seconds: int = 5


def store_hash(store_path: str) -> str:
    """``/nix/store/<hash>-name`` -> ``<hash>``: the key of a generation's boot files."""
    return store_path.removeprefix("/nix/store/").split("-", 1)[0]


def kernel_cmdline(gen: Generation, params: BootParams, mac: str) -> str:
    try:
        mac_param = f"nixboot.mac={normalize_mac(mac)}"
    except InvalidMac:
        # pxelinux's "default" menu for a client whose lease is not known yet: no MAC to give;
        # stage 1 then reports without one.
        mac_param = ""
    parts = [
        f"init={gen.init}",
        gen.kernel_params.strip(),
        f"nixboot.toplevel={gen.toplevel}",
        f"nixboot.cache={params.cache_url}",
        f"nixboot.key={params.public_key}",
        f"nixboot.boot_id={params.boot_id}",
        f"nixboot.token={params.boot_token}",
        mac_param,
        f"nixboot.generation={gen.number}",
    ]
    return " ".join(p for p in parts if p)


def boot_file_path(gen: Generation, which: str) -> str:
    """Path of a generation's ``kernel``/``initrd`` on the cache's HTTP server and on TFTP."""
    return f"boot/{store_hash(gen.toplevel)}/{which}"


def _label(gen: Generation) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(gen.created)) if gen.created else ""
    # A git revision is worth showing; a path flake's content hash (sha256-…) is not.
    rev = f" {gen.flake_rev[:8]}" if gen.flake_rev and _GIT_REV.match(gen.flake_rev) else ""
    return f"NixOS generation {gen.number} {when}{rev}".strip()


def ordered_entries(spec: MenuSpec) -> tuple[list[Generation], Generation | None]:
    """Generations newest first, and the default one (one-shot pin, pin, newest)."""
    if spec.generations is None:
        return [], None
    return spec.generations.newest_first(), spec.generations.default()


def render_pxelinux(spec: MenuSpec, file_base: str) -> str:
    """A pxelinux.cfg file. ``file_base`` prefixes kernel/initrd paths: ``http://host:port/`` for
    lpxelinux (HTTP), ``""`` for plain pxelinux (TFTP, relative to the TFTP root)."""
    gens, default = ordered_entries(spec)
    lines = [
        "# nixboot: rendered for " + spec.mac,
        "UI menu.c32",
        f"MENU TITLE {spec.title}",
        f"TIMEOUT {max(spec.timeout_seconds, 0) * 10}",
        f"DEFAULT {'gen-' + str(default.number) if default else 'local'}",
        "",
    ]
    for gen in gens:
        lines += [
            f"LABEL gen-{gen.number}",
            f"  MENU LABEL {_label(gen)}",
            f"  KERNEL {file_base}{boot_file_path(gen, 'kernel')}",
            f"  INITRD {file_base}{boot_file_path(gen, 'initrd')}",
            f"  APPEND {kernel_cmdline(gen, spec.params, spec.mac)}",
            "",
        ]
    lines += ["LABEL local", "  MENU LABEL Boot from local disk", "  LOCALBOOT 0", ""]
    return "\n".join(lines)


def render_ipxe(spec: MenuSpec, file_base: str) -> str:
    """A per-MAC iPXE menu script; ``file_base`` is the cache's URL with a trailing slash."""
    gens, default = ordered_entries(spec)
    default_item = f"gen-{default.number}" if default else "local"
    lines = [
        "#!ipxe",
        f"# nixboot: rendered for {spec.mac}",
        f"menu {spec.title}",
    ]
    lines += [f"item gen-{g.number} {_label(g)}" for g in gens]
    lines += [
        "item local Boot from local disk",
        f"choose --default {default_item} --timeout {max(spec.timeout_seconds, 0) * 1000} "
        "target && goto ${target} || goto local",
        "",
    ]
    for gen in gens:
        lines += [
            f":gen-{gen.number}",
            f"kernel {file_base}{boot_file_path(gen, 'kernel')} initrd=initrd "
            + kernel_cmdline(gen, spec.params, spec.mac),
            f"initrd --name initrd {file_base}{boot_file_path(gen, 'initrd')}",
            "boot || goto failed",
            "",
        ]
    lines += [":local", "sanboot --no-describe --drive 0x80 || exit", "", ":failed", "exit 1", ""]
    return "\n".join(lines)


def render_ipxe_chain(cache_url: str) -> str:
    """``boot.ipxe``: chain to the machine's own menu. ``${mac}`` names the NIC that booted."""
    return f"#!ipxe\nchain {cache_url.rstrip('/')}/ipxe/${{mac:hexhyp}} || exit 1\n"
