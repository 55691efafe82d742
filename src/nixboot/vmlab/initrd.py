"""Test initrd for e2e boots: Debian's kernel, the modules the VM needs, static busybox, Debian's
``nix`` with its libraries, the partitioning tools, and the project's ``stage1.sh`` unchanged.

For the e2e tests and ``nixboot demo vm``. The kernel package is downloaded and unpacked (never
installed on the host); the initrd is cached by the hash of everything that goes into it, so
repeated runs cost nothing.

    python -m nixboot.vmlab.initrd [CACHE_DIR]    # builds (or finds) and prints the two paths
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zstandard

from nixboot.vmlab import VmLabError, deploy_file

DEFAULT_CACHE = Path(os.environ.get("NIXBOOT_TEST_CACHE", "/var/cache/nixboot-test"))

# What the VM needs as modules (Debian builds them as modules, not into the kernel).
WANTED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "ext4")
# Host programs copied with their libraries: Nix, and what stage1.sh partitions with.
HOST_PROGRAMS = ("/usr/bin/nix", "/usr/sbin/sfdisk", "/usr/sbin/blkid", "/usr/sbin/mke2fs")
BUSYBOX = "/bin/busybox"

INIT = """#!/bin/busybox sh
# nixboot e2e test initrd: what NixOS's stage 1 does before our hooks, then stage1.sh unchanged.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt-root
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /run
exec >/dev/console 2>&1 </dev/console
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo "NIXBOOT-INITRD uptime=$(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
    insmod "/lib/modules/$m" || echo "NIXBOOT-INITRD insmod $m failed"
done < /etc/nixboot-modules.load
exec /bin/sh /nixboot/stage1.sh run
"""


class InitrdError(VmLabError):
    """The initrd cannot be built; the message says what is missing."""


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    root: Path  # the unpacked package

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


@dataclass(frozen=True)
class TestBootFiles:
    kernel: Path
    initrd: Path
    kernel_version: str


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builds between concurrent test runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InitrdError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package() -> str:
    """The package Debian's ``linux-image-amd64`` currently depends on (never hard-coded)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise InitrdError("apt-cache depends linux-image-amd64 names no linux-image-*-amd64")


def fetch_kernel(cache: Path) -> Kernel:
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    root = cache / "kernel" / package
    with _locked(cache / "kernel.lock"):
        if not (root / ".complete").exists():
            dl = cache / "dl"
            dl.mkdir(parents=True, exist_ok=True)
            debs = sorted(dl.glob(f"{package}_*.deb"))
            if not debs:
                _run(["apt-get", "download", package], cwd=dl)
                debs = sorted(dl.glob(f"{package}_*.deb"))
            if not debs:
                raise InitrdError(f"apt-get download {package} left no .deb in {dl}")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
            # The package ships no modules.dep (depmod runs at install): make it in the copy.
            _run(["depmod", "-b", str(root), version])
            (root / ".complete").touch()
    kernel = Kernel(package=package, version=version, root=root)
    if not kernel.vmlinuz.exists():
        raise InitrdError(f"{kernel.vmlinuz} missing from {package}")
    return kernel


def _parse_modules_dep(moddir: Path) -> dict[str, list[str]]:
    """module name -> [its file, then its dependencies' files], as in modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_modname(path)] = [path, *rest.split()]
    return deps


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def _softdeps(moddir: Path) -> dict[str, list[str]]:
    """module -> the names its ``softdep ... pre:`` lines ask for (e.g. ext4 -> crypto-crc32c)."""
    out: dict[str, list[str]] = {}
    softdep = moddir / "modules.softdep"
    if softdep.exists():
        for line in softdep.read_text().splitlines():
            m = re.match(r"softdep\s+(\S+)\s+pre:\s*(.*?)(\s+post:.*)?$", line)
            if m:
                out.setdefault(m.group(1).replace("-", "_"), []).extend(m.group(2).split())
    return out


def _aliases(moddir: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (moddir / "modules.alias").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            out.setdefault(parts[1], []).append(parts[2].replace("-", "_"))
    return out


def module_load_order(moddir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[str]:
    """Relative paths of the modules to insmod, dependencies first, from modules.dep/softdep.

    Soft dependencies name aliases (``crypto-crc32c``): every module providing one is loaded
    when it is not built in (the kernel picks the best implementation itself)."""
    deps = _parse_modules_dep(moddir)
    soft = _softdeps(moddir)
    aliases = _aliases(moddir)
    builtin = {_modname(p) for p in (moddir / "modules.builtin").read_text().split() if p.strip()}
    path_to_name = {v[0]: k for k, v in deps.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(wanted_name: str) -> None:
        name = wanted_name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            # aliases keep their dashes (crypto-crc32c); module names do not
            providers = [p for p in aliases.get(wanted_name, []) if p in deps]
            if not providers:
                raise InitrdError(f"module {name} is in neither modules.dep nor modules.alias")
            for p in providers:
                visit(p)
            return
        for s in soft.get(name, []):
            visit(s)
        # modules.dep lists the full transitive set; visiting each keeps their own order right
        for dep_path in reversed(deps[name][1:]):
            visit(path_to_name[dep_path])
        order.append(deps[name][0])

    for w in wanted:
        visit(w)
    return order


def _libraries(programs: tuple[str, ...]) -> set[str]:
    """Every shared library (and the dynamic loader) the programs need, as ldd resolves them."""
    libs: set[str] = set()
    for prog in programs:
        for line in _run(["ldd", prog]).splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(m.group(1))
            elif "not found" in line:
                raise InitrdError(f"ldd {prog}: {line.strip()}")
    return libs


def _inputs(kernel: Kernel, order: list[str]) -> list[tuple[str, Path | bytes]]:
    """(path in the initrd, source file or content): everything the initrd is made of."""
    items: list[tuple[str, Path | bytes]] = [
        ("init", INIT.encode()),
        ("nixboot/stage1.sh", deploy_file("nixos", "client", "stage1.sh")),
        ("bin/busybox", Path(BUSYBOX)),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", b"root:x:0:\nnixbld:x:30000:\n"),
        ("etc/nixboot-modules.load", "".join(f"{p}\n" for p in order).encode()),
    ]
    if Path("/etc/mke2fs.conf").exists():
        items.append(("etc/mke2fs.conf", Path("/etc/mke2fs.conf")))
    items += [(f"lib/modules/{p}", kernel.moddir / p) for p in order]
    for prog in HOST_PROGRAMS:
        items.append((prog.lstrip("/"), Path(prog)))
    for lib in sorted(_libraries(HOST_PROGRAMS)):
        items.append((lib.lstrip("/"), Path(lib)))
    return items


def _digest(kernel: Kernel, items: list[tuple[str, Path | bytes]]) -> str:
    h = hashlib.sha256(kernel.package.encode())
    for name, src in items:
        h.update(name.encode() + b"\0")
        h.update(src if isinstance(src, bytes) else src.read_bytes())
    return h.hexdigest()[:20]


def _populate(root: Path, items: list[tuple[str, Path | bytes]]) -> None:
    for name, src in items:
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src.resolve(), dest)
        mode = 0o755 if name in ("init",) or name.startswith(("bin/", "usr/", "lib")) else 0o644
        dest.chmod(mode)
    # busybox applets; nix-store is nix under another name (nix dispatches on argv[0])
    applets = _run([BUSYBOX, "--list"]).split()
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for alias in ("nix-store", "nix-instantiate"):
        (root / "usr/bin" / alias).symlink_to("nix")
    (root / "usr/sbin/mkfs.ext4").symlink_to("mke2fs")
    # Debian's libraries live under /lib and /usr/lib; the loader is found as /lib64/ld-linux...
    (root / "lib64").mkdir(exist_ok=True)
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    if not loader.exists():
        loader.symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    for d in ("dev", "proc", "sys", "tmp", "run", "mnt-root", "root"):
        (root / d).mkdir(exist_ok=True)
    # the kernel opens /dev/console before /init runs
    os.mknod(root / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))


def _pack(root: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
        cwd=root,
        input=("\n".join([".", *names]) + "\n").encode(),
        capture_output=True,
        check=False,
    )
    if cpio.returncode != 0:
        raise InitrdError(f"cpio failed: {cpio.stderr.decode(errors='replace')}")
    # zstd: the kernel unpacks it several times faster than gzip, which counts under TCG
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=6, threads=-1).compress(cpio.stdout))
    tmp.rename(out)


def build(cache: Path = DEFAULT_CACHE) -> TestBootFiles:
    """The kernel and the test initrd, built once per distinct content."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod", "cpio", "ldd", *HOST_PROGRAMS):
        if not shutil.which(tool) and not Path(tool).exists():
            raise InitrdError(f"{tool} is missing (see deploy/packages/e2e.txt)")
    if not Path(BUSYBOX).exists():
        raise InitrdError(f"{BUSYBOX} is missing (busybox-static)")
    kernel = fetch_kernel(cache)
    order = module_load_order(kernel.moddir)
    items = _inputs(kernel, order)
    out = cache / f"initrd-{_digest(kernel, items)}.cpio.zst"
    with _locked(cache / "initrd.lock"):
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                root = Path(tmp) / "root"
                root.mkdir()
                _populate(root, items)
                _pack(root, out)
    return TestBootFiles(kernel=kernel.vmlinuz, initrd=out, kernel_version=kernel.version)


if __name__ == "__main__":
    files = build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE)
    print(files.kernel)
    print(files.initrd)
