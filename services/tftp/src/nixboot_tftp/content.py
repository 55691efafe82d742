"""What the TFTP server answers beyond the files in its root: per-machine pxelinux menus (rendered
when the machine's lease arrives, completed with a new boot id at request time, rendered afresh if
its records changed since), and generations' kernels/initrds from the Nix store.

Runs inside the TFTP loop, so it answers only from the local view (memory) and never waits on NATS;
``prepare`` alone runs on the asyncio thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nixboot_shared import pins, security, subjects
from nixboot_shared.menu import BootParams, MenuSpec, ordered_entries, render_pxelinux
from nixboot_shared.records import Machine, MachineGenerations
from nixboot_tftp import metrics
from nixboot_tftp.files import NotFound, memory_file, open_regular
from nixboot_tftp.names import (
    BOOT_DIR,
    MENU_DIR,
    MenuName,
    hex_to_ip,
    ip_to_hex,
    parse_menu_name,
)
from nixboot_tftp.server import Source
from nixboot_tftp.view import LocalView

log = logging.getLogger(__name__)

# Boot programs that can fetch kernels over HTTP: their menus point at the cache service.
HTTP_CAPABLE = frozenset({"lpxelinux.0"})
TFTP_ONLY = frozenset({"pxelinux.0"})
_MAX_CLIENTS_REMEMBERED = 50_000
# Menus rendered ahead, two per machine: a few MB for a large site. Leases are capped by it, and
# requests naming unknown MACs (anyone on the boot network can send them) keep nothing.
_MAX_PREPARED = 10_000
# pxelinux reads its menu file twice in one boot: ldlinux.c32 fetches it, then menu.c32 (the
# config's UI) fetches it again ~0.1 s later. A menu that spends a one-shot pin is answered again,
# unchanged, to the same client within this window: otherwise the first transfer spends the pin
# and the second, the one the machine boots from, shows the newest generation. A reboot takes far
# longer than this.
REREAD_SECONDS = 3.0


@dataclass(frozen=True)
class MenuInfo:
    """Carried from the render to the end of the transfer (events, one-shot pin)."""

    boot_id: str
    default_generation: int | None
    generations: list[int] = field(default_factory=list)
    fallback: bool = False
    once: int | None = None  # the one-shot pin this menu made default


# What each boot gets anew, left as slots in a prepared menu (NUL appears in no menu text).
_BOOT_ID_SLOT = "\0boot-id\0"
_TOKEN_SLOT = "\0token\0"


@dataclass(frozen=True)
class _Prepared:
    """A menu rendered ahead, and the view's records it was rendered from."""

    made_from: tuple[MachineGenerations | None, Machine | None, str]
    text: str
    info: MenuInfo

    def made_from_same(self, now: tuple[MachineGenerations | None, Machine | None, str]) -> bool:
        # By identity: the view replaces a record whole whenever it changes.
        gens, machine, key = self.made_from
        return gens is now[0] and machine is now[1] and key == now[2]


@dataclass
class MenuSettings:
    cache_url: str
    secret: str
    public_key: str
    timeout_seconds: int = 5
    title: str = "nixboot"


class TftpContent:
    """The dynamic handler given to ``SafeTftpServer``."""

    def __init__(self, view: LocalView, settings: MenuSettings) -> None:
        self.view = view
        self.settings = settings
        # client ip -> whether its boot program fetches over HTTP (it fetched lpxelinux.0)
        self.http_clients: OrderedDict[str, bool] = OrderedDict()
        self.clock: Callable[[], float] = time.perf_counter
        # (client ip, menu name) -> (rendered at, text, mac, info) of menus that spent a pin
        self.recent: OrderedDict[tuple[str, str], tuple[float, bytes, str | None, MenuInfo]] = (
            OrderedDict()
        )
        # (mac, http) -> its menu rendered ahead (insertion-ordered: the oldest go first)
        self.prepared: dict[tuple[str | None, bool], _Prepared] = {}
        self._prepared_lock = threading.Lock()

    def __call__(self, name: str, client_ip: str) -> Source | None:
        if name.startswith(MENU_DIR + "/"):
            return self.menu(name[len(MENU_DIR) + 1 :], client_ip)
        if name.startswith(BOOT_DIR + "/"):
            return self.boot_file(name)
        base = name.rsplit("/", 1)[-1]
        if base in HTTP_CAPABLE or base in TFTP_ONLY:
            self._remember(client_ip, base in HTTP_CAPABLE)
        return None  # a file under the root

    def _remember(self, ip: str, http: bool) -> None:
        self.http_clients[ip] = http
        self.http_clients.move_to_end(ip)
        while len(self.http_clients) > _MAX_CLIENTS_REMEMBERED:
            self.http_clients.popitem(last=False)

    # -- menus ----------------------------------------------------------------------------------
    def menu(self, rest: str, client_ip: str) -> Source:
        started = self.clock()
        key = (client_ip, rest)
        hit = self.recent.get(key)
        if hit is not None and started - hit[0] < REREAD_SECONDS:
            return Source(memory_file(hit[1]), kind="menu", mac=hit[2], info=hit[3])
        wanted = parse_menu_name(rest)
        mac = self._machine_for(wanted, client_ip)
        if mac is None and wanted.by != "default":
            raise NotFound("no machine for this name")  # pxelinux goes on to the next name
        text, info = self.render(mac, http=self.http_clients.get(client_ip, False))
        data = text.encode()
        if info.once is not None:
            self.recent[key] = (started, data, mac, info)
            self.recent.move_to_end(key)
        while self.recent and started - next(iter(self.recent.values()))[0] >= REREAD_SECONDS:
            self.recent.popitem(last=False)
        while len(self.recent) > _MAX_CLIENTS_REMEMBERED:
            self.recent.popitem(last=False)
        metrics.RENDER_SECONDS.observe(self.clock() - started)
        return Source(memory_file(data), kind="menu", mac=mac, info=info)

    def _machine_for(self, wanted: MenuName, client_ip: str) -> str | None:
        view = self.view
        if wanted.by == "mac":
            # Every well-formed MAC gets its own menu (its generations, or the fallback): the menu
            # then carries the MAC for the boot's events, and a machine whose lease is still on its
            # way through NATS is not sent down pxelinux's slower hex-IP/default path.
            return wanted.mac
        if wanted.by == "ip":
            assert wanted.ip_hex is not None
            if len(wanted.ip_hex) == 8:
                return view.mac_for_ip(hex_to_ip(wanted.ip_hex))
            # A shorter prefix names a subnet: answer for the asking client if it lies in it.
            try:
                inside = ip_to_hex(client_ip).startswith(wanted.ip_hex)
            except ValueError:
                return None
            return view.mac_for_ip(client_ip) if inside else None
        if wanted.by == "default":
            return view.mac_for_ip(client_ip)
        return None

    def render(self, mac: str | None, *, http: bool) -> tuple[str, MenuInfo]:
        """The pxelinux config for ``mac`` (None: an unknown machine), newest generation first:
        the machine's prepared menu with a new boot id and its token filled in."""
        gens, fallback, machine = self._sources(mac)
        made_from = (gens, machine, self.settings.public_key)
        prepared = self.prepared.get((mac, http))
        if prepared is None or not prepared.made_from_same(made_from):
            prepared = self._prepare(mac, http, gens, fallback, machine, keep=not fallback)
        boot_id = security.new_boot_id()
        token = security.boot_token(self.settings.secret, boot_id)
        text = prepared.text.replace(_BOOT_ID_SLOT, boot_id).replace(_TOKEN_SLOT, token)
        return text, dataclasses.replace(prepared.info, boot_id=boot_id)

    def prepare(self, mac: str) -> None:
        """Render ``mac``'s menus ahead of its request (called when its lease arrives, off the
        TFTP thread), so the request only fills in the boot id: what the machine's state
        changes later is still seen, the request then renders afresh."""
        gens, fallback, machine = self._sources(mac)
        for http in (True, False):
            self._prepare(mac, http, gens, fallback, machine, keep=True)

    def _sources(self, mac: str | None) -> tuple[MachineGenerations | None, bool, Machine | None]:
        own = self.view.generations_for(mac) if mac else None
        gens = own if own is not None and own.generations else None
        fallback = gens is None
        if fallback:
            gens = self.view.fallback
        machine = self.view.machines.get(mac) if mac else None
        return gens, fallback, machine

    def _prepare(
        self,
        mac: str | None,
        http: bool,
        gens: MachineGenerations | None,
        fallback: bool,
        machine: Machine | None,
        *,
        keep: bool,
    ) -> _Prepared:
        s = self.settings
        params = BootParams(
            cache_url=s.cache_url,
            public_key=s.public_key,
            boot_id=_BOOT_ID_SLOT,
            boot_token=_TOKEN_SLOT,
        )
        title = f"{s.title}: {machine.name}" if machine else s.title
        spec = MenuSpec(
            mac=subjects.mac_token(mac) if mac else "unknown",
            title=title,
            generations=gens,
            params=params,
            timeout_seconds=s.timeout_seconds,
        )
        file_base = s.cache_url.rstrip("/") + "/" if http else ""
        ordered, default = ordered_entries(spec)
        info = MenuInfo(
            boot_id="",
            default_generation=default.number if default else None,
            generations=[g.number for g in ordered],
            fallback=fallback,
            once=None if fallback else pins.once_made_default(gens),
        )
        prepared = _Prepared((gens, machine, s.public_key), render_pxelinux(spec, file_base), info)
        if keep:
            with self._prepared_lock:  # the TFTP thread and the asyncio thread both add
                self.prepared[(mac, http)] = prepared
                while len(self.prepared) > _MAX_PREPARED:
                    del self.prepared[next(iter(self.prepared))]
        return prepared

    # -- kernels and initrds --------------------------------------------------------------------
    def boot_file(self, name: str) -> Source:
        parts = name.split("/")
        if len(parts) != 3 or parts[2] not in ("kernel", "initrd"):
            raise NotFound("not a boot file name")
        path = self.view.boot_file(parts[1], parts[2])
        if path is None:
            raise NotFound("no generation with this store hash")
        try:
            f = open_regular(path)
        except FileNotFoundError:
            raise NotFound("boot file missing from the store") from None
        return Source(f, kind="kernel" if parts[2] == "kernel" else "initrd")
