"""State records kept in the KV buckets (see ``subjects.ALL_BUCKETS``)."""

from __future__ import annotations

import msgspec

from nixboot_shared.subjects import normalize_mac


class Machine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A machine the builder knows: which ``nixosConfigurations`` attribute it boots."""

    mac: str
    name: str
    attr: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mac = normalize_mac(self.mac)


class Generation(msgspec.Struct, kw_only=True):
    """One bootable build of a machine, laid out the way NixOS lays out a toplevel."""

    number: int
    toplevel: str
    kernel: str
    initrd: str
    kernel_params: str
    init: str
    flake_rev: str | None = None
    closure_size: int = 0
    created: float = 0.0


class MachineGenerations(msgspec.Struct, kw_only=True):
    """A machine's generation history, newest last; pins choose what boots by default."""

    mac: str
    generations: list[Generation] = msgspec.field(default_factory=list)
    pinned: int | None = None  # default generation (None: newest)
    next_boot: int | None = None  # one-shot: used for the next boot only

    def newest_first(self) -> list[Generation]:
        return sorted(self.generations, key=lambda g: g.number, reverse=True)

    def default(self) -> Generation | None:
        """The generation the menu makes default: one-shot pin, then pin, then newest."""
        by_number = {g.number: g for g in self.generations}
        for choice in (self.next_boot, self.pinned):
            if choice is not None and choice in by_number:
                return by_number[choice]
        ordered = self.newest_first()
        return ordered[0] if ordered else None


class Lease(msgspec.Struct, kw_only=True):
    mac: str
    ip: str
    hostname: str | None = None
    expires: float | None = None
    arch: str = "unknown"
    user_class: str | None = None
    server_ts: float | None = None
    seen: float = 0.0
    # The last lease change applied: new, renew, release or expire (a released lease stays as a
    # marker so that a late, older event cannot bring it back).
    kind: str = "new"
    # dnsmasq knew this lease from its lease file, without the client's options
    # (``old`` with DNSMASQ_DATA_MISSING: its start-up replay, or a renewal of such a lease).
    from_lease_file: bool = False
