#!/bin/sh
# The Python variant of nixboot-dhcp-hook.sh (that one is the default: ~1 ms instead of ~9 ms).
# The lease script every DHCP server runs (dnsmasq --dhcp-script, Kea libdhcp_run_script.so "name",
# ISC dhcpd execute()). Install with the placeholders filled in, mode 0755.
#
# Why a wrapper: Kea starts its script with an empty environment (no PATH, no NIXBOOT_*), so where
# to deliver is passed as options; and `python3 -S -I` (no site-packages scan, no user site) starts
# in ~8-15 ms instead of ~40 ms for the venv's `nixboot-dhcp-hook` console script. hook.py imports
# only the standard library, never the venv.
#   @PYTHON@     /usr/bin/python3
#   @HOOK_PY@    .../site-packages/nixboot_dhcp_hook/hook.py  (python3 -c 'import nixboot_dhcp_hook.hook as h; print(h.__file__)')
#   @STATE_DIR@  the nixboot state directory (socket dhcp-hook.sock and spool/ live there)
exec @PYTHON@ -S -I @HOOK_PY@ --state-dir @STATE_DIR@ "$@"
