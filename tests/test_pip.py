"""
The real pip against a local PEP 503 index that changes during the test
(:mod:`tests.pypi_index`): first straight from the index, to show the
index and the pip runner are sound, then through pkgcache.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.web.http import stringToDatetime

from tests.conftest import fetch, wait_for
from pkgcache.paths import cache_key_from_postpath
from tests.pypi_index import Pip, PackageIndexServer, installed_version

MAX_AGE = 30.0
WHEEL_1 = "tinypkg-1.0-py3-none-any.whl"
WHEEL_2 = "tinypkg-2.0-py3-none-any.whl"

@pytest_twisted.async_yield_fixture
async def index():
    server = PackageIndexServer()
    yield server
    await server.stop()


@pytest.fixture
def pip(tmp_path) -> Pip:
    return Pip(tmp_path / "pip")


# The index and the runner, without pkgcache.


@pytest_twisted.ensureDeferred
async def test_pip_downloads_and_installs_from_the_index(index, pip):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_1]
    downloaded = pip.workdir / "download-1" / WHEEL_1
    assert downloaded.read_bytes() == release.data

    target = await pip.install(index.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    assert (target / "tinypkg-1.0.dist-info" / "RECORD").exists()
    assert index.downloads() == {WHEEL_1: 2}


@pytest_twisted.ensureDeferred
async def test_a_new_release_appears_and_requires_python_is_honoured(index, pip):
    index.add_release("tinypkg", "1.0")
    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_1]
    index.add_release("tinypkg", "2.0", requires_python=">=3")
    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_2]
    # Newer, but not for this Python: pip skips it from the link's
    # data-requires-python alone, without downloading it.
    index.add_release("tinypkg", "3.0", requires_python="<3")
    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_2]
    assert index.downloads() == {WHEEL_1: 1, WHEEL_2: 2}


@pytest_twisted.ensureDeferred
async def test_what_pip_sends(index, pip):
    """
    What a cache in front of an index gets from pip (pkgcache's freshness
    rules are written for it): the page with its trailing slash and no
    redirect, HTML accepted, ``Cache-Control: max-age=0`` on every page
    request, and no validators of its own (``--no-cache-dir``).
    """
    index.add_release("tinypkg", "1.0")
    await pip.download(index.index_url, "tinypkg")
    [page] = index.index.page_requests()
    assert (page.method, page.path, page.status) == (b"GET", "/simple/tinypkg/", 200)
    assert b"text/html" in page.header(b"accept")
    assert page.header(b"cache-control") == b"max-age=0"
    assert page.header(b"if-none-match") is None
    assert page.header(b"if-modified-since") is None
    [wheel] = [r for r in index.requests if r.path.startswith("/files/")]
    assert wheel.header(b"accept-encoding") == b"identity"
    assert wheel.header(b"cache-control") is None
    assert index.count("/simple/tinypkg") == 0


@pytest_twisted.ensureDeferred
async def test_index_redirects_and_answers_conditional_requests(index, http):
    index.add_release("Tiny_Pkg", "1.0")
    for path in ("simple/tiny-pkg", "simple/Tiny_Pkg/", "simple/tiny.pkg"):
        response, _ = await fetch(http, index.url + path)
        assert response.code == 301, path
        assert response.headers.getRawHeaders(b"location") == [
            (index.url + "simple/tiny-pkg/").encode()
        ]

    url = index.url + "simple/tiny-pkg/"
    response, page = await fetch(http, url)
    assert response.code == 200
    assert b'href="../../files/Tiny_Pkg-1.0-py3-none-any.whl#sha256=' in page
    [etag] = response.headers.getRawHeaders(b"etag")
    [modified] = response.headers.getRawHeaders(b"last-modified")

    async def status(**headers: bytes) -> int:
        raw = {name.replace("_", "-").encode(): [value] for name, value in headers.items()}
        answer, _ = await fetch(http, url, headers=raw)
        return answer.code

    assert await status(if_none_match=etag) == 304
    assert await status(if_none_match=b"W/" + etag) == 304
    assert await status(if_modified_since=modified) == 304
    # If-None-Match wins over If-Modified-Since.
    assert await status(if_none_match=b'"other"', if_modified_since=modified) == 200

    index.add_release("Tiny_Pkg", "1.1")
    # Changed within the same second, and both validators say so.
    assert await status(if_none_match=etag) == 200
    assert await status(if_modified_since=modified) == 200
    response, page = await fetch(http, url)
    assert b"Tiny_Pkg-1.1-py3-none-any.whl" in page
    [later] = response.headers.getRawHeaders(b"last-modified")
    assert stringToDatetime(later) > stringToDatetime(modified)

    wheel = "Tiny_Pkg-1.0-py3-none-any.whl"
    response, body = await fetch(http, index.url + "files/" + wheel)
    assert body == index.index.files[wheel].data
    assert response.headers.getRawHeaders(b"content-type") == [b"application/octet-stream"]
    response, _ = await fetch(http, index.url + "simple/nothing/")
    assert response.code == 404


# Through pkgcache.


def _proxy(make_proxy, index, clock: Clock):
    return make_proxy([index.url], clock=clock, volatile_max_age=MAX_AGE)


@pytest_twisted.ensureDeferred
async def test_pip_download_through_pkgcache(index, pip, make_proxy):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    proxy = _proxy(make_proxy, index, Clock())
    assert await pip.download(proxy.url + "/simple/", "tinypkg") == [WHEEL_1]
    assert (pip.workdir / "download-1" / WHEEL_1).read_bytes() == release.data
    assert index.downloads() == {WHEEL_1: 1}
    assert await proxy.published("/files/" + WHEEL_1) == release.data


@pytest_twisted.ensureDeferred
async def test_pip_install_through_pkgcache_then_again_from_the_cache(index, pip, make_proxy):
    index.add_release("tinypkg", "1.0")
    proxy = _proxy(make_proxy, index, Clock())
    target = await pip.install(proxy.url + "/simple/", "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    await proxy.published("/files/" + WHEEL_1)
    first_run = len(index.requests)

    target = await pip.install(proxy.url + "/simple/", "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    assert index.downloads() == {WHEEL_1: 1}, "the wheel came from the cache"
    # pip sends max-age=0 with every page request, which pkgcache honours
    # with one conditional request: never a full refetch of an unchanged page.
    assert [(r.path, r.status) for r in index.requests[first_run:]] == [
        ("/simple/tinypkg/", 304)
    ]


@pytest_twisted.ensureDeferred
async def test_a_new_release_is_seen_through_pkgcache_after_max_age(index, pip, make_proxy):
    index.add_release("tinypkg", "1.0")
    clock = Clock()
    proxy = _proxy(make_proxy, index, clock)
    assert await pip.download(proxy.url + "/simple/", "tinypkg") == [WHEEL_1]

    index.add_release("tinypkg", "2.0")
    # (As pip sends max-age=0, the page is revalidated even without this.)
    clock.advance(MAX_AGE + 1)
    assert await pip.download(proxy.url + "/simple/", "tinypkg") == [WHEEL_2]
    assert index.downloads() == {WHEEL_1: 1, WHEEL_2: 1}
    assert index.count("/simple/tinypkg/", status=200) == 2


@pytest_twisted.ensureDeferred
async def test_a_fresh_page_is_served_from_the_cache_to_a_client_without_max_age(
    index, make_proxy, http
):
    index.add_release("tinypkg", "1.0")
    clock = Clock()
    proxy = _proxy(make_proxy, index, clock)
    _, first = await fetch(http, proxy.url + "/simple/tinypkg/")
    # The body is all sent before the copy is published: wait for that.
    await wait_for(lambda: proxy.resource.downloads.in_flight(key_of("/simple/tinypkg/")) is None)
    assert proxy.cached("/simple/tinypkg/.pkgcache-index").getContent() == first
    index.add_release("tinypkg", "2.0")
    clock.advance(MAX_AGE - 1)
    response, fresh = await fetch(http, proxy.url + "/simple/tinypkg/")
    assert fresh == first and b"2.0" not in fresh
    assert response.headers.getRawHeaders(b"cache-status") == [b"pkgcache; hit; ttl=1"]
    assert index.count("/simple/tinypkg/") == 1


def key_of(path: str):
    return cache_key_from_postpath([part.encode() for part in path.lstrip("/").split("/")])
