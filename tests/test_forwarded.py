"""
The client's address in the access log behind a balancer: taken from
``Forwarded`` or ``X-Forwarded-For`` only when the peer is a trusted proxy
(``--trusted-proxy``), read from the right, never from anyone else.
"""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import reactor

from pkgcache.accesslog import AccessLog
from pkgcache.forwarded import TrustedProxies, parse_networks
from pkgcache.sources import Source
from tests.conftest import fetch

BALANCERS = TrustedProxies(parse_networks(["10.0.0.0/8", "2001:db8:1::/48"]))


@pytest.mark.parametrize(
    "peer, forwarded, x_forwarded_for, client",
    [
        # Not a trusted peer: whatever it says, it is the client.
        ("203.0.113.9", [], [b"198.51.100.7"], "203.0.113.9"),
        # A trusted balancer: the address it saw.
        ("10.0.0.2", [], [b"198.51.100.7"], "198.51.100.7"),
        # A client's own claim before the balancer's is not believed.
        ("10.0.0.2", [], [b"192.0.2.66, 198.51.100.7"], "198.51.100.7"),
        # Two trusted hops, the header in two lines (HAProxy adds its own).
        ("10.0.0.2", [], [b"198.51.100.7, 10.1.2.3", b"10.0.0.9"], "198.51.100.7"),
        # Forwarded wins, with quotes, ports and IPv6 in brackets.
        ("10.0.0.2", [b'for="[2001:db8:2::7]:4711";proto=https, for=10.0.0.5'],
         [b"192.0.2.66"], "2001:db8:2::7"),
        ("2001:db8:1::2", [b"for=198.51.100.7:5000"], [], "198.51.100.7"),
        # Nothing usable: the nearest hop known.
        ("10.0.0.2", [], [], "10.0.0.2"),
        ("10.0.0.2", [b"for=unknown"], [], "10.0.0.2"),
        ("10.0.0.2", [], [b'198.51.100.7, "><script>'], "10.0.0.2"),
        # Only proxies: the farthest of them.
        ("10.0.0.2", [], [b"10.0.0.3"], "10.0.0.3"),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(
    peer, forwarded, x_forwarded_for, client
):
    assert BALANCERS.client(peer, forwarded, x_forwarded_for) == client


def test_nothing_is_trusted_by_default():
    assert TrustedProxies().client("10.0.0.2", [], [b"198.51.100.7"]) == "10.0.0.2"
    assert not TrustedProxies()


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_client_behind_a_trusted_proxy(origin, make_proxy, http):
    origin.add("/x", b"x")
    logs = {}
    for name, trusted in (("trusted", ["127.0.0.1"]), ("untrusted", [])):
        stream = io.BytesIO()
        access_log = AccessLog(stream, reactor, TrustedProxies(parse_networks(trusted)))
        proxy = make_proxy([Source(origin.url)], access_log=access_log)
        await fetch(http, proxy.url + "/x", headers={b"x-forwarded-for": [b"198.51.100.7"]})
        access_log.close()
        logs[name] = stream.getvalue().decode()
    assert logs["trusted"].startswith("198.51.100.7 - - [")
    assert logs["untrusted"].startswith("127.0.0.1 - - [")
