"""The POSIX sh hook (deploy/dhcp/nixboot-dhcp-hook.sh) under the shells a DHCP server's host may
have as /bin/sh, its file format as the service decodes it, and the service's handling of spool
files that are malformed or still being written."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nixboot_dhcp_hook import hook, parse
from nixboot_dhcp_hook.service import REJECTED_DIR, REJECTED_KEEP
from tests.conftest import tool
from tests.dhcp_hook.conftest import DEPLOY, Bus, HookService, random_mac, run_hook, wait_for

SH_HOOK = DEPLOY / "nixboot-dhcp-hook.sh"
# Values a DHCP server may pass: quotes of both kinds, newline, $, backslash, non-ASCII, '='.
TRICKY = {
    "DNSMASQ_SUPPLIED_HOSTNAME": 'it\'s "pc" $HOME \\n\nline2 é = x',
    "DNSMASQ_TAGS": "nb-arch-7 br0",
    "LEASE4_ADDRESS": "10.0.0.9",
    "DNSMASQ_EMPTY": "",
    "UNRELATED": "not captured",
}
ARGV = ["add", "52:54:00:aa:bb:cc", "10.0.0.9", "host with 'quotes' and\nnewline", ""]


def shells() -> list[list[str]]:
    """dash (Debian's /bin/sh), busybox ash, bash (whose `export -p` quotes differently)."""
    found = [["/bin/sh"], [tool("busybox"), "sh"]]
    if shutil.which("bash"):
        found.append([str(shutil.which("bash"))])
    return found


def run_sh_hook(shell: list[str], spool: Path, argv: list[str], env: dict[str, str]) -> Path:
    p = subprocess.run(
        [*shell, str(SH_HOOK), "--spool-dir", str(spool), *argv],
        env=env,
        capture_output=True,
        timeout=10,
    )
    assert p.returncode == 0, p.stderr
    [written] = list(spool.glob("*.lease"))
    return written


@pytest.mark.parametrize("shell", shells(), ids=lambda s: Path(s[0]).name)
def test_sh_hook_file_decodes_to_the_exact_call(shell: list[str], tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # does not exist yet: the hook makes it
    before = time.time()
    path = run_sh_hook(shell, spool, ARGV, TRICKY)
    assert path.name.startswith("sh-") and (path.stat().st_mode & 0o777) == 0o640
    call = parse.decode_sh_payload(path.read_bytes(), path.stat().st_mtime, hook.ENV_PREFIXES)
    assert call.argv == ARGV
    assert call.env == {k: v for k, v in TRICKY.items() if k != "UNRELATED"}
    assert before - 1 <= call.ts <= time.time() + 1


def test_sh_hook_takes_the_next_name_when_its_own_is_taken(tmp_path: Path) -> None:
    """A file left under the hook's own first name (an earlier call with the same pid, the
    service down) is never overwritten: the hook takes the next free name. `exec` keeps the
    pid, so the name is taken before the hook runs."""
    spool = tmp_path / "spool"
    spool.mkdir()
    script = 'printf taken > "$1/sh-$$-0.lease"; echo $$; exec /bin/sh "$2" --spool-dir "$1" add'
    p = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(spool), str(SH_HOOK)],
        env={}, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    pid = int(p.stdout)
    assert (spool / f"sh-{pid}-0.lease").read_bytes() == b"taken"
    assert {f.name for f in spool.glob("*.lease")} == {f"sh-{pid}-0.lease", f"sh-{pid}-1.lease"}
    assert parse.is_sh_payload((spool / f"sh-{pid}-1.lease").read_bytes())


def test_unfilled_template_follows_the_service_defaults(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, _, err = run_hook(
        SH_HOOK, ["add", random_mac(), "10.0.0.1"], {"NIXBOOT_STATE_DIR": str(state)}
    )
    assert code == 0 and "service not running" in err
    assert len(list((state / "spool").glob("sh-*.lease"))) == 1


def test_export_forms_of_other_shells() -> None:
    """bash's `declare -x` with double quotes and $'...' (octal bytes of UTF-8, \\x, \\u), an
    exported variable without a value, backslash escapes outside quotes."""
    text = (
        "declare -x OLDPWD\n"
        'declare -x DNSMASQ_A="say \\"hi\\" \\$HOME \\\\ end"\n'
        "declare -x DNSMASQ_B=$'it\\'s\\n\\303\\251\\x41\\u00e9\\t'\n"
        "export DNSMASQ_C=a\\ b'c'\n"
    )
    payload = b"nixboot-dhcp-hook/sh1\x000\x00" + text.encode() + b"\x00nixboot-dhcp-hook/end\n"
    call = parse.decode_sh_payload(payload, 5.0, hook.ENV_PREFIXES)
    assert call.env == {
        "DNSMASQ_A": 'say "hi" $HOME \\ end',
        "DNSMASQ_B": "it's\néAé\t",
        "DNSMASQ_C": "a bc",
    }
    assert (call.ts, call.argv) == (5.0, [])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"nixboot-dhcp-hook/sh1\x001\x00add\x00", "no end marker"),
        (b"nixboot-dhcp-hook/sh1\x005\x00add\x00\x00nixboot-dhcp-hook/end\n", "header is damaged"),
        (b"nixboot-dhcp-hook/sh1\x001\x00\xff\x00\x00nixboot-dhcp-hook/end\n", "not UTF-8"),
        (b"nixboot-dhcp-hook/sh1\x000\x00export 1X='a'\n\x00nixboot-dhcp-hook/end\n", "NAME=V"),
        (b"nixboot-dhcp-hook/sh1\x000\x00export X='a\n\x00nixboot-dhcp-hook/end\n", "unterminated"),
        (b"junk", "not a nixboot sh hook file"),
    ],
)
def test_damaged_sh_files_are_rejected_clearly(payload: bytes, message: str) -> None:
    with pytest.raises(parse.BadLease, match=message):
        parse.decode_sh_payload(payload, 0.0, hook.ENV_PREFIXES)


async def test_malformed_spool_files_are_moved_aside_counted_and_logged(
    hook_service: HookService, bus_reader: Bus, tmp_path: Path
) -> None:
    spool = hook_service.spool
    hook_sh = hook_service.wrapper(tmp_path)
    mac = random_mac()
    bad = {
        "junk.lease": b"\x00\x01 not a hook call",
        "big.lease": b"nixboot-dhcp-hook/sh1\x00" + b"x" * (2 << 20),
        "badmac.lease": b"nixboot-dhcp-hook/sh1\x003\x00add\x0052:54:00\x0010.0.0.1"
        b"\x00\x00nixboot-dhcp-hook/end\n",
    }
    before_spool = hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-spool")
    before_dnsmasq = hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-dnsmasq")
    for name, data in bad.items():
        (spool / name).write_bytes(data)  # written and closed: inotify hands it over at once
    # A file still being written (no end marker, young) is left alone...
    writing = spool / "sh-1-0.lease"
    head = (
        f"nixboot-dhcp-hook/sh1\x003\x00add\x00{mac}\x0010.9.7.7\x00export DNSMASQ_LEASE_EXPIRES="
    ).encode()
    writing.write_bytes(head)
    # ...and one whose writer died long ago goes aside with the rest.
    dead = spool / "sh-2-0.lease"
    dead.write_bytes(head)
    os.utime(dead, (time.time() - 120, time.time() - 120))
    rejected = spool / REJECTED_DIR
    want = {*bad, dead.name}
    wait_for(
        lambda: {p.name for p in rejected.glob("*.lease")} == want, 10, "malformed files aside"
    )
    assert hook_service.metric("nixboot_dhcp_spool_rejected_total") == len(want)
    assert hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-spool") == (
        before_spool + 3
    )
    assert hook_service.metric("nixboot_bad_input_total", source="dhcp-hook-dnsmasq") == (
        before_dnsmasq + 1
    )
    log = hook_service.log()
    assert "spool file junk.lease: not a nixboot hook payload" in log
    assert "spool file big.lease:" in log and "more than any hook call" in log
    assert "spool file badmac.lease: invalid MAC address '52:54:00'" in log
    assert "spool file sh-2-0.lease: sh hook file has no end marker" in log
    assert f"moved to {rejected / 'junk.lease'}" in log
    assert writing.exists()  # left for its writer
    # The writer finishes: the close hands it to the service, which records it.
    with writing.open("ab") as f:
        f.write(b"'4000000000'\n\x00nixboot-dhcp-hook/end\n")
    [ev] = await bus_reader.lease_events(mac, 1)
    assert (ev.ip, ev.expires) == ("10.9.7.7", 4000000000)
    wait_for(lambda: not writing.exists(), 5, "the finished file deleted once recorded")
    # Nothing crashed: the hook still goes through.
    other = random_mac()
    assert run_hook(hook_sh, ["add", other, "10.9.7.8"])[0] == 0
    assert len(await bus_reader.lease_events(other, 1)) == 1


async def test_rejected_files_are_capped_to_the_newest(hook_service: HookService) -> None:
    """Junk written into the spool, again and again, never fills the disk: rejected/ keeps the
    last REJECTED_KEEP files moved aside, every one still counted."""
    spool = hook_service.spool
    rejected = spool / REJECTED_DIR
    before = hook_service.metric("nixboot_dhcp_spool_rejected_total")
    extra = 5
    names = [f"junk-{i:03d}.lease" for i in range(REJECTED_KEEP + extra)]
    for name in names:
        (spool / name).write_bytes(b"not a hook call")
    wait_for(
        lambda: hook_service.metric("nixboot_dhcp_spool_rejected_total") == before + len(names),
        20,
        "every junk file rejected",
    )
    kept = {p.name for p in rejected.iterdir()}
    assert len(kept) == REJECTED_KEEP
    assert names[-1] in kept and names[0] not in kept  # the newest kept, the oldest gone


def test_a_full_disk_loses_the_call_loudly_and_never_passes_a_partial_file(tmp_path: Path) -> None:
    """The spool on a tmpfs with one free page, and a call longer than that: the hook says the
    lease change is lost and still exits 0 (a failed hook must not fail the lease); the partial
    file has no end marker, so the service never records it (and moves it aside once old, as
    tested above). With space again, the next call goes through whole.

    The tmpfs lives in a private mount namespace held by a `sleep`; this test reaches it through
    /proc/<pid>/root, so the host's mounts are never touched."""
    spool = tmp_path / "spool"
    spool.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=8k,mode=0770 nixboot-test {spool} && echo up && exec sleep 600"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        tiny = Path(f"/proc/{holder.pid}/root") / spool.relative_to("/")
        (tiny / "filler").write_bytes(b"x" * 4096)  # of two pages, one left
        env = {"PATH": os.environ["PATH"], "DNSMASQ_SUPPLIED_HOSTNAME": "y" * 6000}
        argv = ["add", "52:54:00:aa:bb:dd", "10.0.0.10"]
        p = subprocess.run(
            ["/bin/sh", str(SH_HOOK), "--spool-dir", str(tiny), *argv],
            env=env, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert "lease change lost: cannot write" in p.stderr, p.stderr
        [partial] = list(tiny.glob("*.lease"))
        assert 0 < partial.stat().st_size < 6000
        with pytest.raises(parse.IncompleteHookFile):
            parse.decode_sh_payload(partial.read_bytes(), 0.0, hook.ENV_PREFIXES)
        # Space again (the admin cleaned up; the service moved the partial file aside).
        (tiny / "filler").unlink()
        partial.unlink()
        written = run_sh_hook(["/bin/sh"], tiny, argv, env)
        call = parse.decode_sh_payload(written.read_bytes(), 0.0, hook.ENV_PREFIXES)
        assert call.argv == argv and call.env["DNSMASQ_SUPPLIED_HOSTNAME"] == "y" * 6000
    finally:
        holder.kill()
        holder.wait(10)
