"""
The real uv (``uv pip install``, from the test extra) through a ``pypi``
mirror whose index links to a files host and offers PEP 691 JSON and
PEP 658 metadata: uv installs, its hash checks pass only on the right
bytes, every page, file and ``.metadata`` comes through the cache, a clean
uv client costs the upstreams nothing but page revalidations, and a new
release is seen once the page is stale.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import wait_for
from tests.pypi_index import (
    V1_JSON, FilesHost, PackageIndexServer, PypiMirror, Release, Uv, build_wheel,
    installed_version, negotiate, start_pypi_mirror, uv_binary,
)

MAX_AGE = 30.0


@pytest_twisted.async_yield_fixture
async def index():
    """An index (PEP 658 metadata on) whose wheels only a files host (``index.files_host``) serves."""
    server = PackageIndexServer(files_host=FilesHost(), core_metadata=True)
    yield server
    await server.stop()


@pytest.fixture
def uv(tmp_path) -> Uv:
    return Uv(tmp_path / "uv")


@pytest.fixture
def clean_uv(tmp_path):
    """``clean_uv()``: another uv client, with a cache of its own (it knows nothing)."""
    made = []

    def make() -> Uv:
        made.append(Uv(tmp_path / f"uv-{len(made) + 2}"))
        return made[-1]

    return make


@pytest_twisted.async_yield_fixture
async def mirror(tmp_path, index):
    """``mirror(clock)``: the pypi mirror of ``index``, its files from its files host."""
    stops = []

    def start(clock: Clock) -> PypiMirror:
        served, stop = start_pypi_mirror(index, tmp_path / "cache", clock, MAX_AGE)
        stops.append(stop)
        return served

    yield start
    for stop in stops:
        await stop()


def both_files(release: Release) -> set[str]:
    return {release.hosted_path, release.hosted_metadata_path}


def test_uv_is_installed():
    """It is in the test extra; without it the other tests here would fail less clearly."""
    assert uv_binary().name == "uv"


@pytest_twisted.ensureDeferred
async def test_uv_installs_through_the_mirror_every_file_through_the_cache(index, uv, mirror):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    yanked = index.add_release("tinypkg", "2.0")
    index.yank("tinypkg", "2.0", "broken")
    served = mirror(Clock())
    target = await uv.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0", "the yanked 2.0 skipped"

    # uv asked for JSON, got it (the index too was asked for JSON), then the
    # .metadata (PEP 658) and the wheel, all from the cache's tree.
    page, metadata, wheel = served.requests
    assert negotiate(page.header(b"accept")) == V1_JSON, page.header(b"accept")
    assert (page.path, page.status, page.content_type) == ("/pypi/simple/tinypkg/", 200, V1_JSON)
    assert not page.conditional, "a clean uv has nothing to revalidate"
    assert page.header(b"cache-control") is None, "nor does it ask for a fresh page"
    assert (metadata.path, metadata.status) == ("/pypi/files" + release.hosted_metadata_path, 200)
    assert (wheel.path, wheel.status) == ("/pypi/files" + release.hosted_path, 200)
    assert [r.content_type for r in index.page_requests()] == [V1_JSON]
    assert index.files_host.hits() == {path: 1 for path in both_files(release)}
    assert not both_files(yanked) & set(index.files_host.hits())
    await wait_for(lambda: served.cached(release).exists() and served.cached_metadata(release).exists())
    assert served.cached(release).read_bytes() == release.data
    assert served.cached_metadata(release).read_bytes() == release.metadata


@pytest_twisted.ensureDeferred
async def test_uv_checks_the_hashes_that_came_through_the_rewrite(index, uv, mirror):
    """The JSON's ``hashes`` survive the rewrite and uv checks them: wrong bytes are refused."""
    release = index.add_release("tinypkg", "1.0")
    index.files_host.tamper(release, build_wheel("tinypkg", "1.0", requires_python=">=3.1")[1])
    served = mirror(Clock())
    result, target = await uv.try_install(served.index_url, "tinypkg")
    assert result.code not in (0, None), result.describe()
    assert "Hash mismatch" in result.err and release.sha256 in result.err, result.describe()
    assert not (target / "tinypkg.py").exists()


@pytest_twisted.ensureDeferred
async def test_a_clean_uv_client_costs_the_upstreams_only_page_revalidations(
    index, uv, clean_uv, mirror
):
    release = index.add_release("tinypkg", "1.0")
    served = mirror(Clock())
    await uv.install(served.index_url, "tinypkg")
    await wait_for(lambda: served.cached(release).exists() and served.cached_metadata(release).exists())
    index_seen, files_seen, mirror_seen = (
        len(index.requests), len(index.files_host.requests), len(served.requests)
    )

    target = await clean_uv().install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    assert [r.path for r in served.requests[mirror_seen:]] == [
        "/pypi/simple/tinypkg/",
        "/pypi/files" + release.hosted_metadata_path,
        "/pypi/files" + release.hosted_path,
    ], "the clean client asked for everything again"
    assert index.files_host.requests[files_seen:] == [], "every file from the cache"
    for request in index.requests[index_seen:]:
        assert request.path.startswith("/simple/") and request.conditional, request
        assert request.status == 304, request


@pytest_twisted.ensureDeferred
async def test_a_new_release_is_seen_through_the_mirror_after_max_age(
    index, uv, clean_uv, mirror
):
    first = index.add_release("tinypkg", "1.0")
    clock = Clock()
    served = mirror(clock)
    assert installed_version(await uv.install(served.index_url, "tinypkg"), "tinypkg") == "1.0"

    second = index.add_release("tinypkg", "2.0", requires_python=">=3")
    # uv sends no max-age: within max-age the cached page is the answer.
    assert installed_version(await clean_uv().install(served.index_url, "tinypkg"), "tinypkg") == "1.0"
    assert index.count("/simple/tinypkg/") == 1

    clock.advance(MAX_AGE + 1)
    assert installed_version(await clean_uv().install(served.index_url, "tinypkg"), "tinypkg") == "2.0"
    [_, revalidation] = index.page_requests()
    assert revalidation.conditional and revalidation.status == 200
    assert index.files_host.hits() == {path: 1 for path in both_files(first) | both_files(second)}


@pytest_twisted.ensureDeferred
async def test_uv_refresh_revalidates_the_page_and_no_file_upstream(index, uv, mirror):
    """
    ``--refresh`` makes uv revalidate everything it cached (``no-cache``
    with validators): pkgcache revalidates the page once with the index
    and answers the immutable files 304 from the cache.
    """
    release = index.add_release("tinypkg", "1.0")
    served = mirror(Clock())
    await uv.install(served.index_url, "tinypkg")
    await wait_for(lambda: served.cached(release).exists() and served.cached_metadata(release).exists())
    index_seen, files_seen, mirror_seen = (
        len(index.requests), len(index.files_host.requests), len(served.requests)
    )
    target = await uv.install(served.index_url, "--refresh", "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    asked = served.requests[mirror_seen:]
    assert [(r.path, r.status) for r in asked] == [
        ("/pypi/simple/tinypkg/", 304),
        ("/pypi/files" + release.hosted_metadata_path, 304),
        ("/pypi/files" + release.hosted_path, 304),
    ]
    for request in asked:
        assert request.conditional and request.header(b"cache-control") == b"no-cache", request
    [revalidation] = index.requests[index_seen:]
    assert (revalidation.path, revalidation.status) == ("/simple/tinypkg/", 304)
    assert revalidation.content_type == V1_JSON and revalidation.conditional
    assert index.files_host.requests[files_seen:] == []


@pytest_twisted.ensureDeferred
async def test_without_pep_658_uv_reads_the_wheel_by_ranges_through_the_cache(tmp_path, uv):
    """
    An index that offers no ``.metadata``: uv reads the wheel's metadata
    with a HEAD and a ``Range`` request, which pkgcache answers from one
    download of the wheel (a HEAD is passed on, and caches nothing).
    """
    index = PackageIndexServer(files_host=FilesHost())
    served, stop = start_pypi_mirror(index, tmp_path / "cache", Clock(), MAX_AGE)
    try:
        release = index.add_release("tinypkg", "1.0")
        target = await uv.install(served.index_url, "tinypkg")
        assert installed_version(target, "tinypkg") == "1.0"
        wheel = "/pypi/files" + release.hosted_path
        assert [(r.method, r.path, r.status) for r in served.requests] == [
            (b"GET", "/pypi/simple/tinypkg/", 200),
            (b"HEAD", wheel, 200),
            (b"GET", wheel, 206),
            (b"GET", wheel, 200),
        ]
        assert served.requests[2].header(b"range") is not None
        assert index.files_host.downloads() == {release.filename: 1}
        assert index.files_host.count(release.hosted_metadata_path) == 0
    finally:
        await stop()
        await index.stop()
