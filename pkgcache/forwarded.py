"""
The client's address behind a load balancer or reverse proxy: the
``Forwarded`` (RFC 7239) or ``X-Forwarded-For`` chain of a request that
came from a trusted proxy (``--trusted-proxy CIDR``), never from anyone
else, since any client can send such a header.

The chain is read from the right (the hop nearest pkgcache first): the
first address that is not a trusted proxy is the client.  Repeated header
lines are one list (HAProxy adds its own line).  A hop that is not an IP
address (``unknown``, an obfuscated name) ends the walk: the last trusted
hop's own peer is then the best that is known.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_networks(texts: Iterable[str]) -> list[Network]:
    """:raises ValueError: for a text that is not an address or a CIDR network."""
    return [ipaddress.ip_network(text.strip(), strict=False) for text in texts]


def _address(text: str) -> Optional[Address]:
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]  # "[v6]:port"
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # "v4:port"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _hops(forwarded: Sequence[bytes], x_forwarded_for: Sequence[bytes]) -> list[str]:
    """The chain's addresses as sent, leftmost (the farthest) first."""
    if forwarded:
        hops = []
        for element in b",".join(forwarded).decode("latin-1").split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    hops.append(value)
        return hops
    return b",".join(x_forwarded_for).decode("latin-1").split(",")


class TrustedProxies:
    """Which peers may say who the client is, and what they say."""

    def __init__(self, networks: Sequence[Network] = ()) -> None:
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self._networks)

    def client(self, peer: str, forwarded: Sequence[bytes], x_forwarded_for: Sequence[bytes]) -> str:
        """The client's address: ``peer``, or, from a trusted ``peer``, what its chain says."""
        nearest = _address(peer)
        if nearest is None or not self._trusted(nearest):
            return peer
        for text in reversed(_hops(forwarded, x_forwarded_for)):
            hop = _address(text)
            if hop is None:
                break
            nearest = hop
            if not self._trusted(hop):
                break
        return str(nearest)
