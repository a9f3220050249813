"""
The real npm through an ``npm`` mirror of a local registry
(:mod:`tests.npm_registry`), with its tarballs on the registry or on a
host of their own: npm installs scoped and unscoped packages with their
dependencies and its integrity checks pass (and fail on bytes corrupted
upstream), every tarball comes from upstream once however many clean
clients ask, the full and abbreviated documents are cached apart, and a
new release becomes ``latest`` once the cached document is stale.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tests.conftest import fetch, wait_for
from tests.npm_registry import (
    ABBREVIATED, FULL, Npm, NpmMirror, NpmRegistryServer, NpmRelease, TarballHost,
    build_tarball, installed_version, lockfile_packages, old_lockfile_project,
    prefers_abbreviated, start_npm_mirror,
)

pytestmark = pytest.mark.skipif(
    shutil.which("npm") is None, reason="npm is not on PATH (.ci/run installs it)"
)

MAX_AGE = 30.0
#: What npm sends for an abbreviated document (pacote's, without ``fullMetadata``).
NPM_ABBREVIATED_ACCEPT = (
    b"application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
)


@pytest_twisted.async_yield_fixture
async def registry(request):
    """A registry; parametrized (indirectly) ``True``: its tarballs on a :class:`TarballHost`."""
    server = NpmRegistryServer(TarballHost() if getattr(request, "param", False) else None)
    yield server
    await server.stop()


both_layouts = pytest.mark.parametrize(
    "registry", [False, True], ids=["tarballs-on-registry", "tarball-host"], indirect=True
)


@pytest_twisted.async_yield_fixture
async def mirror(tmp_path, registry):
    """``mirror(clock)``: the npm mirror of ``registry`` (documents fresh for ``MAX_AGE``)."""
    started: list[NpmMirror] = []

    def start(clock: Clock) -> NpmMirror:
        started.append(start_npm_mirror(registry, tmp_path / "cache", clock, MAX_AGE))
        return started[-1]

    yield start
    for served in started:
        await served.stop()


@pytest.fixture
def clean_npm(tmp_path):
    """``clean_npm()``: another npm client, with a cache of its own (it knows nothing)."""
    made: list[Npm] = []

    def make() -> Npm:
        made.append(Npm(tmp_path / f"npm-{len(made) + 1}"))
        return made[-1]

    return make


def publish_pair(registry: NpmRegistryServer) -> tuple[NpmRelease, NpmRelease]:
    """``left-pad`` 1.0.0, and ``@acme/greeter`` 1.0.0 that depends on it."""
    return (
        registry.add_release("left-pad", "1.0.0"),
        registry.add_release("@acme/greeter", "1.0.0", {"left-pad": "^1.0.0"}),
    )


def is_tarball(path: str) -> bool:
    return "/-/" in path


def tarball_links(document: bytes) -> dict[str, str]:
    """Each version's ``dist.tarball``."""
    return {v: entry["dist"]["tarball"] for v, entry in json.loads(document)["versions"].items()}


async def all_cached(served: NpmMirror, *releases: NpmRelease) -> None:
    await wait_for(lambda: all(served.cached_tarball(r).exists() for r in releases))


@both_layouts
@pytest_twisted.ensureDeferred
async def test_the_registry_serves_documents_and_tarballs_as_npms_does(registry, http):
    """The fixture keeps its promises: what the tests below rely on."""
    pad, greeter = publish_pair(registry)
    assert build_tarball("left-pad", "1.0.0", {}) == pad.data, "reproducible"
    with tarfile.open(fileobj=io.BytesIO(greeter.data)) as archive:
        assert archive.getnames() == ["package/package.json", "package/index.js"]
        manifest = json.load(archive.extractfile("package/package.json"))
    assert manifest["dependencies"] == {"left-pad": "^1.0.0"}
    digest = hashlib.sha512(greeter.data).digest()
    assert greeter.integrity == "sha512-" + base64.b64encode(digest).decode()
    assert greeter.shasum == hashlib.sha1(greeter.data).hexdigest()
    tarball_base = (registry.tarball_host or registry).url
    link = tarball_base + "@acme/greeter/-/greeter-1.0.0.tgz"

    etags = set()
    for path in ("@acme%2fgreeter", "@acme%2Fgreeter", "@acme/greeter"):
        for accept, form in ((NPM_ABBREVIATED_ACCEPT, ABBREVIATED), (b"application/json", FULL)):
            response, body = await fetch(http, registry.url + path, headers={b"accept": [accept]})
            assert response.headers.getRawHeaders(b"content-type") == [form]
            assert response.headers.getRawHeaders(b"vary") == [b"Accept"]
            document = json.loads(body)
            assert tarball_links(body) == {"1.0.0": link}
            if form == ABBREVIATED:
                assert sorted(document) == ["dist-tags", "modified", "name", "versions"]
                assert sorted(document["versions"]["1.0.0"]) == [
                    "dependencies", "dist", "name", "version"]
            else:
                assert "1.0.0" in document["time"]
                assert document["versions"]["1.0.0"]["_id"] == "@acme/greeter@1.0.0"
            [etag] = response.headers.getRawHeaders(b"etag")
            etags.add(etag)
            again, _ = await fetch(http, registry.url + path, headers={
                b"accept": [accept], b"if-none-match": [etag]})
            assert again.code == 304
    assert len(etags) == 2, "one ETag per form"
    _, tarball = await fetch(http, link)
    assert tarball == greeter.data
    assert registry.downloads() == {greeter.tarball_path: 1}
    if registry.tarball_host is not None:
        response, _ = await fetch(http, registry.url + greeter.tarball_path.lstrip("/"))
        assert response.code == 404, "only the tarball host has them"


@both_layouts
@pytest_twisted.ensureDeferred
async def test_npm_installs_a_scoped_package_and_its_dependency_through_the_cache(
    registry, mirror, clean_npm, http
):
    pad, greeter = publish_pair(registry)
    served = mirror(Clock())
    project = await clean_npm().install(served.registry_url, "@acme/greeter")
    assert installed_version(project, "@acme/greeter") == "1.0.0"
    assert installed_version(project, "left-pad") == "1.0.0"
    # npm checked each tarball against the document's integrity, and
    # locked it at its link into the cache.
    assert lockfile_packages(project) == {
        "node_modules/@acme/greeter": {
            "version": "1.0.0", "resolved": served.tarball_url(greeter),
            "integrity": greeter.integrity, "dependencies": {"left-pad": "^1.0.0"},
        },
        "node_modules/left-pad": {
            "version": "1.0.0", "resolved": served.tarball_url(pad), "integrity": pad.integrity,
        },
    }

    # npm asked the cache for everything, a scoped document as "@scope%2fname"...
    assert sorted((r.method, r.path, r.status) for r in served.requests) == sorted([
        (b"GET", "/npm/@acme%2fgreeter", 200),
        (b"GET", "/npm/left-pad", 200),
        (b"GET", urlsplit(served.tarball_url(greeter)).path, 200),
        (b"GET", urlsplit(served.tarball_url(pad)).path, 200),
    ])
    # ... and only pkgcache asked upstream, once for each.
    assert {r.header(b"user-agent").split(b"/")[0] for r in registry.requests} == {b"pkgcache"}
    assert sorted((r.path, r.status) for r in registry.document_requests()) == [
        ("/@acme%2fgreeter", 200), ("/left-pad", 200),
    ]
    assert registry.downloads() == {greeter.tarball_path: 1, pad.tarball_path: 1}
    await all_cached(served, pad, greeter)
    assert served.cached_tarball(greeter).read_bytes() == greeter.data
    assert served.cached_tarball(pad).read_bytes() == pad.data

    # The documents npm got (asked again as npm asked): links into the cache only.
    for asked in [r for r in served.requests if not is_tarball(r.path)]:
        _, document = await fetch(
            http, served.url + asked.path, headers={b"accept": [asked.header(b"accept")]}
        )
        release = greeter if json.loads(document)["name"] == greeter.name else pad
        assert tarball_links(document) == {"1.0.0": served.tarball_url(release)}


@both_layouts
@pytest_twisted.ensureDeferred
async def test_two_clean_npm_clients_cost_upstream_one_download_per_tarball(
    registry, mirror, clean_npm
):
    pad, greeter = publish_pair(registry)
    served = mirror(Clock())
    await clean_npm().install(served.registry_url, "@acme/greeter")
    await all_cached(served, pad, greeter)
    upstream_seen, mirror_seen = len(registry.requests), len(served.requests)

    project = await clean_npm().install(served.registry_url, "@acme/greeter")
    assert installed_version(project, "@acme/greeter") == "1.0.0"
    assert installed_version(project, "left-pad") == "1.0.0"
    assert sorted((r.path, r.status) for r in served.requests[mirror_seen:]) == sorted([
        ("/npm/@acme%2fgreeter", 200), ("/npm/left-pad", 200),
        (urlsplit(served.tarball_url(greeter)).path, 200),
        (urlsplit(served.tarball_url(pad)).path, 200),
    ]), "the clean client asked for everything again"
    assert len(registry.requests) == upstream_seen, "fresh documents and tarballs, from the cache"
    assert registry.downloads() == {greeter.tarball_path: 1, pad.tarball_path: 1}


@pytest_twisted.ensureDeferred
async def test_npm_refuses_a_tarball_corrupted_upstream(registry, mirror, clean_npm):
    """The cache passes on the bytes it got: npm's integrity check still catches them."""
    pad = registry.add_release("left-pad", "1.0.0")
    registry.tamper(pad, build_tarball("left-pad", "1.0.0", {"something-else": "1.0.0"}))
    served = mirror(Clock())
    result, project = await clean_npm().try_install(served.registry_url, "left-pad")
    assert result.code not in (0, None), result.describe()
    assert "EINTEGRITY" in result.err and f"wanted {pad.integrity}" in result.err, result.describe()
    assert not (project / "node_modules" / "left-pad").exists()
    # However often npm tried again, upstream sent the tarball once.
    assert registry.downloads() == {pad.tarball_path: 1}


@pytest_twisted.ensureDeferred
async def test_full_and_abbreviated_documents_are_cached_apart(registry, mirror, clean_npm, http):
    pad, greeter = publish_pair(registry)
    served = mirror(Clock())
    await clean_npm().install(served.registry_url, "@acme/greeter")
    # npm 11 resolves from the full documents (Accept: application/json);
    # older ones from the abbreviated: the cache keeps what was asked for.
    [accept] = {r.header(b"accept") for r in served.requests if not is_tarball(r.path)}
    assert served.cached_document("left-pad", prefers_abbreviated(accept)).exists(), accept
    seen = len(served.requests)

    # A project npm 6 locked: npm fills in its lockfile from the abbreviated documents.
    project = await clean_npm().install(
        served.registry_url, files=old_lockfile_project(served, greeter, pad)
    )
    assert installed_version(project, "@acme/greeter") == "1.0.0"
    assert {r.header(b"accept") for r in served.requests[seen:] if not is_tarball(r.path)} == {
        NPM_ABBREVIATED_ACCEPT
    }

    for release, path in ((pad, "/npm/left-pad"), (greeter, "/npm/@acme%2fgreeter")):
        for accept, form in ((NPM_ABBREVIATED_ACCEPT, ABBREVIATED), (b"application/json", FULL)):
            response, document = await fetch(http, served.url + path, headers={b"accept": [accept]})
            assert response.headers.getRawHeaders(b"content-type") == [form]
            assert response.headers.getRawHeaders(b"vary") == [b"Accept"]
            assert tarball_links(document) == {"1.0.0": served.tarball_url(release)}
            assert ("time" in json.loads(document)) == (form == FULL)
        # On disk, each form as the registry sent it.
        directory = served.cache / "npm" / release.name
        assert sorted(p.name for p in directory.iterdir()) == [
            "-", ".pkgcache-index", ".pkgcache-index.abbreviated",
        ]
        for abbreviated in (False, True):
            stored = served.cached_document(release.name, abbreviated).read_bytes()
            assert stored == registry.document(release.name, abbreviated)
    # Each form of each document fetched once.
    assert sorted((r.path, r.content_type) for r in registry.document_requests()) == [
        ("/@acme%2fgreeter", FULL), ("/@acme%2fgreeter", ABBREVIATED),
        ("/left-pad", FULL), ("/left-pad", ABBREVIATED),
    ]


@pytest_twisted.ensureDeferred
async def test_a_new_release_becomes_latest_through_the_mirror_after_max_age(
    registry, mirror, clean_npm
):
    first = registry.add_release("left-pad", "1.0.0")
    clock = Clock()
    served = mirror(clock)
    project = await clean_npm().install(served.registry_url, "left-pad")
    assert installed_version(project, "left-pad") == "1.0.0"

    second = registry.add_release("left-pad", "1.1.0")
    # npm sends no Cache-Control: within max-age the cached document is the answer.
    project = await clean_npm().install(served.registry_url, "left-pad")
    assert installed_version(project, "left-pad") == "1.0.0"
    assert len(registry.document_requests()) == 1

    clock.advance(MAX_AGE + 1)
    project = await clean_npm().install(served.registry_url, "left-pad")
    assert installed_version(project, "left-pad") == "1.1.0"
    locked = lockfile_packages(project)["node_modules/left-pad"]
    assert locked["resolved"] == served.tarball_url(second)
    [_, revalidation] = registry.document_requests()
    assert revalidation.conditional and revalidation.status == 200, revalidation
    assert registry.downloads() == {first.tarball_path: 1, second.tarball_path: 1}
    assert [r for r in served.requests if r.header(b"cache-control") is not None] == []


@pytest_twisted.ensureDeferred
async def test_npm_prefer_online_is_answered_by_the_cache(registry, mirror, clean_npm):
    """
    ``--prefer-online`` makes npm revalidate everything it cached (with
    validators, but no ``Cache-Control``): pkgcache answers each 304 from
    its fresh copies, and asks upstream nothing.
    """
    pad, greeter = publish_pair(registry)
    served = mirror(Clock())
    npm = clean_npm()
    await npm.install(served.registry_url, "@acme/greeter")
    await all_cached(served, pad, greeter)
    upstream_seen, mirror_seen = len(registry.requests), len(served.requests)

    project = await npm.install(served.registry_url, "--prefer-online", "@acme/greeter")
    assert installed_version(project, "left-pad") == "1.0.0"
    asked = served.requests[mirror_seen:]
    assert sorted((r.path, r.status) for r in asked) == sorted([
        ("/npm/@acme%2fgreeter", 304), ("/npm/left-pad", 304),
        (urlsplit(served.tarball_url(greeter)).path, 304),
        (urlsplit(served.tarball_url(pad)).path, 304),
    ])
    for request in asked:
        assert request.conditional and request.header(b"cache-control") is None, request
    assert len(registry.requests) == upstream_seen
