"""
What a hit of a small file does not cost (beyond tests/memory/test_hits.py):
no stall timer unless its client pauses it.
"""

from __future__ import annotations

import os

from pkgcache import responses
from tests.memory.conftest import PATH

DATA = os.urandom(10_000)


def test_a_body_sent_at_once_makes_no_stall_timer(make_cache, network, monkeypatch):
    """The stall timer of a hit's producer is made only when a client pauses it."""
    made: list = []
    real = responses.IdleTimer
    monkeypatch.setattr(responses, "IdleTimer", lambda *a: made.append(a) or real(*a))
    cache = make_cache(client_stall_timeout=60)
    cache.put(PATH, DATA)
    assert cache.get().complete
    assert made == []
    cache.put(PATH, DATA * 100)
    stalled = cache.get(stop_reading_after=1)
    assert len(made) == 1
    cache.advance(60)
    assert stalled.aborted and cache.timers() == []
