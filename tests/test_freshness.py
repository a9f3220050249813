"""
Which paths are volatile by default, and the ages of copies on a clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from pkgcache.freshness import Freshness
from pkgcache.metadata import EntryMetadata
from pkgcache.paths import cache_key_from_postpath


def key(path: str):
    return cache_key_from_postpath([part.encode() for part in path.lstrip("/").split("/")])


VOLATILE = [
    "/debian/dists/bookworm/InRelease",
    "/debian/dists/bookworm/Release",
    "/debian/dists/bookworm/Release.gpg",
    "/debian/dists/bookworm/updates/InRelease",
    "/debian/dists/bookworm/main/binary-amd64/Packages.xz",
    "/debian/dists/bookworm/main/binary-amd64/Packages",
    "/debian/dists/bookworm/main/source/Sources.gz",
    "/debian/dists/bookworm/main/Contents-amd64.gz",
    "/debian/dists/bookworm/main/i18n/Translation-en.bz2",
    "/debian/dists/bookworm/main/dep11/Components-amd64.yml.gz",
    "/debian/dists/bookworm/main/dep11/icons-64x64.tar.gz",
    "/debian/dists/bookworm/main/binary-amd64/Packages.diff/Index",
    "/releases/12.0.0/amd64/iso-cd/SHA256SUMS",
    "/releases/12.0.0/amd64/iso-cd/SHA256SUMS.sign",
    "/gentoo/distfiles/layout.conf",
    "/gentoo/snapshots/portage-latest.tar.xz",
    "/gentoo/releases/amd64/autobuilds/latest-stage3-amd64-openrc.txt",
    "/simple/",
    "/simple/foo/",
    "/pypi/simple/foo/index.html",
    "/fedora/39/x86_64/os/repodata/repomd.xml",
    "/alpine/v3.19/main/x86_64/APKINDEX.tar.gz",
    "/conda/linux-64/repodata.json",
    "/conda/linux-64/repodata.json.zst",
    "/anything/at/all/",
]
IMMUTABLE = [
    "/debian/pool/main/f/foo/foo_1.0_amd64.deb",
    "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/" + "ab" * 32,
    "/debian/pool/main/f/foo/Packages.txt",
    "/gentoo/distfiles/ab/foo-1.0.tar.gz",
    "/gentoo/snapshots/portage-20260101.tar.xz",
    "/packages/ab/cd/foo-1.0-py3-none-any.whl",
    "/fedora/39/x86_64/os/repodata/abc-primary.xml.gz",
    "/conda/linux-64/foo-1.0-0.tar.bz2",
    "/distfiles/Release-notes.txt",
]


@pytest.mark.parametrize("path", VOLATILE)
def test_indexes_are_volatile(path):
    assert Freshness(clock=Clock()).is_volatile(key(path))


@pytest.mark.parametrize("path", IMMUTABLE)
def test_package_files_are_immutable(path):
    assert not Freshness(clock=Clock()).is_volatile(key(path))


def test_more_patterns_win_over_the_immutable_defaults():
    freshness = Freshness([r"/pool/.*\.txt$"], clock=Clock())
    assert freshness.is_volatile(key("/debian/pool/main/f/foo/Packages.txt"))
    assert not freshness.is_volatile(key("/debian/pool/main/f/foo/foo_1.0_amd64.deb"))


def test_ages_on_the_clock():
    clock = Clock()
    clock.advance(1000)
    freshness = Freshness(max_age=30, stale_if_error=100, clock=clock)
    copy = EntryMetadata(checked=990)
    assert freshness.is_fresh(copy) and freshness.ttl(copy) == 20
    assert not freshness.is_fresh(copy, client_max_age=5)
    clock.advance(20)
    assert not freshness.is_fresh(copy) and freshness.may_serve_stale(copy)
    clock.advance(110)
    assert not freshness.may_serve_stale(copy)
    assert not freshness.is_fresh(EntryMetadata()), "a copy never checked is stale"


def test_the_negative_cache_is_bounded():
    from pkgcache.freshness import NegativeCache

    clock = Clock()
    negative = NegativeCache(60, clock, max_entries=3)
    for name in "abcd":
        negative.remember(key("/" + name))
    assert len(negative) == 3 and key("/a") not in negative and key("/d") in negative
    clock.advance(60)
    assert key("/d") not in negative
