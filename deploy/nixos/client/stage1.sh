#!/bin/sh
# nixboot client, stage 1: runs in the initrd of a network-booted machine.
#
#   stage1.sh run        the whole stage 1 (network, disk, mount, closure, switch_root to stage 2);
#                        what a plain initrd's /init execs (the e2e tests run exactly this)
#   stage1.sh disk       check the disk against the declared layout, create it only if it differs
#   stage1.sh closure    substitute the generation's closure into /mnt-root from the nixboot cache
#   stage1.sh report STAGE STATUS [DETAIL [BYTES [SECONDS]]]
#                        one report to the cache (also used by stage 2 to say `booted`)
#
# The NixOS module (default.nix) calls `disk` from preLVMCommands and `closure` from
# postMountCommands and lets NixOS's own stage 1 mount the disk and switch_root.
#
# Parameters come from the kernel command line (written by nixboot's menus):
#   nixboot.toplevel= nixboot.cache= nixboot.key= nixboot.boot_id= nixboot.token= nixboot.mac=
#   nixboot.generation= init=
# and optionally (the declared disk layout; defaults in brackets):
#   nixboot.disk=[auto: first of /dev/vda /dev/sda /dev/nvme0n1]  nixboot.table=[gpt|dos]
#   nixboot.label=[nixboot]  nixboot.fs=[ext4]  nixboot.jobs=[8]
#   nixboot.onfail=[reboot|poweroff|shell]
# Environment variables NIXBOOT_DISK, NIXBOOT_TABLE, NIXBOOT_LABEL, NIXBOOT_FS set the defaults
# (the NixOS module sets them from its options); the command line wins.
#
# POSIX sh; works with busybox. Needs: sfdisk, blkid, mkfs.<fs>, mount, nix-store, and curl or
# wget for reports. A report that fails never stops the boot.

set -u

MNT=${NIXBOOT_MNT:-/mnt-root}

log() { echo "nixboot-stage1: $*" >&2; }

# ---------------------------------------------------------------- parameters
CMDLINE=$(cat "${NIXBOOT_CMDLINE_FILE:-/proc/cmdline}" 2>/dev/null || true)

param() { # param NAME [DEFAULT]: value of NAME=... on the kernel command line
    _v=
    for _w in $CMDLINE; do
        case "$_w" in "$1="*) _v=${_w#*=} ;; esac
    done
    if [ -n "$_v" ]; then echo "$_v"; else echo "${2:-}"; fi
}

TOPLEVEL=$(param nixboot.toplevel)
CACHE=$(param nixboot.cache)
CACHE=${CACHE%/}
KEY=$(param nixboot.key)
BOOT_ID=$(param nixboot.boot_id)
TOKEN=$(param nixboot.token)
# menus write the MAC as aa:bb:.. (iPXE, cache) or aa-bb-.. (pxelinux, tftp): compare it the way
# sysfs writes it
MAC=$(param nixboot.mac | tr 'A-F-' 'a-f:')
GENERATION=$(param nixboot.generation)
INIT=$(param init)
DISK=$(param nixboot.disk "${NIXBOOT_DISK:-auto}")
TABLE=$(param nixboot.table "${NIXBOOT_TABLE:-gpt}")
LABEL=$(param nixboot.label "${NIXBOOT_LABEL:-nixboot}")
FS=$(param nixboot.fs "${NIXBOOT_FS:-ext4}")
JOBS=$(param nixboot.jobs 8)
ONFAIL=$(param nixboot.onfail "${NIXBOOT_ONFAIL:-reboot}")

# ---------------------------------------------------------------- time
uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { printf "%.2f", b - a }'; }

# ---------------------------------------------------------------- reports
json_str() { # a JSON string literal; control characters become spaces
    _e=$(printf '%s' "$1" | tr '\n\r\t' '   ' | sed 's/\\/\\\\/g; s/"/\\"/g')
    printf '"%s"' "$_e"
}

json_num() { # a JSON number or null
    case "$1" in
        '' | *[!0-9.]* | *.*.*) echo null ;;
        *) echo "$1" ;;
    esac
}

report() { # report STAGE STATUS [DETAIL [BYTES [SECONDS]]]; never fails
    _stage=$1 _status=$2 _detail=${3:-} _bytes=${4:-} _secs=${5:-}
    log "report $_stage $_status ${_detail}"
    if [ -z "$CACHE" ] || [ -z "$BOOT_ID" ]; then
        return 0
    fi
    # no MAC on the command line: null (the cache rejects an empty string as a MAC)
    _mac=null
    [ -n "$MAC" ] && _mac=$(json_str "$MAC")
    _body=$(printf '{"stage":%s,"status":%s,"detail":%s,"bytes":%s,"seconds":%s,"mac":%s,"token":%s}' \
        "$(json_str "$_stage")" "$(json_str "$_status")" "$(json_str "$_detail")" \
        "$(json_num "$_bytes")" "$(json_num "$_secs")" "$_mac" "$(json_str "$TOKEN")")
    _url="$CACHE/report/$BOOT_ID"
    # Short timeouts: the cache being slow or down must not hold the boot up.
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 4 -o /dev/null -H 'Content-Type: application/json' \
            -H "Authorization: Bearer $TOKEN" --data "$_body" "$_url" >/dev/null 2>&1 ||
            log "report $_stage $_status not delivered (ignored)"
    elif command -v wget >/dev/null 2>&1; then
        # `timeout`, not wget -T: Debian's static busybox wget crashes with -T
        _tmo=
        command -v timeout >/dev/null 2>&1 && _tmo="timeout 5"
        $_tmo wget -q -O /dev/null --header 'Content-Type: application/json' \
            --header "Authorization: Bearer $TOKEN" --post-data "$_body" "$_url" >/dev/null 2>&1 ||
            log "report $_stage $_status not delivered (ignored)"
    else
        log "no curl or wget: report $_stage $_status not sent"
    fi
    return 0
}

fail() { # report the failure, then do what nixboot.onfail says
    report failed failed "$*"
    log "FAILED: $*"
    echo "NIXBOOT-FAILED $*" >/dev/console 2>/dev/null || true
    case "$ONFAIL" in
        shell) exec sh -i ;;
        poweroff) sync; poweroff -f ;;
        *) sleep 30; sync; reboot -f ;;
    esac
    exit 1
}

# ---------------------------------------------------------------- disk layout
find_disk() {
    if [ "$DISK" != auto ]; then
        echo "$DISK"
        return 0
    fi
    for _d in /dev/vda /dev/sda /dev/nvme0n1 /dev/xvda; do
        if [ -b "$_d" ]; then
            echo "$_d"
            return 0
        fi
    done
    return 1
}

part_dev() { # the first partition of a disk: /dev/vda -> /dev/vda1, /dev/nvme0n1 -> /dev/nvme0n1p1
    case "$1" in
        *[0-9]) echo "${1}p1" ;;
        *) echo "${1}1" ;;
    esac
}

layout_differs() { # prints why the disk differs from the declared layout; status 0 = differs
    _disk=$1 _part=$(part_dev "$1")
    _dump=$(sfdisk -d "$_disk" 2>/dev/null) || {
        echo "no partition table"
        return 0
    }
    _table=$(echo "$_dump" | sed -n 's/^label: *//p')
    if [ "$_table" != "$TABLE" ]; then
        echo "partition table is '${_table:-none}', declared '$TABLE'"
        return 0
    fi
    _nparts=$(echo "$_dump" | grep -c '^/dev/')
    if [ "$_nparts" != 1 ]; then
        echo "$_nparts partitions, declared 1"
        return 0
    fi
    if [ "$TABLE" = gpt ] && ! echo "$_dump" | grep -q "^$_part .*name=\"$LABEL\""; then
        echo "partition name is not '$LABEL'"
        return 0
    fi
    _fstype=$(blkid -p -o value -s TYPE "$_part" 2>/dev/null || true)
    if [ "$_fstype" != "$FS" ]; then
        echo "filesystem is '${_fstype:-none}', declared '$FS'"
        return 0
    fi
    _fslabel=$(blkid -p -o value -s LABEL "$_part" 2>/dev/null || true)
    if [ "$_fslabel" != "$LABEL" ]; then
        echo "filesystem label is '${_fslabel:-none}', declared '$LABEL'"
        return 0
    fi
    return 1
}

wait_for_block() { # udev (NixOS) or devtmpfs (plain initrd) creates the node shortly after
    _i=0
    while [ ! -b "$1" ] && [ $_i -lt 50 ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    [ -b "$1" ]
}

create_layout() {
    _disk=$1 _part=$(part_dev "$1")
    case "$TABLE" in
        gpt) _spec=$(printf 'label: gpt\ntype=L, name="%s"\n' "$LABEL") ;;
        dos) _spec=$(printf 'label: dos\ntype=L\n') ;;
        *) fail "unknown partition table type '$TABLE'" ;;
    esac
    echo "$_spec" | sfdisk -q --wipe always --wipe-partitions always "$_disk" >&2 ||
        fail "sfdisk $_disk failed"
    wait_for_block "$_part" || fail "$_part did not appear after partitioning"
    # -F: the partition is new, whatever signature an old one left is garbage now
    # lazy init: the kernel zeroes inode tables and the journal later, not during the boot
    "mkfs.$FS" -q -F -L "$LABEL" -E lazy_itable_init=1,lazy_journal_init=1 "$_part" >&2 ||
        fail "mkfs.$FS $_part failed"
}

do_disk() {
    _t0=$(uptime_s)
    _disk=$(find_disk) || fail "no disk found (nixboot.disk=$DISK)"
    wait_for_block "$_disk" || fail "disk $_disk is not a block device"
    _layout="$TABLE/$LABEL/$FS"
    if _why=$(layout_differs "$_disk"); then
        log "$_disk differs from $_layout ($_why): partitioning"
        create_layout "$_disk"
        report disk done "created $_layout on $_disk ($_why)" "" "$(since "$_t0")"
    else
        log "$_disk matches $_layout: kept"
        report disk done "kept $_layout on $_disk (layout matches)" "" "$(since "$_t0")"
    fi
    PART=$(part_dev "$_disk")
}

do_mount() {
    _part=$1
    mkdir -p "$MNT"
    mount -t "$FS" "$_part" "$MNT" || fail "mount $_part $MNT failed"
}

# ---------------------------------------------------------------- closure
do_closure() {
    [ -n "$TOPLEVEL" ] || fail "nixboot.toplevel is missing from the kernel command line"
    [ -n "$CACHE" ] || fail "nixboot.cache is missing from the kernel command line"
    [ -n "$KEY" ] || fail "nixboot.key is missing from the kernel command line"
    report closure started "$TOPLEVEL"
    _t0=$(uptime_s)
    mkdir -p /tmp "$MNT/nix/store" "$MNT/nix/var/nix"
    _out=/tmp/nixboot-closure.log
    # No daemon, no builds: only substitution from our cache, whose key is the only one trusted.
    # XDG_CACHE_HOME: nix keeps a narinfo cache there; the initrd's /tmp is fresh every boot.
    HOME=/tmp XDG_CACHE_HOME=/tmp/nix-cache USER=root NIX_CONFIG='
sandbox = false
build-users-group =
substitute = true
experimental-features = nix-command
' nix-store --store "local?root=$MNT" -r "$TOPLEVEL" \
        --option substituters "$CACHE" \
        --option trusted-public-keys "$KEY" \
        --option require-sigs true \
        --option connect-timeout 5 \
        --option http-connections 25 \
        -j "$JOBS" >/dev/null 2>"$_out"
    _rc=$?
    _secs=$(since "$_t0")
    cat "$_out" >&2
    if [ $_rc -ne 0 ]; then
        fail "nix-store -r $TOPLEVEL failed (exit $_rc): $(tail -n 3 "$_out" | tr '\n' ' ')"
    fi
    [ -e "$MNT$TOPLEVEL" ] || fail "$TOPLEVEL is not in $MNT after nix-store -r"
    # nix prints "these N paths will be fetched (X MiB download, Y MiB unpacked):" and one
    # "copying path '<path>' from ..." line per path; nothing when the closure is already there.
    # Its MiB figures are rounded to 0.01: the exact NAR sizes come from the new store's database.
    _fetched=$(sed -n "s/^copying path '\([^']*\)'.*/\1/p" "$_out")
    _paths=0 _bytes=0
    if [ -n "$_fetched" ]; then
        _paths=$(echo "$_fetched" | wc -l)
        # shellcheck disable=SC2086 # one argument per store path
        _bytes=$(nix-store --store "local?root=$MNT" -q --size $_fetched 2>/dev/null |
            awk '{ s += $1 } END { printf "%d", s }')
    fi
    _download=$(sed -n 's/.*will be fetched (\([0-9.]* [KMG]*i*B\) download.*/\1/p' "$_out")
    report closure done "fetched $_paths paths (NAR $_bytes bytes, download ${_download:-0 MiB}) for $TOPLEVEL" \
        "$_bytes" "$_secs"
}

# ---------------------------------------------------------------- network (plain initrds only)
find_nic() { # the NIC whose MAC is nixboot.mac, else the first non-loopback one
    for _d in /sys/class/net/*; do
        _n=${_d##*/}
        [ "$_n" = lo ] && continue
        if [ -z "$MAC" ] || [ "$(cat "$_d/address")" = "$MAC" ]; then
            echo "$_n"
            return 0
        fi
    done
    return 1
}

do_network() {
    _i=0
    while ! _nic=$(find_nic) && [ $_i -lt 100 ]; do
        sleep 0.1
        _i=$((_i + 1))
    done
    [ -n "${_nic:-}" ] || fail "no network interface${MAC:+ with MAC $MAC}"
    ip link set lo up
    ip link set "$_nic" up
    _script=/tmp/nixboot-udhcpc.sh
    cat >"$_script" <<'EOF'
#!/bin/sh
case "$1" in
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "${router:-}" ] && ip route add default via "${router%% *}" dev "$interface"
    echo "nixboot-stage1: $interface has $ip" >&2
    ;;
esac
exit 0
EOF
    chmod 755 "$_script"
    udhcpc -i "$_nic" -s "$_script" -q -n -t 10 -T 2 -V nixboot-stage1 >&2 ||
        fail "no DHCP lease on $_nic"
}

# ---------------------------------------------------------------- stage 2
do_switch() {
    [ -n "$INIT" ] || fail "init= is missing from the kernel command line"
    [ -x "$MNT$INIT" ] || fail "$INIT is not executable in $MNT"
    # switch_root needs the new root to be a mount point with the API filesystems moved into it.
    _mounted=$(awk '{ print $2 }' /proc/mounts)
    for _fs in dev sys run proc; do
        mkdir -p "$MNT/$_fs"
        if echo "$_mounted" | grep -qx "/$_fs"; then
            mount --move "/$_fs" "$MNT/$_fs" || mount -o bind "/$_fs" "$MNT/$_fs"
        fi
    done
    report stage2 started "$INIT (generation ${GENERATION:-?})"
    exec switch_root "$MNT" "$INIT"
}

run_all() {
    _t0=$(uptime_s)
    # reports need an address: the network comes first
    if [ "${NIXBOOT_SKIP_NETWORK:-0}" != 1 ]; then
        do_network
    fi
    report stage1 started "generation ${GENERATION:-?} ${TOPLEVEL}"
    do_disk
    do_mount "$PART"
    do_closure
    report stage1 done "" "" "$(since "$_t0")"
    do_switch
}

case "${1:-run}" in
    run) run_all ;;
    disk) do_disk ;;
    closure) do_closure ;;
    network) do_network ;;
    report)
        shift
        [ $# -ge 2 ] || {
            log "usage: stage1.sh report STAGE STATUS [DETAIL [BYTES [SECONDS]]]"
            exit 2
        }
        report "$@"
        ;;
    *)
        log "usage: stage1.sh run|disk|closure|network|report"
        exit 2
        ;;
esac
