"""
Small immutable files kept open between hits (:mod:`pkgcache.open_files`):
the next hit costs one ``fstat``, and never serves a file that a cull
removed or a newer copy replaced.
"""

from __future__ import annotations

import os

from pkgcache import hits
from pkgcache.open_files import KEPT_FILE_MAX_BYTES, OpenFiles
from tests.conftest import descriptors_of
from tests.memory.conftest import PATH, A, HeldDisk, key, url

DATA = os.urandom(10_000)


class FileCalls:
    """The ``open``, ``fstat`` and ``close`` calls made on one file."""

    def __init__(self, monkeypatch, path: str) -> None:
        self.calls: list[str] = []
        self._fds: set[int] = set()
        real_open, real_fstat, real_close = os.open, os.fstat, os.close

        def opening(name, *args):
            fd = real_open(name, *args)
            if name == path:
                self.calls.append("open")
                self._fds.add(fd)
            return fd

        def stating(fd):
            if fd in self._fds:
                self.calls.append("fstat")
            return real_fstat(fd)

        def closing(fd):
            if fd in self._fds:
                self.calls.append("close")
                self._fds.discard(fd)
            return real_close(fd)

        for name, function in (("open", opening), ("fstat", stating), ("close", closing)):
            monkeypatch.setattr(os, name, function)


def test_the_next_hit_of_a_small_file_only_stats_it(make_cache, monkeypatch):
    cache = make_cache()
    cache.put(PATH, DATA)
    path = cache.store.path_for(key(PATH)).path
    file = FileCalls(monkeypatch, path)
    assert cache.get().body == DATA
    assert file.calls == ["open", "fstat"]
    for _ in range(3):
        hit = cache.get()
        assert (hit.code, hit.body) == (200, DATA)
    assert file.calls == ["open", "fstat"] + ["fstat"] * 3
    assert descriptors_of(path) == 1


def test_a_culled_file_is_not_served_from_its_kept_descriptor(make_cache, network):
    cache = make_cache()
    cache.put(PATH, DATA)
    assert cache.get().body == DATA
    path = cache.store.path_for(key(PATH)).path
    os.unlink(path)
    hit = cache.get()
    network.pending(url(A)).serve(b"new")
    assert (hit.code, hit.body) == (200, b"new")
    # The unlinked file's descriptor went with it.
    assert descriptors_of(path + " (deleted)") == 0


def test_a_culled_kept_file_is_closed_by_the_disk_threads(make_cache, network):
    """Its last close frees its blocks: disk work, kept off the reactor."""
    disk = HeldDisk()
    cache = make_cache(run_blocking=disk)
    cache.put(PATH, DATA)
    assert cache.get().body == DATA
    path = cache.store.path_for(key(PATH)).path
    os.unlink(path)
    hit = cache.get()
    assert descriptors_of(path + " (deleted)") == 1 and disk.queued
    disk.run_all()
    assert descriptors_of(path + " (deleted)") == 0
    network.pending(url(A)).serve(b"new")
    disk.run_all()
    assert (hit.code, hit.body) == (200, b"new")


def test_a_newer_copy_renamed_over_is_served(make_cache):
    cache = make_cache()
    cache.put(PATH, DATA)
    assert cache.get().body == DATA
    cache.put(PATH, b"replaced")  # (written aside, then renamed over)
    assert cache.get().body == b"replaced"
    assert cache.get().body == b"replaced"


def test_volatile_and_big_files_are_opened_for_each_hit(make_cache, network, monkeypatch):
    cache = make_cache(volatile=[r"\.index$"])
    index = "/dists/x.index"
    fetched = cache.get(index)
    network.pending(url(A, index)).serve(DATA)
    assert fetched.body == DATA
    big = os.urandom(KEPT_FILE_MAX_BYTES + 1)
    cache.put(PATH, big)
    files = [FileCalls(monkeypatch, cache.store.path_for(key(path)).path) for path in (index, PATH)]
    for _ in range(2):
        assert cache.get(index).body == DATA  # (fresh: a hit)
        assert cache.get(PATH).body == big
    assert [file.calls for file in files] == [["open", "fstat", "close"] * 2] * 2
    assert network.urls == [url(A, index)]


def test_closing_the_store_closes_what_it_kept(make_cache):
    cache = make_cache()
    cache.put(PATH, DATA)
    assert cache.get().body == DATA
    path = cache.store.path_for(key(PATH)).path
    assert descriptors_of(path) == 1
    cache.stop()
    assert descriptors_of(path) == 0


def test_the_least_recently_hit_file_is_pushed_out_once_in_use_no_more(tmp_path):
    recorded: list = []
    kept = OpenFiles(2, lambda fd, info: recorded.append(fd), os.close)
    paths = []
    for name in "abc":
        path = str(tmp_path / name)
        with open(path, "wb") as file:
            file.write(name.encode())
        paths.append(path)
    a = kept.keep(paths[0], os.open(paths[0], os.O_RDONLY), 1, 0.0, None)
    b = kept.keep(paths[1], os.open(paths[1], os.O_RDONLY), 1, 0.0, None)
    b.release()
    assert kept.get(paths[0]) is a and recorded == [a.fd]  # a: in use twice, hit last
    kept.keep(paths[2], os.open(paths[2], os.O_RDONLY), 1, 0.0, None).release()
    # b, least recently hit and not in use, went at once.
    assert kept.get(paths[1]) is None and descriptors_of(paths[1]) == 0
    kept.keep(paths[1], os.open(paths[1], os.O_RDONLY), 1, 0.0, None).release()
    # Now a is pushed out, but two hits still read it: closed after both.
    assert kept.get(paths[0]) is None and descriptors_of(paths[0]) == 1
    a.release()
    assert descriptors_of(paths[0]) == 1
    a.release()
    assert descriptors_of(paths[0]) == 0
    kept.close()
    assert [descriptors_of(path) for path in paths] == [0, 0, 0]


def test_a_hit_that_breaks_before_it_starts_gives_its_file_back(
    make_cache, monkeypatch, fail_on_logged_failures
):
    cache = make_cache()
    cache.put(PATH, DATA)
    assert cache.get().body == DATA

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(hits, "send_entity", broken)
    assert cache.get().code == 500
    assert [event["log_failure"].check(RuntimeError) for event in fail_on_logged_failures]
    fail_on_logged_failures.clear()
    # Not in use any more: the store's close closes it.
    cache.stop()
    assert descriptors_of(cache.store.path_for(key(PATH)).path) == 0


def test_an_unlinked_file_pushed_out_is_closed_by_the_disk_threads(tmp_path):
    handed: list = []
    kept = OpenFiles(1, lambda fd, info: None, handed.append)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for path in (first, second):
        with open(path, "wb") as file:
            file.write(b"x")
    a = kept.keep(first, os.open(first, os.O_RDONLY), 1, 0.0, None)
    a.release()
    os.unlink(first)  # (a cull)
    kept.keep(second, os.open(second, os.O_RDONLY), 1, 0.0, None).release()
    # Pushed out: its close is handed on, not done here.
    assert handed == [a.fd] and descriptors_of(first + " (deleted)") == 1
    os.close(a.fd)
    kept.close()
    assert descriptors_of(second) == 0
