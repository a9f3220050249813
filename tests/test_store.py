"""
The store's side of a hit: a key's path made as one string and checked
again (so no key, however made, names a file outside the cache), and a
cached file's metadata parsed once while it does not change.
"""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock
from twisted.python import filepath
from twisted.python.filepath import FilePath

from pkgcache.metadata import EntryMetadata
from pkgcache.paths import CacheKey, UnsafePath, cache_key_from_postpath, relative_path
from pkgcache.store import CacheStore


@pytest.fixture
def store(tmp_path) -> CacheStore:
    made = CacheStore(FilePath(str(tmp_path / "cache")), Clock(), run_blocking=lambda *_: None)
    made.open()
    return made


def publish(store: CacheStore, path: str, data: bytes, metadata: EntryMetadata) -> None:
    target = store.cache_dir.preauthChild(path)
    target.parent().makedirs(ignoreExistingDirectory=True)
    target.setContent(data)
    fd = os.open(target.path, os.O_RDONLY)
    try:
        metadata.write(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "key, path",
    [
        (CacheKey(("distfiles", "x.tar.gz")), "distfiles/x.tar.gz"),
        (CacheKey(("simple", "foo"), directory=True), "simple/foo/.pkgcache-index"),
        (CacheKey(("simple", "foo"), True, "json"), "simple/foo/.pkgcache-index.json"),
        (CacheKey(("@scope", "name"), True, remote="@scope%2fname"), "@scope/name/.pkgcache-index"),
    ],
)
def test_relative_paths(key, path):
    assert relative_path(key) == path


@pytest.mark.parametrize(
    "segments",
    [(), ("..",), ("a", "..", ".."), ("a", ""), (".", "a"), ("a/../../b",), ("/etc",), ("a\0",),
     ("a", "../b")],
)
def test_a_key_made_by_hand_cannot_leave_the_cache(store, segments):
    key = CacheKey(segments)
    with pytest.raises(UnsafePath):
        relative_path(key)
    with pytest.raises(UnsafePath):
        store.open_file(key)
    with pytest.raises(UnsafePath):
        store.path_for(key)


def test_path_for_and_open_file_agree(store):
    key = cache_key_from_postpath([b"distfiles", b"x.tar.gz"])
    assert store.path_for(key) == store.cache_dir.child("distfiles").child("x.tar.gz")
    publish(store, "distfiles/x.tar.gz", b"data", EntryMetadata())
    cached = store.open_file(key)
    try:
        assert cached.read(0, 10) == b"data"
    finally:
        cached.close()


def test_an_area_opens_its_files_without_making_paths_absolute(store, monkeypatch):
    area = store.area("debian").area("files")
    key = cache_key_from_postpath([b"pool", b"x.deb"])
    assert area.path_for(key) == store.cache_dir.preauthChild("debian/files/pool/x.deb")
    publish(store, "debian/files/pool/x.deb", b"deb", EntryMetadata())
    calls: list = []
    monkeypatch.setattr(os.path, "abspath", lambda path: calls.append(path) or path)
    monkeypatch.setattr(filepath, "abspath", lambda path: calls.append(path) or path)
    cached = area.open_file(key)
    try:
        assert cached.read(0, 10) == b"deb"
    finally:
        cached.close()
    assert calls == []


def test_a_files_metadata_is_parsed_once_while_it_does_not_change(store):
    key = cache_key_from_postpath([b"dists", b"InRelease"])
    first = EntryMetadata(content_type=b"text/plain", etag=b'"1"', checked=1.0)
    publish(store, "dists/InRelease", b"release", first)
    opened = [store.open_file(key) for _ in range(2)]
    for cached in opened:
        cached.close()
    assert opened[0].metadata == first
    assert opened[0].metadata is opened[1].metadata
    # A revalidation rewrites the attribute: the next open sees the change.
    publish(store, "dists/InRelease", b"release", first.checked_at(2.0, b'"2"'))
    cached = store.open_file(key)
    cached.close()
    assert (cached.metadata.checked, cached.metadata.etag) == (2.0, b'"2"')


def test_a_paths_key_is_checked_once():
    assert cache_key_from_postpath([b"a", b"b"]) is cache_key_from_postpath([b"a", b"b"])
    for _ in range(2):
        with pytest.raises(UnsafePath):
            cache_key_from_postpath([b"a", b".."])
