"""
A PyPI mirror's pages: file links on the files host rewritten into the
cache, everything else kept; the files then come through the cache.
"""

from __future__ import annotations

import json
from urllib.parse import urljoin

import pytest_twisted
from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import Site

from pkgcache.kinds.pypi import SimpleIndexRewriter
from pkgcache.mirrors import Mirror
from pkgcache.paths import cache_key_from_postpath
from pkgcache.root import MirrorsResource
from pkgcache.service import CacheService
from pkgcache.sources import Source
from tests.conftest import fetch, wait_for

FILES = "https://files.example/"
PAGE = (
    b'<!DOCTYPE html><html><body>\n'
    b'<a href="https://files.example/packages/ab/cd/foo-1.0-py3-none-any.whl#sha256=00ff" '
    b'data-requires-python="&gt;=3.8" data-dist-info-metadata="sha256=11ee">'
    b'foo-1.0-py3-none-any.whl</a>\n'
    b"<a href='https://files.example/packages/ef/01/foo-1.1.tar.gz#sha256=22dd' "
    b'data-yanked="broken">foo-1.1.tar.gz</a>\n'
    b'<a href="https://elsewhere.example/foo-0.1.tar.gz">foo-0.1.tar.gz</a>\n'
    b'</body></html>\n'
)


def key(path: str):
    return cache_key_from_postpath([part.encode() for part in path.lstrip("/").split("/")])


def test_html_file_links_become_relative_links_into_the_cache():
    rewriter = SimpleIndexRewriter([Source(FILES)])
    page = rewriter.rewrite(key("/simple/foo/"), PAGE, b"text/html")
    assert b'href="../../files/packages/ab/cd/foo-1.0-py3-none-any.whl#sha256=00ff"' in page
    assert b"href='../../files/packages/ef/01/foo-1.1.tar.gz#sha256=22dd'" in page
    assert b'data-requires-python="&gt;=3.8" data-dist-info-metadata="sha256=11ee"' in page
    assert b'data-yanked="broken"' in page
    assert b'href="https://elsewhere.example/foo-0.1.tar.gz"' in page, "not a files host"
    base = "http://cache:4000/pypi/simple/foo/"
    assert urljoin(base, "../../files/packages/ab/cd/x.whl") == (
        "http://cache:4000/pypi/files/packages/ab/cd/x.whl"
    )


def test_json_file_urls_are_rewritten_and_the_rest_kept():
    document = {
        "meta": {"api-version": "1.1"},
        "name": "foo",
        "files": [
            {"filename": "foo-1.0.whl", "url": FILES + "packages/ab/foo-1.0.whl",
             "hashes": {"sha256": "00ff"}, "requires-python": ">=3.8",
             "core-metadata": {"sha256": "11ee"}, "yanked": False},
        ],
    }
    rewriter = SimpleIndexRewriter([Source(FILES)])
    page = rewriter.rewrite(
        key("/simple/foo/"), json.dumps(document).encode(), b"application/vnd.pypi.simple.v1+json"
    )
    (entry,) = json.loads(page)["files"]
    assert entry["url"] == "../../files/packages/ab/foo-1.0.whl"
    assert entry["core-metadata"] == {"sha256": "11ee"} and entry["hashes"] == {"sha256": "00ff"}


def test_only_simple_pages_are_rewritten():
    rewriter = SimpleIndexRewriter([Source(FILES)])
    assert rewriter.applies(key("/simple/")) and rewriter.applies(key("/simple/foo/"))
    assert not rewriter.applies(key("/packages/x.whl"))


@pytest_twisted.async_yield_fixture
async def serve(tmp_path):
    """``serve(index_url, files_url)``: a pypi mirror named pypi; its URL."""
    running = []

    def start(index_url: str, files_url: str) -> str:
        root = MirrorsResource(
            [Mirror("pypi", (Source(index_url),), "pypi", files=(Source(files_url),))],
            cache_dir=FilePath(str(tmp_path / "cache")),
            node_name="pkgcache",
        )
        service = CacheService(root)
        service.startService()
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        running.append((port, service))
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port, service in running:
        await port.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_files_linked_from_a_page_come_through_the_cache(origins, http, tmp_path, serve):
    index, files = origins(), origins()
    wheel = b"PK wheel bytes"
    page = PAGE.replace(b"https://files.example/", files.url.encode())
    index.add("/simple/foo/", page, content_type=b"text/html")
    files.add("/packages/ab/cd/foo-1.0-py3-none-any.whl", wheel)
    url = serve(index.url, files.url)
    response, served = await fetch(http, url + "/pypi/simple/foo/")
    assert files.url.encode() not in served
    link = urljoin(url + "/pypi/simple/foo/",
                   "../../files/packages/ab/cd/foo-1.0-py3-none-any.whl")
    assert b"../../files/packages/ab/cd/foo-1.0-py3-none-any.whl#sha256=00ff" in served
    for _ in range(2):
        _, body = await fetch(http, link)
        assert body == wheel
        await wait_for(lambda: (tmp_path / "cache/pypi/files/packages/ab/cd/"
                                "foo-1.0-py3-none-any.whl").exists())
    assert files.count("/packages/ab/cd/foo-1.0-py3-none-any.whl") == 1
    # The page is kept as the index sent it.
    assert (tmp_path / "cache/pypi/simple/foo/.pkgcache-index").read_bytes() == page
    again, hit = await fetch(http, url + "/pypi/simple/foo/")
    assert hit == served
    assert again.headers.getRawHeaders(b"cache-status")[0].startswith(b"pkgcache; hit")


def test_project_names_are_normalised_as_pep_503_says():
    rewriter = SimpleIndexRewriter([Source(FILES)])
    assert rewriter.redirect(key("/simple/Foo_Bar.baz/")) == b"../foo-bar-baz/"
    assert rewriter.redirect(key("/simple/foo-bar/")) is None
    assert rewriter.redirect(key("/simple/")) is None


@pytest_twisted.ensureDeferred
async def test_a_project_page_under_another_spelling_redirects(origins, http, serve):
    index = origins()
    url = serve(index.url, FILES)
    response, _ = await fetch(http, url + "/pypi/simple/Foo_Bar/")
    assert response.code == 301
    location = response.headers.getRawHeaders(b"location")[0].decode()
    assert urljoin(url + "/pypi/simple/Foo_Bar/", location) == url + "/pypi/simple/foo-bar/"
    assert index.origin.requests == []


PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)


def test_the_representation_follows_the_client_accept():
    rewriter = SimpleIndexRewriter([Source(FILES)])
    page = key("/simple/foo/")
    assert rewriter.representation(page, PIP_ACCEPT.encode()).representation == "json"
    assert rewriter.representation(page, b"*/*").representation == ""
    assert rewriter.representation(page, b"text/html").representation == ""
    assert rewriter.representation(page, None).representation == ""
    assert rewriter.representation(
        page, b"application/vnd.pypi.simple.v1+json;q=0.2, text/html"
    ).representation == ""


class NegotiatingIndex(Resource):
    """An index that answers a project page in HTML or JSON by Accept."""

    isLeaf = True

    def __init__(self, files_url: str) -> None:
        super().__init__()
        self.files_url = files_url
        self.accepts: list[bytes] = []

    def render_GET(self, request):
        accept = request.getHeader(b"accept") or b""
        self.accepts.append(accept)
        url = self.files_url + "packages/ab/foo-1.0.whl"
        if b"vnd.pypi.simple.v1+json" in accept:
            request.setHeader(b"content-type", b"application/vnd.pypi.simple.v1+json")
            return json.dumps(
                {"meta": {"api-version": "1.0"}, "name": "foo",
                 "files": [{"filename": "foo-1.0.whl", "url": url, "hashes": {}}]}
            ).encode()
        request.setHeader(b"content-type", b"text/html")
        return f'<a href="{url}">foo-1.0.whl</a>'.encode()


@pytest_twisted.ensureDeferred
async def test_json_and_html_pages_are_fetched_and_cached_apart(http, serve, tmp_path):
    index = NegotiatingIndex(FILES)
    port = reactor.listenTCP(0, Site(index), interface="127.0.0.1")
    try:
        url = serve(f"http://127.0.0.1:{port.getHost().port}/", FILES)
        page = url + "/pypi/simple/foo/"
        as_json, body = await fetch(http, page, headers={"accept": [PIP_ACCEPT]})
        assert json.loads(body)["files"][0]["url"] == "../../files/packages/ab/foo-1.0.whl"
        assert as_json.headers.getRawHeaders(b"vary") == [b"Accept"]
        as_html, body = await fetch(http, page)
        assert body == b'<a href="../../files/packages/ab/foo-1.0.whl">foo-1.0.whl</a>'
        assert as_html.headers.getRawHeaders(b"content-type") == [b"text/html"]
        await wait_for(lambda: (tmp_path / "cache/pypi/simple/foo/.pkgcache-index").exists())
        await wait_for(lambda: (tmp_path / "cache/pypi/simple/foo/.pkgcache-index.json").exists())
        hit, body = await fetch(http, page, headers={"accept": [PIP_ACCEPT]})
        assert hit.headers.getRawHeaders(b"content-type") == [
            b"application/vnd.pypi.simple.v1+json"
        ]
        assert len(index.accepts) == 2
        assert index.accepts[0] == b"application/vnd.pypi.simple.v1+json"
    finally:
        await port.stopListening()
