"""Boot programs in the TFTP root: pxelinux (BIOS) and iPXE (BIOS and UEFI), from Debian packages.

The root is a directory nixboot owns (``<state_dir>/tftp-root``) and the programs are copied into
it, not linked: the server refuses symlinks that lead out of its root, on purpose. A configured
``tftp.boot_programs_dir`` is used as the root as it is.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# name in the TFTP root -> (path in Debian, package that ships it)
DEBIAN_BOOT_PROGRAMS: dict[str, tuple[str, str]] = {
    "pxelinux.0": ("/usr/lib/PXELINUX/pxelinux.0", "pxelinux"),
    "lpxelinux.0": ("/usr/lib/PXELINUX/lpxelinux.0", "pxelinux"),
    "ldlinux.c32": ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common"),
    "menu.c32": ("/usr/lib/syslinux/modules/bios/menu.c32", "syslinux-common"),
    "libutil.c32": ("/usr/lib/syslinux/modules/bios/libutil.c32", "syslinux-common"),
    "libcom32.c32": ("/usr/lib/syslinux/modules/bios/libcom32.c32", "syslinux-common"),
    "undionly.kpxe": ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
    "snponly.efi": ("/usr/lib/ipxe/snponly.efi", "ipxe"),
    "ipxe.efi": ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
}


class BootProgramsError(RuntimeError):
    pass


def prepare_root(state_dir: Path, boot_programs_dir: str = "") -> Path:
    """The TFTP root to serve; with no configured directory, fill ``<state_dir>/tftp-root``."""
    if boot_programs_dir:
        root = Path(boot_programs_dir)
        if not root.is_dir():
            raise BootProgramsError(
                f"tftp.boot_programs_dir {boot_programs_dir} is not a directory"
            )
        return root
    root = state_dir / "tftp-root"
    root.mkdir(parents=True, exist_ok=True)
    missing: dict[str, list[str]] = {}
    for name, (source, package) in DEBIAN_BOOT_PROGRAMS.items():
        src = Path(source)
        dest = root / name
        if not src.is_file():
            missing.setdefault(package, []).append(name)
            continue
        st = src.stat()
        if dest.is_file() and not dest.is_symlink():
            dt = dest.stat()
            if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                continue
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(src, tmp)
        tmp.replace(dest)  # atomic: a transfer in progress keeps reading the old file
    if missing:
        for package, names in missing.items():
            log.warning(
                "boot programs %s are missing: install the Debian package %s "
                "(apt-get install %s) or set tftp.boot_programs_dir",
                ", ".join(names),
                package,
                package,
            )
    return root
