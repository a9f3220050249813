"""
An npm mirror's package documents: scoped names in both spellings, the
full and abbreviated forms apart, ``dist.tarball`` links rewritten into the
cache as absolute URLs (from the client's ``Host`` or ``public_url``) and
every other byte kept; the tarballs then come through the cache.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import Site

from pkgcache.kinds.npm import PackageDocumentRewriter
from pkgcache.mirrors import Mirror
from pkgcache.paths import CacheKey, UnsafePath
from pkgcache.root import MirrorResource, MirrorsResource
from pkgcache.service import CacheService
from pkgcache.sources import Source
from tests.conftest import fetch, wait_for

REGISTRY = "https://npm.mirror.example/"
TARBALLS = "https://tarballs.mirror.example/"
NPM_ACCEPT = b"application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"


def document(registry: str, tarballs: str = TARBALLS) -> bytes:
    """A package document as a registry writes it (compact, one odd escape)."""
    return (
        b'{"name":"@acme/left-pad","dist-tags":{"latest":"1.1.0"},"versions":{'
        b'"1.0.0":{"name":"@acme/left-pad","version":"1.0.0","dist":{'
        b'"integrity":"sha512-AAAA==","shasum":"0a1b",'
        b'"tarball":"' + registry.encode() + b'@acme/left-pad/-/left-pad-1.0.0.tgz"}},'
        b'"1.1.0":{"name":"@acme/left-pad","version":"1.1.0","dist":{'
        b'"integrity":"sha512-BBBB==","shasum":"2c3d",'
        b'"tarball" : "' + tarballs.replace("/", "\\/").encode()
        + b'@acme/left-pad/-/left-pad-1.1.0.tgz"}},'
        b'"0.1.0":{"dist":{"tarball":"https://elsewhere.example/left-pad-0.1.0.tgz"}}},'
        b'"repository":{"url":"' + registry.encode() + b'not-a-tarball"}}'
    )


def postpath(path: str) -> list[bytes]:
    """Segments as twisted.web gives them: split on '/', then each decoded."""
    from urllib.parse import unquote_to_bytes

    return [unquote_to_bytes(part) for part in path.lstrip("/").split("/")]


def test_a_scoped_document_is_one_key_in_both_spellings():
    rewriter = PackageDocumentRewriter([Source(REGISTRY)])
    encoded = rewriter.key_for(postpath("/@acme%2fleft-pad"))
    assert encoded == rewriter.key_for(postpath("/@acme/left-pad"))
    assert encoded == rewriter.key_for(postpath("/@acme%2Fleft-pad"))
    assert encoded == CacheKey(("@acme", "left-pad"), directory=True, remote="@acme%2fleft-pad")
    assert Source(REGISTRY).url_for(encoded) == REGISTRY + "@acme%2fleft-pad"
    assert rewriter.applies(encoded)


def test_documents_and_tarballs_are_told_apart():
    rewriter = PackageDocumentRewriter([Source(REGISTRY)])
    plain = rewriter.key_for(postpath("/left-pad"))
    assert plain == CacheKey(("left-pad",), directory=True, remote="left-pad")
    assert Source(REGISTRY + "sub/").url_for(plain) == REGISTRY + "sub/left-pad"
    tarball = rewriter.key_for(postpath("/@acme/left-pad/-/left-pad-1.0.0.tgz"))
    assert tarball == CacheKey(("@acme", "left-pad", "-", "left-pad-1.0.0.tgz"))
    assert not rewriter.applies(tarball)
    for path in ("/left-pad/1.0.0", "/@acme/left-pad/latest"):
        version = rewriter.key_for(postpath(path))
        assert not version.directory and rewriter.applies(version)
        assert rewriter.representation(version, NPM_ACCEPT) == version
    for odd in ("/@acme", "/-/ping", "/-/v1/search", "/@acme/-/x", "/left-pad/-"):
        assert not rewriter.applies(rewriter.key_for(postpath(odd)))


@pytest.mark.parametrize("path", ["/@acme%2fa%2fb", "/%2e%2e%2f%2e%2e", "/@acme%2f..", "/@acme%2f%2fx"])
def test_a_slash_is_only_ever_a_scope_separator(path):
    rewriter = PackageDocumentRewriter([Source(REGISTRY)])
    with pytest.raises(UnsafePath):
        rewriter.key_for(postpath(path))


def test_npm_gets_the_abbreviated_document():
    rewriter = PackageDocumentRewriter([Source(REGISTRY)])
    key = rewriter.key_for(postpath("/left-pad"))
    assert rewriter.representation(key, NPM_ACCEPT).representation == "abbreviated"
    for accept in (b"application/json", b"*/*", None,
                   b"application/vnd.npm.install-v1+json; q=0.5, application/json"):
        assert rewriter.representation(key, accept).representation == ""
    tarball = rewriter.key_for(postpath("/left-pad/-/left-pad-1.0.0.tgz"))
    assert rewriter.representation(tarball, NPM_ACCEPT) == tarball


def test_tarball_links_become_absolute_links_into_the_cache_and_nothing_else_changes():
    rewriter = PackageDocumentRewriter([Source(REGISTRY)], [Source(TARBALLS)])
    key = rewriter.key_for(postpath("/@acme/left-pad"))
    base = "http://cache.example:4000/npm/"
    original = document(REGISTRY)
    rewritten = rewriter.rewrite(key, original, b"application/json", base)
    parsed, before = json.loads(rewritten), json.loads(original)
    versions = parsed["versions"]
    assert versions["1.0.0"]["dist"]["tarball"] == base + "@acme/left-pad/-/left-pad-1.0.0.tgz"
    assert versions["1.1.0"]["dist"]["tarball"] == (
        base + "files/@acme/left-pad/-/left-pad-1.1.0.tgz"
    )
    # A link to a host the mirror does not know stays, as does every other URL.
    assert versions["0.1.0"] == before["versions"]["0.1.0"]
    assert parsed["repository"] == before["repository"]
    for version in ("1.0.0", "1.1.0"):
        del versions[version]["dist"]["tarball"], before["versions"][version]["dist"]["tarball"]
    assert parsed == before
    # Byte for byte outside the links: the document is not re-serialised.
    assert rewritten.startswith(original[: original.index(b'"tarball"')])
    assert rewritten.endswith(original[original.rindex(b"left-pad-1.1.0.tgz") + 19:])


@pytest_twisted.async_yield_fixture
async def serve(tmp_path):
    """``serve(registry_url, **options)``: an npm mirror named npm; its URL."""
    running = []

    def start(registry_url: str, **options) -> str:
        root = MirrorsResource(
            [Mirror("npm", (Source(registry_url),), "npm")],
            cache_dir=FilePath(str(tmp_path / "cache")),
            **options,
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
async def test_tarballs_linked_from_a_document_come_through_the_cache(origin, http, tmp_path, serve):
    original = document(origin.url, tarballs=origin.url)
    origin.add("/@acme%2fleft-pad", original, content_type=b"application/json")
    tarball = b"\x1f\x8b tarball bytes"
    origin.add("/@acme/left-pad/-/left-pad-1.0.0.tgz", tarball)
    url = serve(origin.url)
    for spelling in ("/npm/@acme%2fleft-pad", "/npm/@acme/left-pad"):
        response, served = await fetch(http, url + spelling)
        assert response.code == 200
        links = [v["dist"]["tarball"] for v in json.loads(served)["versions"].values()]
        assert links[:2] == [url + "/npm/@acme/left-pad/-/left-pad-1.0.0.tgz",
                             url + "/npm/@acme/left-pad/-/left-pad-1.1.0.tgz"]
    # One document fetched, as npm spells it, and kept as the registry sent it.
    assert [path for _, path, _ in origin.origin.requests] == ["/@acme%2fleft-pad"]
    stored = tmp_path / "cache/npm/@acme/left-pad/.pkgcache-index"
    assert stored.read_bytes() == original
    for _ in range(2):
        _, body = await fetch(http, links[0])
        assert body == tarball
        await wait_for(lambda: (tmp_path / "cache/npm/@acme/left-pad/-/left-pad-1.0.0.tgz").exists())
    assert origin.count("/@acme/left-pad/-/left-pad-1.0.0.tgz") == 1


@pytest_twisted.ensureDeferred
async def test_links_follow_the_host_the_client_used_or_the_public_url(origin, http, serve):
    origin.add("/left-pad", document(origin.url, origin.url), content_type=b"application/json")
    url = serve(origin.url)
    _, served = await fetch(http, url + "/npm/left-pad", headers={b"host": [b"cache.lan:4000"]})
    assert b'"http://cache.lan:4000/npm/@acme/left-pad/-/left-pad-1.0.0.tgz"' in served
    response, _ = await fetch(http, url + "/npm/left-pad", headers={b"host": [b"evil\"/x"]})
    assert response.code == 400
    behind = serve(origin.url, public_url="https://cache.example/")
    _, served = await fetch(http, behind + "/npm/left-pad")
    assert b'"https://cache.example/npm/@acme/left-pad/-/left-pad-1.0.0.tgz"' in served


@pytest_twisted.ensureDeferred
async def test_one_mirror_mounted_anywhere_links_below_its_mount_point(origins, http, tmp_path):
    registry, tarballs = origins(), origins()
    registry.add("/left-pad", document(registry.url, tarballs.url), content_type=b"application/json")
    registry.add("/@acme/left-pad/-/left-pad-1.0.0.tgz", b"from the registry")
    tarballs.add("/@acme/left-pad/-/left-pad-1.1.0.tgz", b"from the tarball host")
    mirror = Mirror("js", (Source(registry.url),), "npm", files=(Source(tarballs.url),))
    site = Resource()
    site.putChild(b"js", MirrorResource(mirror, FilePath(str(tmp_path / "cache"))))
    service = CacheService(site.children[b"js"])
    service.startService()
    port = reactor.listenTCP(0, Site(site), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        moved, _ = await fetch(http, url + "/js")
        assert moved.headers.getRawHeaders(b"location") == [b"/js/"]
        _, served = await fetch(http, url + "/js/left-pad")
        links = [v["dist"]["tarball"] for v in json.loads(served)["versions"].values()]
        assert links[:2] == [url + "/js/@acme/left-pad/-/left-pad-1.0.0.tgz",
                             url + "/js/files/@acme/left-pad/-/left-pad-1.1.0.tgz"]
        assert [(await fetch(http, link))[1] for link in links[:2]] == [
            b"from the registry", b"from the tarball host"]
        await wait_for(lambda: (tmp_path / "cache/files/@acme/left-pad/-/left-pad-1.1.0.tgz").exists())
    finally:
        await port.stopListening()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_head_of_a_document_gives_the_length_of_the_rewritten_one(origin, http, serve):
    origin.add("/left-pad", document(origin.url, origin.url), content_type=b"application/json")
    url = serve(origin.url)
    head, _ = await fetch(http, url + "/npm/left-pad", method="HEAD")
    _, served = await fetch(http, url + "/npm/left-pad")
    assert head.headers.getRawHeaders(b"content-length") == [str(len(served)).encode()]
    assert len(served) != len(document(origin.url, origin.url))
