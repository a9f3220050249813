"""
Real ``apt-get`` through pkgcache, against a real signed Debian repository
on 127.0.0.1 that changes while the test runs (see
:mod:`tests.debian_repo`).

The first tests hold for pkgcache as it is: ``apt-get update`` and a
download of a package work through it, with and without by-hash, and a
second client is answered from the cache.  The rest are the freshness of
issue 7: a new upload is not seen while the indexes are fresh, is seen
(with no Hash Sum mismatch) once they are stale, and can be downloaded.
Time for freshness is a :class:`~twisted.internet.task.Clock` handed to
the resource as ``clock``; nothing here waits for real time to pass.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import fetch
from tests.debian_repo import (
    SIGNING_TOOLS,
    Apt,
    DebianRepo,
    RepoServer,
    Signer,
    deb_version,
    missing_tools,
)

pytestmark = pytest.mark.skipif(
    bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} (apt, dpkg)"
)

#: ``volatile_max_age`` given to the resource in the freshness tests.
MAX_AGE = 30


#: apt sends ``Cache-Control: max-age=0`` with every index request unless
#: told otherwise (``Acquire::http::Max-Age``, default 0), and issue 7 has
#: such a request revalidate a volatile file.  A client that accepts a day
#: old copy lets a test see pkgcache's own freshness lifetime at work.
ACCEPTS_CACHED = 86400


@pytest_twisted.async_yield_fixture(scope="module")
async def signer():
    """One throwaway archive key for the module: the repositories are signed
    (``InRelease``) and apt checks them against it (``signed-by``)."""
    missing = missing_tools(SIGNING_TOOLS)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} to sign the repository")
    key = await Signer.generate()
    yield key
    await key.close()


class Mirror:
    """A :class:`DebianRepo` and the :class:`RepoServer` in front of it."""

    def __init__(self, root: Path, signer: Optional[Signer], by_hash: bool) -> None:
        # Without a signer: only Release, and apt is told [trusted=yes].
        self.repo = DebianRepo(root, by_hash=by_hash, signer=signer)
        self.server = RepoServer(root)

    @property
    def url(self) -> str:
        return self.server.url

    async def upload(self, name: str, version: str) -> None:
        """A new version, published as a mirror update is."""
        await self.repo.add_package(name, version)
        await self.repo.publish()

    def deb_path(self, name: str) -> str:
        return "/" + self.repo.packages[name].filename

    def deb_fetches(self, name: str) -> int:
        """Whole-file downloads of the listed ``.deb`` of ``name``."""
        return self.server.count(self.deb_path(name), code=200)


@pytest_twisted.async_yield_fixture
async def mirrors(tmp_path, signer):
    """``await mirrors(by_hash=...)``: a mirror serving ``hello 1.0``."""
    made: list[Mirror] = []

    async def make(by_hash: bool = True) -> Mirror:
        mirror = Mirror(tmp_path / f"mirror{len(made)}", signer, by_hash)
        made.append(mirror)
        await mirror.upload("hello", "1.0")
        return mirror

    yield make
    for mirror in made:
        await mirror.server.stop()


@pytest.fixture
def apts(tmp_path):
    """``apts(mirror, proxy_url, **options)``: a new apt client, with its
    own empty state, whose only source is ``mirror`` through the proxy."""
    made: list[Apt] = []

    def make(mirror: Mirror, proxy_url: str, **options) -> Apt:
        apt = Apt(tmp_path / f"apt{len(made)}", **options)
        apt.set_sources([mirror.repo.sources_line(proxy_url)])
        made.append(apt)
        return apt

    return make


async def install(apt: Apt, mirror: Mirror, name: str) -> str:
    """``apt-get install --download-only NAME``, checked: the version of the
    ``.deb`` it downloaded (which must be the one the mirror lists)."""
    for old in apt.downloaded(name):
        old.unlink()
    (await apt.download(name)).check()
    debs = apt.downloaded(name)
    assert len(debs) == 1, debs
    listed = mirror.repo.packages[name]
    assert hashlib.sha256(debs[0].read_bytes()).hexdigest() == listed.sha256
    return await deb_version(debs[0])


BY_HASH = pytest.mark.parametrize("by_hash", [True, False], ids=["by-hash", "by-name"])


# ---------------------------------------------------------------------------
# pkgcache as it is


@BY_HASH
@pytest_twisted.ensureDeferred
async def test_update_and_install_through_the_cache(by_hash, mirrors, make_proxy, apts):
    mirror = await mirrors(by_hash=True)
    proxy = make_proxy([mirror.url])

    first = apts(mirror, proxy.url, by_hash=by_hash)
    (await first.update()).check()
    assert await first.candidate("hello") == "1.0"
    assert await install(first, mirror, "hello") == "1.0"
    assert mirror.deb_fetches("hello") == 1

    if by_hash:
        packages = mirror.repo.by_hash_path("Packages.xz")
        assert mirror.server.count(packages) == 1
        assert mirror.server.count(f"{mirror.repo.binary_dir}/Packages.xz") == 0
    else:
        packages = f"{mirror.repo.binary_dir}/Packages.xz"
        assert mirror.server.count(packages) == 1
    await proxy.published(packages)
    await proxy.published(mirror.deb_path("hello"))

    # A second machine, with nothing in its lists or archives.
    second = apts(mirror, proxy.url, by_hash=by_hash)
    (await second.update()).check()
    assert await install(second, mirror, "hello") == "1.0"
    assert mirror.deb_fetches("hello") == 1
    if by_hash:
        # Content-addressed: never asked for twice, fresh or not.
        assert mirror.server.count(packages) == 1


@pytest_twisted.ensureDeferred
async def test_unsigned_release_only_repository(tmp_path, make_proxy, apts):
    """A repository with no ``InRelease`` (apt falls back to ``Release``)."""
    mirror = Mirror(tmp_path / "plain", None, by_hash=False)
    try:
        await mirror.upload("hello", "1.0")
        proxy = make_proxy([mirror.url])
        apt = apts(mirror, proxy.url)
        (await apt.update()).check()
        assert await install(apt, mirror, "hello") == "1.0"
        assert mirror.server.count(f"{mirror.repo.dists}/Release") == 1
    finally:
        await mirror.server.stop()


# ---------------------------------------------------------------------------
# Freshness (issue 7)


@BY_HASH
@pytest_twisted.ensureDeferred
async def test_new_upload_seen_once_indexes_are_stale(by_hash, mirrors, make_proxy, apts):
    mirror = await mirrors(by_hash=True)
    clock = Clock()
    proxy = make_proxy([mirror.url], volatile_max_age=MAX_AGE, clock=clock)
    apt = apts(mirror, proxy.url, by_hash=by_hash, max_age=ACCEPTS_CACHED)
    (await apt.update()).check()
    assert await apt.candidate("hello") == "1.0"
    release = f"{mirror.repo.dists}/InRelease"
    assert mirror.server.count(release) == 1

    await mirror.upload("hello", "2.0")

    # Still fresh: served from the cache, the mirror is not asked.
    clock.advance(MAX_AGE - 1)
    (await apt.update()).check()
    assert await apt.candidate("hello") == "1.0"
    assert mirror.server.count(release) == 1

    # Stale: revalidated, and the new indexes are consistent with it.
    clock.advance(2)
    (await apt.update()).check()
    assert await apt.candidate("hello") == "2.0"
    assert mirror.server.count(release) == 2
    assert await install(apt, mirror, "hello") == "2.0"

    # A machine that never saw 1.0 gets the same answer, from the cache.
    fetched = len(mirror.server.requests)
    other = apts(mirror, proxy.url, by_hash=by_hash, max_age=ACCEPTS_CACHED)
    (await other.update()).check()
    assert await install(other, mirror, "hello") == "2.0"
    assert len(mirror.server.requests) == fetched


@BY_HASH
@pytest_twisted.ensureDeferred
async def test_stock_apt_revalidates_on_every_update(by_hash, mirrors, make_proxy, apts):
    """apt's own ``Cache-Control: max-age=0`` forces a revalidation, so an
    unconfigured apt sees an upload at once, and an unchanged mirror costs
    one conditional request answered 304."""
    mirror = await mirrors(by_hash=True)
    clock = Clock()
    proxy = make_proxy([mirror.url], volatile_max_age=MAX_AGE, clock=clock)
    apt = apts(mirror, proxy.url, by_hash=by_hash)
    release = f"{mirror.repo.dists}/InRelease"
    (await apt.update()).check()

    (await apt.update()).check()
    assert mirror.server.count(release, code=304) == 1
    assert "if-modified-since" in mirror.server.requests[-1].headers

    await mirror.upload("hello", "2.0")
    (await apt.update()).check()
    assert await apt.candidate("hello") == "2.0"
    assert await install(apt, mirror, "hello") == "2.0"


@pytest_twisted.ensureDeferred
async def test_unchanged_mirror_is_revalidated_with_304(mirrors, make_proxy, apts, http):
    mirror = await mirrors(by_hash=False)
    clock = Clock()
    proxy = make_proxy([mirror.url], volatile_max_age=MAX_AGE, clock=clock)
    apt = apts(mirror, proxy.url, by_hash=False, max_age=ACCEPTS_CACHED)
    (await apt.update()).check()
    assert await install(apt, mirror, "hello") == "1.0"
    release = f"{mirror.repo.dists}/InRelease"
    before = len(mirror.server.requests)

    clock.advance(MAX_AGE + 1)
    (await apt.update()).check()
    assert await apt.candidate("hello") == "1.0"
    asked = mirror.server.requests[before:]
    # The InRelease is revalidated with the validator the mirror gave; it
    # has not changed, so neither have the indexes: nothing is downloaded.
    assert [(r.path, r.code) for r in asked] == [("/" + release, 304)], asked
    assert "if-modified-since" in asked[0].headers

    response, _ = await fetch(http, f"{proxy.url}/{release}")
    assert response.code == 200
    assert b"pkgcache" in b"".join(response.headers.getRawHeaders(b"cache-status", []))


@pytest_twisted.ensureDeferred
async def test_index_cached_after_the_inrelease_is_checked_against_the_new_one(
    mirrors, make_proxy, apts
):
    """
    The trap for a cache without by-hash: ``Packages.gz`` first fetched
    (by a machine that prefers gzip) 20 s after ``InRelease``.  Once the
    mirror publishes and ``InRelease`` goes stale, ``Packages.gz`` is still
    fresh by its own age, but no longer the one the new ``InRelease``
    lists: served as is, apt reports a Hash Sum mismatch.
    """
    mirror = await mirrors(by_hash=False)
    clock = Clock()
    proxy = make_proxy([mirror.url], volatile_max_age=MAX_AGE, clock=clock)
    xz = apts(mirror, proxy.url, by_hash=False, compression="xz", max_age=ACCEPTS_CACHED)
    (await xz.update()).check()

    clock.advance(20)
    gz = apts(mirror, proxy.url, by_hash=False, compression="gz", max_age=ACCEPTS_CACHED)
    (await gz.update()).check()
    assert mirror.server.count(f"{mirror.repo.binary_dir}/Packages.gz") == 1

    await mirror.upload("hello", "2.0")
    clock.advance(MAX_AGE - 20 + 1)  # InRelease stale, Packages.gz not yet
    for apt in (gz, xz):
        (await apt.update()).check()
        assert await apt.candidate("hello") == "2.0"
        assert await install(apt, mirror, "hello") == "2.0"


@pytest_twisted.ensureDeferred
async def test_lagging_mirror_does_not_roll_back_the_release(
    tmp_path, signer, mirrors, make_proxy, apts
):
    """
    The first source publishes 2.0, then goes away; the second lags with
    1.0.  apt itself takes an ``InRelease`` older than the one it has
    without a word (and rolls back), so pkgcache must refuse it.
    """
    primary = await mirrors(by_hash=True)
    lagging_root = tmp_path / "lagging"
    shutil.copytree(primary.repo.root, lagging_root)  # 1.0, mtimes and all
    lagging = RepoServer(lagging_root)
    try:
        await primary.upload("hello", "2.0")
        clock = Clock()
        proxy = make_proxy([primary.url, lagging.url], volatile_max_age=MAX_AGE, clock=clock)
        apt = apts(primary, proxy.url, max_age=ACCEPTS_CACHED)
        (await apt.update()).check()
        assert await apt.candidate("hello") == "2.0"
        assert await install(apt, primary, "hello") == "2.0"

        await primary.server.stop()
        clock.advance(MAX_AGE + 1)
        (await apt.update()).check()
        assert await apt.candidate("hello") == "2.0"
        assert lagging.count(f"{primary.repo.dists}/InRelease") == 1

        # A machine with nothing in its lists (so no If-Modified-Since to
        # hide behind a 304), once the copy is stale again.
        clock.advance(MAX_AGE + 1)
        other = apts(primary, proxy.url, max_age=ACCEPTS_CACHED)
        (await other.update()).check()
        assert await other.candidate("hello") == "2.0"
        assert await install(other, primary, "hello") == "2.0"
        assert lagging.count(f"{primary.repo.dists}/InRelease") == 2
    finally:
        await lagging.stop()
