"""
What a hit costs: one ``open`` and one ``fstat`` of the cached file, no
path made absolute, nothing parsed again that a hit of the same file
parsed before.
"""

from __future__ import annotations

import os

from twisted.python import filepath

from pkgcache import store
from tests.memory.conftest import PATH, key

DATA = os.urandom(10_000)


def recording(calls: list, name: str, function):
    def record(*args, **kwargs):
        calls.append((name, args[0] if args else None))
        return function(*args, **kwargs)

    return record


def test_a_hit_opens_and_stats_its_file_once(make_cache, monkeypatch):
    cache = make_cache()
    cache.put(PATH, DATA)
    assert cache.get().complete
    calls: list = []
    for name in ("open", "fstat", "stat", "lstat"):
        monkeypatch.setattr(store.os, name, recording(calls, name, getattr(os, name)))
    monkeypatch.setattr(os.path, "abspath", recording(calls, "abspath", os.path.abspath))
    monkeypatch.setattr(filepath, "abspath", recording(calls, "abspath", filepath.abspath))
    hit = cache.get()
    assert (hit.code, hit.body, hit.complete) == (200, DATA, True)
    assert [name for name, _ in calls] == ["open", "fstat"]
    assert calls[0][1] == cache.store.path_for(key(PATH)).path
