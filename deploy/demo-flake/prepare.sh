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
# The expressions follow the checkout; knobs.nix is the copy's own once it exists.
for f in flake.nix system.nix; do
  cmp -s "$here/$f" "$dest/$f" || cp "$here/$f" "$dest/$f"
done
[ -e "$dest/knobs.nix" ] || cp "$here/knobs.nix" "$dest/knobs.nix"
cmp -s "$busybox" "$dest/bb/bin/busybox" || cp "$busybox" "$dest/bb/bin/busybox"
ln -sfn busybox "$dest/bb/bin/sh"
