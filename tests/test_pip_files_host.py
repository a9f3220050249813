"""
The real pip through a ``pypi`` mirror whose index links to its files on
another host, as the real index does (:class:`tests.pypi_index.FilesHost`):
the pages pip gets link only into the cache (``/pypi/files/``), the files
come from the files host once and then from the cache, and a new release is
seen once the page is stale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from pkgcache.mirrors import Mirror
from pkgcache.root import MirrorsResource
from pkgcache.service import CacheService
from pkgcache.sources import Source
from tests.conftest import fetch, wait_for
from tests.pypi_index import FilesHost, PackageIndexServer, Pip, Release, installed_version

MAX_AGE = 30.0
WHEEL_1 = "tinypkg-1.0-py3-none-any.whl"
WHEEL_2 = "tinypkg-2.0-py3-none-any.whl"
WHEEL_3 = "tinypkg-3.0-py3-none-any.whl"


@pytest_twisted.async_yield_fixture
async def index():
    """An index whose wheels only a files host (``index.files_host``) serves."""
    server = PackageIndexServer(files_host=FilesHost())
    yield server
    await server.stop()


@pytest.fixture
def pip(tmp_path) -> Pip:
    return Pip(tmp_path / "pip")


@dataclass
class Mirrored:
    """A ``MirrorsResource`` with one pypi mirror, ``pypi``, on 127.0.0.1."""

    url: str
    cache: Path

    @property
    def index_url(self) -> str:
        return self.url + "/pypi/simple/"

    def cached(self, release: Release) -> Path:
        return self.cache / "pypi" / "files" / release.hosted_path.lstrip("/")


@pytest_twisted.async_yield_fixture
async def mirror(tmp_path, index):
    """``mirror(clock)``: the pypi mirror of ``index``, its files from its files host."""
    running = []

    def start(clock: Clock) -> Mirrored:
        root = MirrorsResource(
            [Mirror("pypi", (Source(index.url),), "pypi",
                    files=(Source(index.files_host.url),))],
            cache_dir=FilePath(str(tmp_path / "cache")),
            clock=clock,
            volatile_max_age=MAX_AGE,
        )
        service = CacheService(root)
        service.startService()
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        running.append((port, service))
        return Mirrored(f"http://127.0.0.1:{port.getHost().port}", tmp_path / "cache")

    yield start
    for port, service in running:
        await port.stopListening()
        if service.running:
            await service.stopService()


def hrefs(page: bytes) -> list[str]:
    """Every ``href`` of an HTML page, as written."""
    return [m.group(2).decode() for m in re.finditer(rb"""href=(["'])(.*?)\1""", page)]


# The index and its files host, without pkgcache.


@pytest_twisted.ensureDeferred
async def test_the_index_links_to_its_files_host_which_alone_serves_them(index, pip, http):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    files = index.files_host
    _, page = await fetch(http, index.index_url + "tinypkg/")
    [href] = hrefs(page)
    assert href == f"{files.url_of(release)}#sha256={release.sha256}"
    assert re.fullmatch(r"/packages/[0-9a-f]{2}/[0-9a-f]{2}/" + re.escape(WHEEL_1),
                        release.hosted_path)
    assert b'data-requires-python="&gt;=3"' in page
    response, _ = await fetch(http, index.url + "files/" + WHEEL_1)
    assert response.code == 404, "the index serves no wheel itself"

    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_1]
    assert (pip.workdir / "download-1" / WHEEL_1).read_bytes() == release.data
    assert files.hits() == {release.hosted_path: 1}
    assert index.downloads() == {WHEEL_1: 1}


# Through the pypi mirror.


@pytest_twisted.ensureDeferred
async def test_pip_through_the_mirror_gets_pages_linking_only_into_the_cache(
    index, pip, mirror, http
):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    served = mirror(Clock())
    page_url = served.index_url + "tinypkg/"
    response, page = await fetch(http, page_url)
    assert response.code == 200
    assert index.files_host.url.encode() not in page
    links = hrefs(page)
    assert links, page
    for href in links:
        assert not urlsplit(href).scheme and not urlsplit(href).netloc, href
        absolute = urljoin(page_url, href)
        assert absolute.startswith(served.url + "/pypi/files/"), absolute
    assert urljoin(page_url, links[0]) == (
        f"{served.url}/pypi/files{release.hosted_path}#sha256={release.sha256}"
    )
    assert b'data-requires-python="&gt;=3"' in page

    # pip checks the #sha256= fragment against what it downloads.
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_1]
    assert (pip.workdir / "download-1" / WHEEL_1).read_bytes() == release.data
    assert index.files_host.hits() == {release.hosted_path: 1}


@pytest_twisted.ensureDeferred
async def test_each_file_comes_from_the_files_host_once_across_pip_runs(index, pip, mirror):
    release = index.add_release("tinypkg", "1.0")
    served = mirror(Clock())
    target = await pip.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    await wait_for(lambda: served.cached(release).exists())
    assert served.cached(release).read_bytes() == release.data

    # A clean client (new target, no pip cache): the wheel from the cache.
    second = Pip(pip.workdir.parent / "pip-2")
    assert await second.download(served.index_url, "tinypkg") == [WHEEL_1]
    target = await second.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    assert index.files_host.hits() == {release.hosted_path: 1}
    assert index.downloads() == {WHEEL_1: 1}


@pytest_twisted.ensureDeferred
async def test_a_new_release_is_seen_through_the_mirror_after_max_age(index, pip, mirror):
    first = index.add_release("tinypkg", "1.0")
    clock = Clock()
    served = mirror(clock)
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_1]

    second = index.add_release("tinypkg", "2.0", requires_python=">=3")
    # Newer, but not for this Python: skipped from data-requires-python,
    # kept on the rewritten page, never downloaded.
    third = index.add_release("tinypkg", "3.0", requires_python="<3")
    clock.advance(MAX_AGE + 1)
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_2]
    target = await pip.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "2.0"
    hits = index.files_host.hits()
    assert hits == {first.hosted_path: 1, second.hosted_path: 1}, hits
    assert third.hosted_path not in hits
    assert index.count("/simple/tinypkg/", status=200) >= 2
