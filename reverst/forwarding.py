"""Whose forwarding headers to believe (sans-io).

A public request's ``X-Forwarded-Host`` picks the tunnel group and its ``X-Forwarded-For``
and ``X-Forwarded-Proto`` reach the application as facts. Only a proxy in front of
``reverstd`` may say those things: :class:`TrustedProxies` holds the networks it may
come from (``--trusted-proxies``), and :func:`rebuild` replaces what anyone else sent
with what the connection itself shows.
"""
from __future__ import annotations

import ipaddress

#: What a visitor could forge about the path its request took (RFC 7239 ``Forwarded`` too).
FORWARDING_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                                "x-forwarded-port", "x-real-ip", "forwarded"})


def parse_ip(address: str):
    """``address`` (a peer's, an ``X-Forwarded-For`` hop) as an ip_address, or None; the
    IPv6 zone dropped and an IPv4-mapped address as the IPv4 one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class TrustedProxies:
    """The peers whose forwarding headers count: ``None`` networks means anyone (the Go
    reverst's behaviour, and the default); an empty list means no one."""

    def __init__(self, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None):
        self.networks = networks

    @classmethod
    def parse(cls, text: str | None) -> "TrustedProxies":
        """``"10.0.0.0/8,192.168.1.7"``, ``"none"`` (no one), ``"any"`` or empty (anyone).
        Raises ValueError naming the entry that is not an address or network."""
        text = (text or "").strip()
        if not text or text.lower() == "any":
            return cls(None)
        if text.lower() == "none":
            return cls([])
        networks = []
        for entry in (e.strip() for e in text.split(",")):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return cls(networks)

    @property
    def everyone(self) -> bool:
        return self.networks is None

    def trusts(self, address: str) -> bool:
        if self.networks is None:
            return True
        ip = parse_ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def __str__(self) -> str:
        if self.networks is None:
            return "anyone"
        return ", ".join(map(str, self.networks)) or "no one"


def rebuild(headers: list[tuple[str, str]], scheme: str) -> list[tuple[str, str]]:
    """``headers`` of a request from a peer that is not a trusted proxy: its forwarding
    headers dropped and ``X-Forwarded-Proto`` set from the listener's ``scheme``
    (``X-Forwarded-For`` is then the peer alone, added when the request is forwarded)."""
    kept = [(k, v) for k, v in headers if k.lower() not in FORWARDING_HEADERS]
    kept.append(("X-Forwarded-Proto", scheme))
    return kept


def visitor_address(headers: list[tuple[str, str]], peer: str, trusted: TrustedProxies) -> str:
    """The address a visitor policy judges: the peer's own, unless the peer is a proxy
    named in ``--trusted-proxies``; then the nearest ``X-Forwarded-For`` hop that is not
    one of them (an unlisted "trust anyone" counts nobody: a visitor must not be able to
    choose the address that allow/deny and rate limits see)."""
    if trusted.everyone or not trusted.trusts(peer):
        return peer
    hops = [hop.strip() for k, v in headers if k.lower() == "x-forwarded-for" for hop in v.split(",")]
    for hop in reversed(hops):
        if hop and not trusted.trusts(hop):
            return hop
    return hops[0] if hops and hops[0] else peer
