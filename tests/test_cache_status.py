"""The Cache-Status entries pkgcache writes and reads (pkgcache.cache_status)."""

from __future__ import annotations

from pkgcache.cache_status import cache_name, entry, is_hit, says_loop


def test_a_node_name_that_is_no_token_is_quoted():
    """RFC 9211 names a cache by an sf-token or an sf-string: a host name
    that starts with a digit (a container's) must be quoted."""
    assert cache_name(b"node-1") == b"node-1"
    assert cache_name(b"3f2a9c1b7d4e") == b'"3f2a9c1b7d4e"'
    assert entry(cache_name(b"3f2a"), "hit") == b'"3f2a"; hit'


def test_the_last_entry_says_what_answered():
    assert is_hit(b"dc; hit")
    assert is_hit(b"dc; fwd=miss; fwd-status=200; stored, office-1; hit; ttl=3")
    assert not is_hit(b"dc; hit, office-1; fwd=miss; fwd-status=200; stored")
    assert not is_hit(None) and not is_hit(b"")
    assert not is_hit(b"HIT")  # another cache's own header, not RFC 9211
    assert says_loop(b"a; detail=loop")
    assert not says_loop(b"a; detail=loop, b; fwd=miss; detail=no-source")
