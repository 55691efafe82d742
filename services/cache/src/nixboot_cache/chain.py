"""Which machine asked for ``boot.ipxe``: an HTTP request names only its client's address.

On the iPXE path (the NIC's iPXE ROM, or snponly.efi) the boot program the timeline's ``dhcp`` and
``bootloader`` stages end and start at is the cache's ``/boot.ipxe``, asked for over HTTP right
after DHCP. Its ``BootFileRequested`` event needs the machine's MAC, and two sources name it:

- the lease map (``ip.<a-b-c-d>`` -> MAC token -> ``records.Lease``), written by the dhcp-hook once
  the DHCP server's script ran: often *after* iPXE's request (the script runs after the ACK, and
  iPXE asks within milliseconds), and it may still name the address's previous holder;
- the menu request that follows from the same address, ``/ipxe/<mac>`` (iPXE fills in its own
  MAC): authoritative, but only if it reaches this cache instance.

So the report waits, bounded, for whichever answers first: a *fresh* lease of that address in the
map (active, granted moments before the request), or the menu request. The event keeps the
request's own time, so a late publish changes nothing in the timeline (the tracker orders by
``ts``). Only the requester is resolved here; sessions are the tracker's business.
"""

from __future__ import annotations

import asyncio

from nixboot_shared.records import Lease

# How long a boot.ipxe report waits for its machine to be named (the menu follows in ~1 s).
ATTRIBUTE_SECONDS = 10.0
# Between two looks at the lease map while waiting.
POLL_SECONDS = 0.5
# The lease that let iPXE ask was granted moments before; an older one is another boot's.
FRESH_LEASE_SECONDS = 120.0
# Reports waiting at once: beyond this (a flood of requests), one look at the map, no waiting.
MAX_WAITING = 1024


def lease_names_requester(lease: Lease, ip: str, at: float) -> bool:
    """Whether the lease map's ``lease`` is the one of whoever asked from ``ip`` at ``at``. Pure."""
    return (
        lease.ip == ip
        and lease.kind in ("new", "renew")
        and lease.seen >= at - FRESH_LEASE_SECONDS
        and (lease.expires is None or lease.expires > at)
    )


class ChainRequests:
    """boot.ipxe reports waiting for the menu request from the same address."""

    def __init__(self, limit: int = MAX_WAITING) -> None:
        self.limit = limit
        self.waiting: dict[str, list[asyncio.Future[str]]] = {}
        self.count = 0

    def expect(self, ip: str) -> asyncio.Future[str] | None:
        """A future the next menu request from ``ip`` resolves with its MAC; None when full."""
        if self.count >= self.limit:
            return None
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(ip, []).append(fut)
        self.count += 1
        return fut

    def resolve(self, ip: str, mac: str) -> int:
        """The machine ``mac`` asked for its menu from ``ip``: it is who asked for boot.ipxe."""
        futs = self.waiting.pop(ip, [])
        self.count -= len(futs)
        for fut in futs:
            if not fut.done():
                fut.set_result(mac)
        return len(futs)

    def forget(self, ip: str, fut: asyncio.Future[str]) -> None:
        futs = self.waiting.get(ip)
        if futs is None or fut not in futs:
            return
        futs.remove(fut)
        self.count -= 1
        if not futs:
            del self.waiting[ip]
