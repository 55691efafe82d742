#!/bin/sh
# The nixboot lease hook every DHCP server runs (dnsmasq --dhcp-script, Kea libdhcp_run_script.so
# "name", ISC dhcpd execute()). Install with @STATE_DIR@ filled in (the nixboot state directory:
# spool/ and dhcp-hook.sock live there), mode 0755.
#
# POSIX sh, shell builtins only on the normal path (no fork, no exec): ~1 ms and ~1 ms CPU per
# lease instead of ~9 ms for `python3 -S -I hook.py` (bench/dhcp_hook_bench.py). It writes the
# call -- argv and the exported environment, as `export -p` prints it -- to one spool file; the
# dhcp-hook service sees the file closed (inotify IN_CLOSE_WRITE) and records it, and drains the
# spool at start and every 2 s, so a lease is kept while the service or NATS is down. It parses
# nothing (bad input is the service's to log and count) and always exits 0: a failed hook must
# never fail a lease.
#
# File: NUL-separated `nixboot-dhcp-hook/sh1 argc argv... <export -p> nixboot-dhcp-hook/end\n`.
# The end marker stands in for the temp-file-and-rename of hook.py (mv would cost an exec): the
# service takes a file without it for one still being written, and moves it aside once old. The
# call's time is the file's mtime. No fsync (as hook.py: the DHCP server waits for us).
#
# Leading options override where to write: --state-dir DIR, --spool-dir DIR, --socket PATH (only
# used to warn when the service is not running); else NIXBOOT_DHCP_HOOK__SPOOL_DIR,
# NIXBOOT_STATE_DIR, else the same defaults as the service. Kea gives its scripts no environment,
# hence the state directory written into this file.
state='@STATE_DIR@'
spool= sock=
while [ $# -ge 2 ]; do
  case $1 in
    --state-dir) state=$2 ;;
    --spool-dir) spool=$2 ;;
    --socket) sock=$2 ;;
    *) break ;;
  esac
  shift 2
done
case $state in
  '@'*'@')  # not filled in: the service's own rule
    if [ -n "$NIXBOOT_STATE_DIR" ]; then state=$NIXBOOT_STATE_DIR
    elif [ "$(id -u)" = 0 ]; then state=/var/lib/nixboot
    else state=${XDG_STATE_HOME:-${HOME:-/}/.local/state}/nixboot
    fi ;;
esac
[ -n "$spool" ] || spool=${NIXBOOT_DHCP_HOOK__SPOOL_DIR:-$state/spool}
[ -n "$sock" ] || sock=${NIXBOOT_DHCP_HOOK__SOCKET:-$state/dhcp-hook.sock}

say() {
  # stderr (dnsmasq and ISC dhcpd log it) and syslog (Kea discards the script's output).
  printf 'nixboot-dhcp-hook: %s\n' "$1" >&2
  logger -t nixboot-dhcp-hook -p daemon.warning -- "$1" 2>/dev/null
}

umask 027   # the service's group reads the spool, nobody else
set -C      # noclobber: `>` creates exclusively (O_EXCL), never into another call's file
n=0
# A name left by an earlier call with our pid (service down, pid reused): take the next one. Only
# a process with our pid writes sh-<pid>-*, so no other call can take the name we found free.
while [ -e "$spool/sh-$$-$n.lease" ] && [ $n -lt 1000 ]; do n=$((n + 1)); done
f=$spool/sh-$$-$n.lease
write() {
  { printf 'nixboot-dhcp-hook/sh1\0%s\0' $# && { [ $# -eq 0 ] || printf '%s\0' "$@"; } &&
    export -p && printf '\0nixboot-dhcp-hook/end\n'; } 2>/dev/null >"$f"
}
if ! write "$@"; then
  # First lease before the service ever ran: no spool directory yet.
  if [ -e "$f" ] || [ -d "$spool" ] || ! mkdir -p -m 0770 "$spool" 2>/dev/null || ! write "$@"
  then
    # A partial file (disk full) has no end marker: the service moves it aside, logged.
    say "lease change lost: cannot write $f"
    exit 0
  fi
fi
[ -S "$sock" ] || say "service not running (no socket $sock); spooled to $f"
exit 0
