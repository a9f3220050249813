"""
Peers (``--peer``), in memory: a miss of an immutable file is asked of the
sibling nodes first, with ``Cache-Control: only-if-cached``, and of the
sources only if no peer has it.  A peer without the file (404, 504) is
asked again next time; a peer that fails sits out its back-off (on the
clock), and a peer's body that breaks off is resumed from a source.
"""

from __future__ import annotations

import pytest

from tests.memory.conftest import A, PATH, url

#: A sibling node, and this node's name in Via.
PEER = "http://node-2.example:4000/"
SECOND_PEER = "http://node-3.example:4000/"
NODE = "node-1"
DATA = bytes(range(256)) * 400  # 102,400 bytes
#: What a pkgcache peer says of the file it sends: a hit of its own.
PEER_HIT = {"cache-status": "node-2; hit"}


@pytest.fixture
def node(make_cache):
    return make_cache(peers=(PEER,), node_name=NODE, volatile=(r"InRelease$",))


def test_a_miss_is_asked_of_the_peer_first_and_served_from_it(node, network):
    client = node.get()
    asked = network.pending(url(PEER))
    assert asked.header("cache-control") == "only-if-cached"
    assert asked.header("via") == f"1.1 {NODE}"
    asked.serve(DATA, headers=PEER_HIT)
    assert (client.code, client.body, client.complete) == (200, DATA, True)
    # Which tier answered: the peer's entry, then ours.
    assert client.header("cache-status").startswith("node-2; hit, ")
    assert network.urls == [url(PEER)]
    assert node.cached() == DATA
    again = node.get()
    assert (again.body, network.urls) == (DATA, [url(PEER)])
    assert node.upstream.metrics.peer_requests.labels(PEER, "hit")._value.get() == 1


@pytest.mark.parametrize("status", [504, 404])
def test_a_peer_without_the_file_is_passed_over_and_asked_again(node, network, status):
    client = node.get()
    network.pending(url(PEER)).serve(b"not here", code=status)
    network.pending(url(A)).serve(DATA)
    assert (client.body, client.complete) == (DATA, True)
    # Not having a file says nothing of a peer's health.
    assert not node.health.is_down(node.upstream.peers[0])
    node.get("/distfiles/bar-2.0.tar.gz")
    assert network.pending(url(PEER, "/distfiles/bar-2.0.tar.gz")).header(
        "cache-control") == "only-if-cached"
    assert node.upstream.metrics.peer_requests.labels(PEER, "miss")._value.get() == 1


@pytest.mark.parametrize("failure", ["refused", "500", "loop", "403", "redirect", "not a hit"])
def test_a_failing_peer_sits_out_its_backoff(node, network, failure):
    """
    Refused, a 5xx, a pkgcache's 508 (the peer is this node), a 4xx, a
    redirect (never followed), or a 200 that is not a pkgcache's hit (a
    --peer pointing at some other web server): the sources are asked, the
    answer is not stored, and the peer is not asked again until its
    back-off is over.
    """
    client = node.get()
    asked = network.pending(url(PEER))
    if failure == "refused":
        asked.refuse()
    elif failure == "loop":
        asked.serve(b"", code=508, headers={"cache-status": "node-1; detail=loop"})
    elif failure == "redirect":
        asked.redirect(url(A, "/distfiles/other-1.0.tar.gz"))
    elif failure == "not a hit":
        asked.serve(b"<html>welcome</html>")
    else:
        asked.serve(b"", code=int(failure))
    network.pending(url(A)).serve(DATA)
    assert (client.body, client.complete) == (DATA, True)
    node.get("/distfiles/bar-2.0.tar.gz")
    assert network.waiting[-1].url == url(A, "/distfiles/bar-2.0.tar.gz")
    network.waiting[-1].serve(DATA)
    node.advance(10.0)
    node.get("/distfiles/baz-3.0.tar.gz")
    assert network.pending(url(PEER, "/distfiles/baz-3.0.tar.gz"))
    assert node.upstream.metrics.peer_requests.labels(PEER, "error")._value.get() == 1


def test_a_silent_peer_is_given_up_after_the_peer_timeout(node, network):
    client = node.get()
    asked = network.pending(url(PEER))
    node.advance(1.9)
    assert network.urls == [url(PEER)]
    node.advance(0.1)
    assert asked.cancelled
    network.pending(url(A)).serve(DATA)
    assert (client.body, client.complete) == (DATA, True)


def test_peers_are_asked_in_order_until_one_has_the_file(make_cache, network):
    node = make_cache(peers=(PEER, SECOND_PEER), node_name=NODE)
    client = node.get()
    network.pending(url(PEER)).serve(b"", code=504)
    network.pending(url(SECOND_PEER)).serve(DATA, headers=PEER_HIT)
    assert (client.body, client.complete) == (DATA, True)
    assert network.urls == [url(PEER), url(SECOND_PEER)]


def test_a_peer_body_that_breaks_off_is_resumed_from_a_source(node, network):
    client = node.get()
    body = network.pending(url(PEER)).respond(length=len(DATA), headers=PEER_HIT)
    body.send(DATA[:40_000])
    body.cut()
    resumed = network.pending(url(A))
    assert resumed.range == "bytes=40000-"
    assert resumed.header("cache-control") is None
    resumed.serve_rest(DATA)
    assert (client.body, client.complete) == (DATA, True)
    assert node.cached() == DATA


def test_files_that_change_in_place_are_asked_of_their_source(node, network):
    """A peer's copy of an index may be older than the source's."""
    path = "/dists/stable/InRelease"
    client = node.get(path)
    assert network.urls == [url(A, path)]
    network.pending(url(A, path)).serve(b"an index\n")
    assert client.body == b"an index\n"
    node.advance(60.0)
    node.get(path)
    assert network.urls[-1] == url(A, path)  # the revalidation, too


def test_a_head_miss_is_asked_of_the_sources(node, network):
    client = node.head()
    network.pending(url(A)).serve(DATA)
    assert client.code == 200
    assert network.urls == [url(A)]


def test_a_request_that_is_only_if_cached_asks_no_peer(node, network):
    """What a peer asks us is answered from our cache alone: peers never chain."""
    client = node.get(headers={"cache-control": "only-if-cached"})
    assert client.code == 504
    assert network.urls == []


def test_the_path_is_asked_as_the_client_sent_it(node, network):
    path = "/distfiles/foo%2B1.0 (x).tar.gz"
    client = node.get(path.replace(" ", "%20"))
    assert network.waiting[0].url == PEER.rstrip("/") + "/distfiles/foo%2B1.0%20(x).tar.gz"
    network.waiting[0].serve(DATA, headers=PEER_HIT)
    assert client.body == DATA


def test_a_peers_short_answer_is_read_so_its_connection_is_kept(node, network):
    """A peer's 504 (a few bytes, with a length) is read to its end: the
    connection goes back to the pool, not a new one per miss."""
    client = node.get()
    answer = network.pending(url(PEER)).serve(b"not in this cache (only-if-cached)\n", code=504)
    assert answer.ended and not answer.stopped
    network.pending(url(A)).serve(DATA)
    assert client.body == DATA


def test_a_peer_that_answers_again_is_out_of_backoff(node, network):
    """A 504 says the peer is up: a failure before it is forgotten."""
    node.get()
    network.pending(url(PEER)).refuse()
    network.pending(url(A)).serve(DATA)
    node.advance(10.0)
    node.get("/distfiles/bar-2.0.tar.gz")
    network.pending(url(PEER, "/distfiles/bar-2.0.tar.gz")).serve(b"", code=504)
    network.pending(url(A, "/distfiles/bar-2.0.tar.gz")).serve(DATA)
    node.get("/distfiles/baz-3.0.tar.gz")
    network.pending(url(PEER, "/distfiles/baz-3.0.tar.gz")).refuse()
    network.pending(url(A, "/distfiles/baz-3.0.tar.gz")).serve(DATA)
    # Back-off from the start (10 s), not doubled from the first failure.
    peer = node.upstream.peers[0]
    node.advance(9.9)
    assert node.health.is_down(peer)
    node.advance(0.1)
    assert not node.health.is_down(peer)


def test_a_peers_hit_without_a_length_is_not_taken(node, network):
    """A body whose end cannot be checked is fetched from a source."""
    client = node.get()
    body = network.pending(url(PEER)).respond(headers=PEER_HIT, chunked=True)
    assert body.stopped
    network.pending(url(A)).serve(DATA)
    assert (client.body, node.cached()) == (DATA, DATA)


def test_a_peer_is_sent_this_nodes_via_alone(node, network):
    """
    A client's Via naming a peer (forged, or from a tier above) must not
    make the peer refuse as a loop and be skipped for every client.
    """
    client = node.get(headers={"via": "1.1 node-2"})
    asked = network.pending(url(PEER))
    assert asked.header("via") == f"1.1 {NODE}"
    asked.serve(DATA, headers=PEER_HIT)
    assert client.body == DATA
    # Its sources still get the whole chain.
    node.get("/distfiles/bar-2.0.tar.gz", headers={"via": "1.1 node-2"})
    network.pending(url(PEER, "/distfiles/bar-2.0.tar.gz")).serve(b"", code=504)
    assert network.pending(url(A, "/distfiles/bar-2.0.tar.gz")).header("via") == (
        f"1.1 node-2, 1.1 {NODE}"
    )


def test_a_peers_short_answer_that_never_ends_is_closed(node, network):
    """A 504 announced with a length that never comes holds no connection."""
    client = node.get()
    answer = network.pending(url(PEER)).respond(504, length=40)
    network.pending(url(A)).serve(DATA)
    assert client.body == DATA and not answer.stopped
    node.advance(2.0)
    assert answer.stopped
