#!/bin/sh
# Place a usable copy of the demo flake in DEST: the tracked files plus a static busybox (not
# committed: a 2 MB binary), which every derivation uses as its builder.
#   prepare.sh DEST [BUSYBOX]      (BUSYBOX defaults to /bin/busybox; it must be static)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:?usage: prepare.sh DEST [BUSYBOX]}
busybox=${2:-/bin/busybox}
if ldd "$busybox" >/dev/null 2>&1; then
  echo "prepare.sh: $busybox is not a static binary (install busybox-static)" >&2
  exit 1
fi
mkdir -p "$dest/bb/bin"
for f in flake.nix system.nix knobs.nix; do
  [ -e "$dest/$f" ] || cp "$here/$f" "$dest/$f"
done
cmp -s "$busybox" "$dest/bb/bin/busybox" || cp "$busybox" "$dest/bb/bin/busybox"
ln -sfn busybox "$dest/bb/bin/sh"
