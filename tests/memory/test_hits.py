"""
What a hit costs: one ``open`` and one ``fstat`` of the cached file, no
path made absolute, nothing parsed or formatted again that a hit of the
same file made before; a small file sent in one read and one write, a big
one read by :data:`~pkgcache.responses.READ_SIZE` as its client takes it.
"""

from __future__ import annotations

import os

import pytest
from twisted.python import filepath
from twisted.web import http
from twisted.web.server import Request

from pkgcache import responses, store
from pkgcache.responses import READ_SIZE
from tests.memory.conftest import PATH, _CacheEnd, key

DATA = os.urandom(10_000)


def recording(calls: list, name: str, function):
    def record(*args, **kwargs):
        calls.append((name, args[0] if args else None))
        return function(*args, **kwargs)

    return record


def test_a_hit_opens_and_stats_its_file_once(make_cache, monkeypatch):
    cache = make_cache()
    cache.put(PATH, DATA)
    calls: list = []
    for name in ("open", "fstat", "stat", "lstat"):
        monkeypatch.setattr(store.os, name, recording(calls, name, getattr(os, name)))
    monkeypatch.setattr(os.path, "abspath", recording(calls, "abspath", os.path.abspath))
    monkeypatch.setattr(filepath, "abspath", recording(calls, "abspath", filepath.abspath))
    hit = cache.get()
    assert (hit.code, hit.body, hit.complete) == (200, DATA, True)
    assert [name for name, _ in calls] == ["open", "fstat"]
    assert calls[0][1] == cache.store.path_for(key(PATH)).path


@pytest.fixture
def writes(monkeypatch) -> list:
    """Every write the cache makes to its clients' connections."""
    done: list = []
    write = _CacheEnd.write

    def record(self, data):
        done.append(data)
        write(self, data)

    monkeypatch.setattr(_CacheEnd, "write", record)
    return done


def test_a_small_file_is_sent_in_one_read_and_one_write(make_cache, reads, writes):
    cache = make_cache()
    small = os.urandom(READ_SIZE)
    cache.put(PATH, small)
    hit = cache.get()
    assert (hit.body, hit.complete) == (small, True)
    assert reads == [(0, READ_SIZE)]
    headers, *body = writes
    assert headers.endswith(b"\r\n\r\n") and body == [small]


def test_a_big_file_is_read_by_read_size_as_the_client_takes_it(make_cache, reads, writes):
    cache = make_cache()
    big = os.urandom(4 * READ_SIZE + 10)
    cache.put(PATH, big)
    hit = cache.get(stop_reading_after=1)
    # Its client's buffer is full: no more is read until it takes it.
    assert reads == [(0, READ_SIZE)]
    cache.advance(10)
    assert len(reads) == 1
    cache.read_again(hit)
    assert (hit.body, hit.complete) == (big, True)
    assert reads == [(n * READ_SIZE, READ_SIZE) for n in range(4)] + [(4 * READ_SIZE, 10)]
    assert [len(data) for data in writes[1:]] == [READ_SIZE] * 4 + [10]


def test_a_client_leaving_mid_body_closes_the_file(make_cache, monkeypatch):
    cache = make_cache(client_stall_timeout=60)
    cache.put(PATH, os.urandom(4 * READ_SIZE))
    closed: list = []
    close = store.CachedFile.close
    monkeypatch.setattr(store.CachedFile, "close", lambda self: closed.append(self) or close(self))
    hit = cache.get(stop_reading_after=1)
    assert closed == [] and cache.timers(), "paused: the stall timer runs"
    cache.disconnect(hit)
    assert hit.cut_off and len(closed) == 1
    assert cache.timers() == []


def test_a_body_sent_at_once_waits_for_nothing(make_cache, monkeypatch):
    """Only the resource asks to hear of the request's end (for its log)."""
    cache = make_cache()
    cache.put(PATH, DATA)
    asked: list = []
    notify = Request.notifyFinish
    monkeypatch.setattr(Request, "notifyFinish", lambda self: asked.append(self) or notify(self))
    assert cache.get().complete
    assert len(asked) == 1


def test_a_hits_dates_are_formatted_once(make_cache, monkeypatch):
    cache = make_cache()
    cache.put(PATH, DATA)
    os.utime(cache.store.path_for(key(PATH)).path, (1_600_000_000.5, 1_600_000_000.5))
    first = cache.get()
    formatted: list = []
    for module in (http, responses):
        original = module.datetimeToString
        monkeypatch.setattr(
            module, "datetimeToString",
            lambda *when, original=original: formatted.append(when) or original(*when),
        )
    second = cache.get()
    assert formatted == []
    assert first.header("last-modified") == second.header("last-modified") == (
        "Sun, 13 Sep 2020 12:26:41 GMT"
    )


@pytest.mark.parametrize(
    "since, code",
    [
        ("Sun, 13 Sep 2020 12:26:41 GMT", 304),
        ("Sun, 13 Sep 2020 12:26:42 GMT", 304),
        ("Sun, 13 Sep 2020 12:26:40 GMT", 200),
        ("Sun, 13 Sep 2020 12:26:41 GMT; length=10000", 304),
        ("yesterday", 200),
        ("", 200),
        ("; length=10000", 200),
    ],
)
def test_if_modified_since(make_cache, since, code):
    cache = make_cache()
    cache.put(PATH, DATA)
    os.utime(cache.store.path_for(key(PATH)).path, (1_600_000_000.5, 1_600_000_000.5))
    hit = cache.get(headers={"if-modified-since": since})
    assert (hit.code, hit.complete) == (code, True)
    assert hit.body == (DATA if code == 200 else b"")
    assert hit.header("last-modified") == "Sun, 13 Sep 2020 12:26:41 GMT"
