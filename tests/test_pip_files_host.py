"""
The real pip through a ``pypi`` mirror whose index links to its files on
another host, as the real index does (:class:`tests.pypi_index.FilesHost`),
and offers PEP 691 JSON and PEP 658 metadata: the pages pip gets (JSON, as
it prefers) link only into the cache (``/pypi/files/``) and keep their
hashes, ``requires-python``, ``yanked`` and metadata hashes; the files and
their ``.metadata`` come from the files host once and then from the cache;
a new release is seen once the page is stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import fetch, wait_for
from tests.pypi_index import (
    TEXT_HTML, V1_HTML, V1_JSON, FilesHost, PackageIndexServer, Pip, PypiMirror, Release,
    installed_version, negotiate, start_pypi_mirror,
)

MAX_AGE = 30.0
WHEEL_1 = "tinypkg-1.0-py3-none-any.whl"
WHEEL_2 = "tinypkg-2.0-py3-none-any.whl"
WHEEL_3 = "tinypkg-3.0-py3-none-any.whl"
#: What pip 23 sends for a page.
PIP_ACCEPT = (
    b"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    b"text/html; q=0.01"
)


@pytest_twisted.async_yield_fixture
async def index():
    """An index (PEP 658 metadata on) whose wheels only a files host (``index.files_host``) serves."""
    server = PackageIndexServer(files_host=FilesHost(), core_metadata=True)
    yield server
    await server.stop()


@pytest.fixture
def pip(tmp_path) -> Pip:
    return Pip(tmp_path / "pip")


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


def hrefs(page: bytes) -> list[str]:
    """Every ``href`` of an HTML page, as written."""
    return [m.group(2).decode() for m in re.finditer(rb"""href=(["'])(.*?)\1""", page)]


def anchors(page: bytes) -> dict[str, str]:
    """Each link's text (the file name) and its whole ``<a ...>`` tag."""
    return {m.group(2).decode(): m.group(1).decode()
            for m in re.finditer(rb"(<a [^>]*>)([^<]*)</a>", page)}


def both_files(release: Release) -> set[str]:
    """The wheel's and its ``.metadata``'s paths on the files host."""
    return {release.hosted_path, release.hosted_metadata_path}


# The index and its files host, without pkgcache.


def test_the_index_weighs_accept_as_the_real_one():
    """What the index answers is what pkgcache must cache apart: proper q-values."""
    assert negotiate(None) == TEXT_HTML
    assert negotiate(PIP_ACCEPT) == V1_JSON
    assert negotiate(b"application/vnd.pypi.simple.v1+json, "
                     b"application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01") == V1_JSON
    assert negotiate(b"*/*") == TEXT_HTML
    assert negotiate(b"text/html") == TEXT_HTML
    assert negotiate(b"application/vnd.pypi.simple.latest+json") == V1_JSON
    assert negotiate(b"Application/Vnd.PyPI.Simple.V1+JSON;Q=0.5, text/html;q=0.4") == V1_JSON
    assert negotiate(b"application/vnd.pypi.simple.v1+json;q=0.1, text/html;q=0.5") == TEXT_HTML
    # The most specific range wins: */* does not lift a refused JSON.
    assert negotiate(b"application/vnd.pypi.simple.v1+json;q=0, */*") == TEXT_HTML
    assert negotiate(b"text/html;q=0, application/*;q=0.3") == V1_HTML
    assert negotiate(b"image/png") == TEXT_HTML, "nothing acceptable: HTML"
    assert negotiate(b"application/vnd.pypi.simple.v1+json;q=bogus, text/html;q=0.1") == TEXT_HTML


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
    metadata = f"sha256={release.metadata_sha256}"
    assert f'data-core-metadata="{metadata}"'.encode() in page
    assert f'data-dist-info-metadata="{metadata}"'.encode() in page
    response, body = await fetch(http, files.url_of(release) + ".metadata")
    assert body == release.metadata and body.startswith(b"Metadata-Version: ")
    response, _ = await fetch(http, index.url + "files/" + WHEEL_1)
    assert response.code == 404, "the index serves no wheel itself"

    assert await pip.download(index.index_url, "tinypkg") == [WHEEL_1]
    assert (pip.workdir / "download-1" / WHEEL_1).read_bytes() == release.data
    # pip read the metadata (PEP 658) before it took the wheel.
    assert [r.path for r in files.requests[1:]] == [
        release.hosted_metadata_path, release.hosted_path
    ]
    assert index.downloads() == {WHEEL_1: 1}
    assert index.metadata_downloads() == {WHEEL_1 + ".metadata": 2}, "ours and pip's"


@pytest_twisted.ensureDeferred
async def test_the_index_answers_json_to_a_client_that_prefers_it(index, http):
    """Each representation is its own document: its type, ETag and 304s; ``Vary: Accept``."""
    first = index.add_release("tinypkg", "1.0", requires_python=">=3")
    yanked = index.add_release("tinypkg", "2.0")
    index.yank("tinypkg", "2.0", "broken")
    url = index.index_url + "tinypkg/"
    json_response, body = await fetch(http, url, headers={b"accept": [PIP_ACCEPT]})
    assert json_response.headers.getRawHeaders(b"content-type") == [V1_JSON]
    assert json_response.headers.getRawHeaders(b"vary") == [b"Accept"]
    document = json.loads(body)
    assert document["meta"]["api-version"].startswith("1.")
    assert document["name"] == "tinypkg" and document["versions"] == ["1.0", "2.0"]
    entry, yanked_entry = document["files"]
    assert entry == {
        "filename": WHEEL_1,
        "url": index.files_host.url_of(first),
        "hashes": {"sha256": first.sha256},
        "requires-python": ">=3",
        "yanked": False,
        "size": len(first.data),
        "upload-time": entry["upload-time"],
        "core-metadata": {"sha256": first.metadata_sha256},
        "dist-info-metadata": {"sha256": first.metadata_sha256},
    }
    assert (yanked_entry["filename"], yanked_entry["yanked"]) == (yanked.filename, "broken")
    assert yanked_entry["requires-python"] is None

    html_response, page = await fetch(http, url)
    assert html_response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert 'data-yanked="broken"' in anchors(page)[yanked.filename]
    assert "data-yanked" not in anchors(page)[WHEEL_1]
    [json_etag] = json_response.headers.getRawHeaders(b"etag")
    [html_etag] = html_response.headers.getRawHeaders(b"etag")
    assert json_etag != html_etag
    response, _ = await fetch(http, url, headers={b"accept": [PIP_ACCEPT], b"if-none-match": [json_etag]})
    assert response.code == 304
    assert response.headers.getRawHeaders(b"vary") == [b"Accept"]
    response, _ = await fetch(http, url, headers={b"accept": [PIP_ACCEPT], b"if-none-match": [html_etag]})
    assert response.code == 200, "the HTML's ETag does not match the JSON"

    _, root = await fetch(http, index.index_url, headers={b"accept": [PIP_ACCEPT]})
    assert json.loads(root)["projects"] == [{"name": "tinypkg"}]
    assert [r.content_type for r in index.page_requests()] == [
        V1_JSON, b"text/html; charset=utf-8", V1_JSON, V1_JSON, V1_JSON
    ]


# Through the pypi mirror.


@pytest_twisted.ensureDeferred
async def test_pip_through_the_mirror_gets_pages_linking_only_into_the_cache(
    index, pip, mirror, http
):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    yanked = index.add_release("tinypkg", "2.0", requires_python=">=3.1")
    index.yank("tinypkg", "2.0", "broken")
    served = mirror(Clock())
    page_url = served.index_url + "tinypkg/"
    response, page = await fetch(http, page_url)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert index.files_host.url.encode() not in page
    links = hrefs(page)
    assert len(links) == 2, page
    for href in links:
        assert not urlsplit(href).scheme and not urlsplit(href).netloc, href
        absolute = urljoin(page_url, href)
        assert absolute.startswith(served.url + "/pypi/files/"), absolute
    assert urljoin(page_url, links[0]) == (
        f"{served.url}/pypi/files{release.hosted_path}#sha256={release.sha256}"
    )
    tags = anchors(page)
    assert 'data-requires-python="&gt;=3"' in tags[WHEEL_1]
    metadata = f"sha256={release.metadata_sha256}"
    assert f'data-core-metadata="{metadata}"' in tags[WHEEL_1]
    assert f'data-dist-info-metadata="{metadata}"' in tags[WHEEL_1]
    assert 'data-yanked="broken"' in tags[yanked.filename]
    assert 'data-requires-python="&gt;=3.1"' in tags[yanked.filename]

    # pip checks the hash against what it downloads, and skips the yanked 2.0.
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_1]
    assert (pip.workdir / "download-1" / WHEEL_1).read_bytes() == release.data
    assert index.files_host.hits() == {path: 1 for path in both_files(release)}


@pytest_twisted.ensureDeferred
async def test_pip_gets_json_through_the_mirror_with_every_url_in_the_cache(
    index, pip, mirror, http
):
    release = index.add_release("tinypkg", "1.0", requires_python=">=3")
    yanked = index.add_release("tinypkg", "2.0")
    index.yank("tinypkg", "2.0")
    served = mirror(Clock())
    target = await pip.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0", "hashes verified, yanked skipped"

    [page] = [r for r in served.requests if r.path.startswith("/pypi/simple/")]
    assert page.header(b"accept") == PIP_ACCEPT
    assert (page.status, page.content_type) == (200, V1_JSON)
    [upstream] = index.page_requests()
    assert upstream.content_type == V1_JSON, "pkgcache asked the index for JSON"

    # The page pip got, asked for as pip asks.
    page_url = served.index_url + "tinypkg/"
    response, body = await fetch(http, page_url, headers={b"accept": [page.header(b"accept")]})
    assert response.headers.getRawHeaders(b"content-type") == [V1_JSON]
    assert response.headers.getRawHeaders(b"vary") == [b"Accept"]
    assert index.files_host.url.encode() not in body
    files = json.loads(body)["files"]
    for entry in files:
        assert not urlsplit(entry["url"]).scheme, entry["url"]
        assert urljoin(page_url, entry["url"]).startswith(served.url + "/pypi/files/packages/")
    entry, yanked_entry = files
    assert urljoin(page_url, entry["url"]) == f"{served.url}/pypi/files{release.hosted_path}"
    assert entry["hashes"] == {"sha256": release.sha256}
    assert entry["requires-python"] == ">=3" and entry["yanked"] is False
    assert entry["core-metadata"] == entry["dist-info-metadata"] == {"sha256": release.metadata_sha256}
    assert (yanked_entry["filename"], yanked_entry["yanked"]) == (yanked.filename, True)

    # pip took the .metadata and the wheel through the cache, never the yanked one's.
    fetched = [r.path for r in served.requests if r.path.startswith("/pypi/files/")]
    assert fetched == ["/pypi/files" + release.hosted_metadata_path, "/pypi/files" + release.hosted_path]
    assert index.files_host.hits() == {path: 1 for path in both_files(release)}


@pytest_twisted.ensureDeferred
async def test_each_file_comes_from_the_files_host_once_across_pip_runs(index, pip, mirror):
    release = index.add_release("tinypkg", "1.0")
    served = mirror(Clock())
    target = await pip.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    await wait_for(lambda: served.cached(release).exists() and served.cached_metadata(release).exists())
    assert served.cached(release).read_bytes() == release.data
    assert served.cached_metadata(release).read_bytes() == release.metadata

    # A clean client (new target, no pip cache): both files from the cache.
    second = Pip(pip.workdir.parent / "pip-2")
    assert await second.download(served.index_url, "tinypkg") == [WHEEL_1]
    target = await second.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "1.0"
    metadata = "/pypi/files" + release.hosted_metadata_path
    assert sum(r.path == metadata and r.status == 200 for r in served.requests) == 3, (
        "each pip run read the metadata through the cache"
    )
    assert index.files_host.hits() == {path: 1 for path in both_files(release)}
    assert index.downloads() == {WHEEL_1: 1}
    assert index.metadata_downloads() == {WHEEL_1 + ".metadata": 1}


@pytest_twisted.ensureDeferred
async def test_a_new_release_is_seen_through_the_mirror_after_max_age(index, pip, mirror):
    first = index.add_release("tinypkg", "1.0")
    clock = Clock()
    served = mirror(clock)
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_1]

    second = index.add_release("tinypkg", "2.0", requires_python=">=3")
    # Newer, but not for this Python: skipped from requires-python,
    # kept on the rewritten page, never downloaded.
    third = index.add_release("tinypkg", "3.0", requires_python="<3")
    clock.advance(MAX_AGE + 1)
    assert await pip.download(served.index_url, "tinypkg") == [WHEEL_2]
    target = await pip.install(served.index_url, "tinypkg")
    assert installed_version(target, "tinypkg") == "2.0"
    hits = index.files_host.hits()
    assert hits == {path: 1 for path in both_files(first) | both_files(second)}, hits
    assert not both_files(third) & set(hits)
    assert index.count("/simple/tinypkg/", status=200) >= 2
