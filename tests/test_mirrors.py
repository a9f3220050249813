"""
Several mirrors on one port: the TOML configuration, its errors, and
``/NAME/`` routing to each mirror's sources and directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from pkgcache.paths import cache_key_from_postpath
from pkgcache.root import MirrorsResource
from pkgcache.service import CacheService
from pkgcache.via import default_node_name
from pkgcache.tap import Options, makeService
from tests.conftest import fetch, wait_for
from tests.origin import OriginServer

CONFIG = """
cache-dir = "{cache}"
listen = ["tcp:0:interface=127.0.0.1"]
idle-timeout = 5
volatile-max-age = 40

[mirrors.debian]
kind = "debian"
sources = ["{a}", "{b}"]
volatile-max-age = 10

[mirrors.gentoo]
kind = "gentoo"
sources = ["{b}"]
volatile = ["/metadata/timestamp"]
"""


def key(path: str):
    return cache_key_from_postpath([part.encode() for part in path.lstrip("/").split("/")])


def write_config(tmp_path, text: str, **values) -> str:
    path = tmp_path / "pkgcache.toml"
    path.write_text(text.format(**values))
    return str(path)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_a_config_file_defines_mirrors_and_options(tmp_path):
    config = write_config(
        tmp_path, CONFIG, cache=tmp_path / "cache", a="http://a.example/", b="http://b.example/"
    )
    options = parse("--config", config, "--idle-timeout", "7")
    assert options["idle-timeout"] == 7.0, "the command line wins"
    assert options["volatile-max-age"] == 40.0
    assert options["listen"] == ["tcp:0:interface=127.0.0.1"]
    assert options["cache-dir"] == FilePath(str(tmp_path / "cache"))
    assert [mirror.name for mirror in options["mirrors"]] == ["debian", "gentoo"]
    root = makeService(options).resource
    assert isinstance(root, MirrorsResource)
    debian, gentoo = root.mirrors["debian"].tree, root.mirrors["gentoo"].tree
    assert [str(s) for s in debian.upstream.sources] == ["http://a.example/", "http://b.example/"]
    assert (debian.freshness.max_age, gentoo.freshness.max_age) == (10.0, 40.0)
    assert debian.freshness.is_volatile(key("/dists/stable/InRelease"))
    assert not gentoo.freshness.is_volatile(key("/dists/stable/InRelease"))
    assert gentoo.freshness.is_volatile(key("/distfiles/layout.conf"))
    assert gentoo.freshness.is_volatile(key("/metadata/timestamp"))
    assert debian.store.path_for(key("/pool/x.deb")).path == str(tmp_path / "cache/debian/pool/x.deb")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[mirrors.x]\nsources = [\"http://a/\"]\nkind = \"cobol\"\n", "unknown kind 'cobol'"),
        ("[mirrors.\".hidden\"]\nsources = [\"http://a/\"]\n", "one path segment"),
        ("[mirrors.x]\nsources = [\"http://a/\"]\n[mirrors.x]\nsources = []\n", "line 3"),
        ("cache-dir = \"/tmp\nx\n", "line 1"),
        ("[mirrors.x]\nsources = [\"http://a/\"]\nkind = \"pypi\"\n", "needs 'files'"),
        ("[mirrors.x]\nsources = [\"http://a/\"]\nfiles = [\"http://b/\"]\n", "kinds pypi and npm only"),
        ("[mirrors.x]\nsources = [\"http://a/\"]\nsource = 1\n", "unknown key 'source'"),
        ("[mirrors.x]\nsources = []\n", "at least one URL"),
        ("[mirrors.x]\nsources = [\"ftp://a/\"]\n", "not an http"),
        ("[mirrors.x]\nsources = [\"http://a/\"]\nvolatile = [\"(\"]\n", "not a regular"),
        ("no-such-option = 1\n[mirrors.x]\nsources = [\"http://a/\"]\n", "unknown key 'no-such"),
        ("source = [\"http://a/\"]\n[mirrors.x]\nsources = [\"http://a/\"]\n", "one or the other"),
        ("idle-timeout = -1\n[mirrors.x]\nsources = [\"http://a/\"]\n", "--idle-timeout"),
    ],
)
def test_bad_configurations_are_one_line_errors(tmp_path, text, message):
    config = write_config(tmp_path, text.replace("{", "{{").replace("}", "}}"))
    with pytest.raises(usage.UsageError) as raised:
        parse("--config", config, "--cache-dir", str(tmp_path / "cache"))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(usage.UsageError, match="No such file"):
        parse("--config", str(tmp_path / "nothing.toml"))


def test_plain_sources_in_a_config_file_serve_one_tree(tmp_path):
    config = write_config(tmp_path, 'source = ["http://a.example/", "http://b.example/"]\n')
    options = parse("--config", config, "--cache-dir", str(tmp_path / "cache"))
    resource = makeService(options).resource
    assert [str(s) for s in resource.upstream.sources] == ["http://a.example/", "http://b.example/"]


@dataclass
class Served:
    url: str
    a: OriginServer
    b: OriginServer
    cache: Path
    root: MirrorsResource


@pytest_twisted.async_yield_fixture
async def site(tmp_path, origins):
    a, b = origins(), origins()
    config = write_config(tmp_path, CONFIG, cache=tmp_path / "cache", a=a.url, b=b.url)
    options = parse("--config", config)
    root = makeService(options).resource
    service = CacheService(root)
    service.startService()
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield Served(f"http://127.0.0.1:{port.getHost().port}", a, b, tmp_path / "cache", root)
    await port.stopListening()
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_each_mirror_is_served_from_its_sources_into_its_directory(site, http):
    url, a, b, cache = site.url, site.a, site.b, site.cache
    a.add("/pool/main/f/foo.deb", b"deb from a")
    b.add("/distfiles/foo.tar.gz", b"distfile from b")
    _, deb = await fetch(http, url + "/debian/pool/main/f/foo.deb")
    _, distfile = await fetch(http, url + "/gentoo/distfiles/foo.tar.gz")
    assert (deb, distfile) == (b"deb from a", b"distfile from b")
    await wait_for(lambda: (cache / "gentoo/distfiles/foo.tar.gz").exists())
    await wait_for(lambda: (cache / "debian/pool/main/f/foo.deb").exists())
    assert (cache / "debian/pool/main/f/foo.deb").read_bytes() == b"deb from a"
    response, again = await fetch(http, url + "/debian/pool/main/f/foo.deb")
    assert again == b"deb from a"
    # (Under this node's name: by default, the host's.)
    assert response.headers.getRawHeaders(b"cache-status") == [
        default_node_name().encode() + b"; hit"
    ]
    assert a.count("/pool/main/f/foo.deb") == 1


@pytest_twisted.ensureDeferred
async def test_an_unknown_mirror_is_404_and_asks_no_source(site, http):
    url, a, b = site.url, site.a, site.b
    response, body = await fetch(http, url + "/unknown/pool/x.deb")
    assert response.code == 404 and b"no such mirror" in body
    assert a.origin.requests == [] and b.origin.requests == []


@pytest_twisted.ensureDeferred
async def test_the_root_lists_the_mirrors_with_client_lines(site, http):
    url = site.url
    response, body = await fetch(http, url + "/")
    host = url.split("//", 1)[1]
    assert response.code == 200
    assert f"deb http://{host}/debian/ SUITE main".encode() in body
    assert f'GENTOO_MIRRORS="http://{host}/gentoo/"'.encode() in body


@pytest_twisted.ensureDeferred
async def test_metrics_carry_the_mirror(site, http):
    url, a, b = site.url, site.a, site.b
    b.add("/distfiles/foo.tar.gz", b"distfile")
    await fetch(http, url + "/gentoo/distfiles/foo.tar.gz")
    await fetch(http, url + "/debian/pool/missing.deb")
    registry = site.root.metrics.registry
    assert registry.get_sample_value(
        "pkgcache_requests_total", {"mirror": "gentoo", "outcome": "miss"}
    ) == 1
    assert registry.get_sample_value(
        "pkgcache_requests_total", {"mirror": "debian", "outcome": "error"}
    ) == 1


def test_the_embedding_api_names_the_mirror_classes(tmp_path):
    import pkgcache
    from pkgcache.sources import Source

    root = pkgcache.MirrorsResource(
        [pkgcache.Mirror("debian", (Source("http://a.example/"),), "debian")],
        cache_dir=str(tmp_path / "cache"),
    )
    assert list(root.mirrors) == ["debian"]
    config = write_config(tmp_path, '[mirrors.g]\nkind = "gentoo"\nsources = ["http://b/"]\n')
    (mirror,) = pkgcache.load_config(config).mirrors
    assert (mirror.name, mirror.kind, [str(s) for s in mirror.sources]) == (
        "g", "gentoo", ["http://b/"]
    )


@pytest_twisted.ensureDeferred
async def test_a_mirror_name_without_its_slash_is_redirected(site, http):
    response, _ = await fetch(http, site.url + "/debian")
    assert response.code == 301
    assert response.headers.getRawHeaders(b"location") == [b"/debian/"]
