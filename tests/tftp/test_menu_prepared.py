"""Menus are rendered ahead when a machine's lease arrives, so its request only fills in a new
boot id and token. What changes between the lease and the request must still be in the menu.

Pure: the handler the TFTP server calls, on a view filled directly (the service tests cover the
same path through NATS and real TFTP clients)."""

from __future__ import annotations

import re

from nixboot_shared import security
from nixboot_shared.records import Machine, MachineGenerations
from nixboot_tftp import content as content_module
from nixboot_tftp.content import MenuSettings, TftpContent
from nixboot_tftp.view import LocalView
from tests.tftp.tftp_helpers import gen

MAC = "52:54:00:aa:bb:09"
NAME = "pxelinux.cfg/01-52-54-00-aa-bb-09"
SECRET = "s" * 32


def menu_of(content: TftpContent, ip: str = "10.0.0.9") -> str:
    source = content(NAME, ip)
    assert source is not None
    with source.file as f:
        return f.read().decode()


def param(menu: str, name: str) -> list[str]:
    return re.findall(rf"nixboot\.{name}=(\S+)", menu)


def setup() -> tuple[LocalView, TftpContent]:
    view = LocalView()
    view.generations[MAC] = MachineGenerations(mac=MAC, generations=[gen(1)])
    view.machines[MAC] = Machine(mac=MAC, name="pc-09", attr="demo")
    content = TftpContent(view, MenuSettings("http://10.0.0.1:8080", SECRET, "cache:KEY1"))
    return view, content


def test_a_prepared_menu_is_the_fresh_one_with_a_new_boot_id_and_token() -> None:
    _, content = setup()
    fresh = menu_of(content)
    content.prepared.clear()
    content.prepare(MAC)
    assert content.prepared, "nothing was prepared"
    first, second = menu_of(content), menu_of(content, "10.0.0.10")
    ids = param(first, "boot_id") + param(second, "boot_id")
    assert len(set(ids)) == 2, "each request gets its own boot id"
    for menu in (first, second):
        (boot_id,) = param(menu, "boot_id")
        (token,) = param(menu, "token")
        assert security.check_boot_token(SECRET, boot_id, token)
        assert "\0" not in menu
        normal = menu.replace(boot_id, "ID").replace(token, "TOKEN")
        expected = fresh.replace(param(fresh, "boot_id")[0], "ID")
        assert normal == expected.replace(param(fresh, "token")[0], "TOKEN")


def test_what_changes_after_the_lease_is_in_the_menu() -> None:
    view, content = setup()
    content.prepare(MAC)
    # A new generation, a renamed machine and the cache's key arriving later: each is a new
    # record (or value) in the view, and must show in the next request.
    view.generations[MAC] = MachineGenerations(mac=MAC, generations=[gen(1), gen(2)])
    menu = menu_of(content)
    assert re.findall(r"^LABEL (\S+)$", menu, flags=re.M) == ["gen-2", "gen-1", "local"]
    view.machines[MAC] = Machine(mac=MAC, name="pc-renamed", attr="demo")
    assert "MENU TITLE nixboot: pc-renamed" in menu_of(content)
    content.settings.public_key = "cache:KEY2"
    assert param(menu_of(content), "key") == ["cache:KEY2", "cache:KEY2"]
    # A one-shot pin already spent by this service is not made default again.
    view.generations[MAC] = MachineGenerations(mac=MAC, generations=[gen(1), gen(2)], next_boot=1)
    assert "DEFAULT gen-1" in menu_of(content, "10.0.0.11")
    view.consumed_once[MAC] = 1
    assert "DEFAULT gen-2" in menu_of(content, "10.0.0.12")


def test_requests_for_unknown_macs_keep_nothing_and_leases_are_capped() -> None:
    """Anyone on the boot network can ask for menus of made-up MACs: those renders (the
    fallback menu) are not kept. Leases prepare menus, but only up to a cap."""
    _, content = setup()
    content.prepared.clear()
    for i in range(300):
        source = content(f"pxelinux.cfg/01-02-00-00-00-{i >> 8:02x}-{i & 255:02x}", "10.0.0.9")
        assert source is not None
        source.file.close()
    assert content.prepared == {}
    cap = content_module._MAX_PREPARED
    for i in range(cap // 2 + 10):
        content.prepare(f"02:00:00:01:{i >> 8 & 255:02x}:{i & 255:02x}")
    assert len(content.prepared) == cap
    content.prepare(MAC)  # the newest lease's menus are kept, the oldest went
    assert (MAC, True) in content.prepared and (MAC, False) in content.prepared
