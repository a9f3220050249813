"""
``twist pkgcache`` options and the service they build.
"""

from __future__ import annotations

import json
import os

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage
from twisted.python.filepath import FilePath

from pkgcache.paths import cache_key_from_postpath
from pkgcache.resource import PackageCacheResource
from pkgcache.tap import DEFAULT_LISTEN, Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_sources_and_listeners_repeat_in_order(tmp_path):
    options = parse(
        "--source", "https://a.example/gentoo/",
        "--source", "http://b.example/",
        "--listen", "tcp:4001",
        "--listen", "unix:" + str(tmp_path / "sock"),
        "--cache-dir", str(tmp_path / "cache"),
        "--connect-timeout", "2.5",
        "--idle-timeout", "7",
    )
    assert [str(s) for s in options["sources"]] == ["https://a.example/gentoo/", "http://b.example/"]
    assert options["listen"] == ["tcp:4001", "unix:" + str(tmp_path / "sock")]
    assert options["cache-dir"] == FilePath(str(tmp_path / "cache"))
    assert (options["connect-timeout"], options["idle-timeout"]) == (2.5, 7.0)
    assert (tmp_path / "cache" / ".pkgcache-spool").is_dir()


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    options = parse("--source", "https://a.example/")
    assert options["listen"] == [DEFAULT_LISTEN] == ["tcp:4000"]
    assert options["cache-dir"] == FilePath(str(tmp_path / "xdg" / "pkgcache"))
    assert options["connect-timeout"] == 10.0 and options["idle-timeout"] == 30.0


def test_cache_dir_defaults_to_home_cache_without_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse("--source", "https://a.example/")
    assert options["cache-dir"].path == str(tmp_path / ".cache" / "pkgcache")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "at least one --source"),
        (["--source", "ftp://a.example/"], "not an http:// or https:// URL"),
        (["--source", "a.example/gentoo"], "not an http:// or https:// URL"),
        (["--source", "http://a/", "--listen", "tcpp:4000"], "--listen 'tcpp:4000'"),
        (["--source", "http://a/", "--idle-timeout", "0"], "idle-timeout"),
        (["--source", "http://a/", "--connect-timeout", "soon"], "connect-timeout"),
        (["--source", "http://a/", "--cache-dir", "/proc/pkgcache"], "cannot use /proc/pkgcache"),
        (["--source", "http://a/", "--metrics-listen", "tcp:x"], "--metrics-listen 'tcp:x'"),
        (["--source", "http://a/", "--access-log", "/proc/x.log"], "--access-log: cannot write"),
        (["--source", "http://a/", "--max-cache-size", "lots"], "--max-cache-size: invalid size 'lots'"),
        (["--source", "http://a/", "--max-cache-size", "0"], "--max-cache-size: must be more than 0"),
        (["--source", "http://a/", "--max-file-size", "big"], "--max-file-size: invalid size 'big'"),
        (["--source", "http://a/", "--max-file-size", "0"], "--max-file-size: must be more than 0"),
        (["--source", "http://a/", "--max-downloads", "0"], "--max-downloads: a whole number"),
        (["--source", "http://a/", "--max-downloads", "many"], "--max-downloads: a whole number"),
        (["--source", "http://a/", "--volatile", "dists/(x"], "--volatile 'dists/(x': not a regular"),
        (["--source", "http://a/", "--volatile-max-age", "-1"], "--volatile-max-age: a number"),
        (["--source", "http://a/", "--negative-max-age", "soon"], "--negative-max-age: a number"),
        (["--source", "http://a/", "--stale-if-error", "-5"], "--stale-if-error: a number"),
        (["--source", "http://a/", "--stale-if-error", "inf"], "--stale-if-error: a number"),
        (["--source", "http://a/", "--min-revalidation-interval", "-1"],
         "--min-revalidation-interval: a number"),
        (["--source", "http://a/", "--trusted-proxy", "10.0.0.0/33"],
         "--trusted-proxy '10.0.0.0/33': not an address or a CIDR network"),
        (["--source", "http://a/", "--peer", "node-2:4000"], "--peer: not an http:// or https://"),
        (["--source", "http://a/", "--peer-timeout", "0"], "peer-timeout"),
        (["--source", "http://a/", "--node-name", "two words"], "--node-name 'two words'"),
        (["--source", "http://a/", "--node-name", "a,b"], "--node-name 'a,b'"),
        (["--source", "http://a/", "--public-url", "cache.example"],
         "--public-url 'cache.example': not an absolute http:// or https:// URL"),
        (["--source", "http://a/", "--public-url", "/pkgcache/"], "not an absolute http"),
        (["--source", "http://a/", "--public-url", "ftp://cache.example/"], "not an absolute http"),
        (["--source", "http://a/", "--public-url", "https:///x"], "not an absolute http"),
        (["--source", "http://a/", "--public-url", "https://cache.example:port/"],
         "not an absolute http"),
        (["--source", "http://a/", "--public-url", "https://cache.example/\nx"],
         "not an absolute http"),
        (["--source", "http://a/", "--public-url", "https://cache.example/?a=1"],
         "no query or fragment"),
        (["--source", "http://a/", "--public-url", "https://cache.example/#top"],
         "no query or fragment"),
        (["--source", "http://a/", "--public-url", "https://u:p@cache.example/"],
         "no user or password"),
    ],
)
def test_bad_options_are_usage_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_unwritable_cache_dir_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(usage.UsageError, match="cannot use"):
        parse("--source", "http://a/", "--cache-dir", str(blocker / "cache"))


def test_make_service_listens_on_every_endpoint(tmp_path):
    options = parse(
        "--source", "http://a.example/",
        "--cache-dir", str(tmp_path / "cache"),
        "--listen", "tcp:0:interface=127.0.0.1",
        "--listen", "unix:" + str(tmp_path / "sock"),
    )
    service = makeService(options)
    listeners = list(service)
    assert len(listeners) == 2
    assert all(isinstance(listener, StreamServerEndpointService) for listener in listeners)
    assert isinstance(service.resource, PackageCacheResource)
    assert service.site.resource.resource is service.resource  # behind the health URL
    assert [str(s) for s in service.resource.upstream.sources] == ["http://a.example/"]
    assert os.path.isdir(tmp_path / "cache")


def test_max_cache_size_is_parsed_and_wired(tmp_path):
    options = parse(
        "--source", "http://a/", "--cache-dir", str(tmp_path), "--max-cache-size", "1.5G"
    )
    assert options["max-cache-size"] == 1536 * 1024 * 1024
    assert makeService(options).cache.cache_limit.max_size == 1536 * 1024 * 1024
    options = parse("--source", "http://a/", "--cache-dir", str(tmp_path))
    assert options["max-cache-size"] is None
    # No limit, no walk of the cache: nothing to keep it under.
    assert makeService(options).cache.cache_limit is None


def test_max_file_size_and_max_downloads_are_parsed_and_wired(tmp_path):
    options = parse(
        "--source", "http://a/", "--cache-dir", str(tmp_path),
        "--max-file-size", "2G", "--max-downloads", "3",
    )
    assert (options["max-file-size"], options["max-downloads"]) == (2 * 1024**3, 3)
    resource = makeService(options).resource
    assert resource.upstream.max_body_size == 2 * 1024**3
    assert resource.downloads.max_downloads == 3


def test_freshness_options_are_parsed_and_wired(tmp_path):
    options = parse(
        "--source", "http://a/", "--cache-dir", str(tmp_path),
        "--volatile", r"\.json$", "--volatile", "^/index/",
        "--volatile-max-age", "5", "--negative-max-age", "0", "--stale-if-error", "0",
        "--min-revalidation-interval", "120",
    )
    freshness = makeService(options).resource.freshness
    assert (freshness.max_age, freshness.negative_max_age, freshness.stale_if_error) == (5, 0, 0)
    assert freshness.min_revalidation_interval == 120
    options = parse(
        "--mirror", "debian:debian=http://a/", "--cache-dir", str(tmp_path),
        "--min-revalidation-interval", "120",
    )
    assert makeService(options).resource.mirrors["debian"].tree.freshness.min_revalidation_interval == 120
    assert freshness.is_volatile(key("/x/data.json")) and freshness.is_volatile(key("/index/a"))
    assert not freshness.is_volatile(key("/x/data.json.gz"))
    defaults = makeService(parse("--source", "http://a/", "--cache-dir", str(tmp_path)))
    freshness = defaults.resource.freshness
    assert (freshness.max_age, freshness.negative_max_age, freshness.stale_if_error) == (
        30, 60, 7 * 24 * 3600
    )
    assert freshness.min_revalidation_interval == 0


@pytest.mark.parametrize(
    "url",
    ["https://cache.example/", "http://cache.example:8080", "https://proxy.example/pkgcache/"],
)
def test_public_url_reaches_the_resources(tmp_path, url):
    """Links made behind a proxy start with it: every tree needs it."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert parse("--source", "http://a/", *cache)["public-url"] is None
    options = parse("--source", "http://a/", "--public-url", url, *cache)
    assert options["public-url"] == url
    assert makeService(options).resource._public_url == url
    options = parse("--mirror", "npm:npm=http://a/", "--public-url", url, *cache)
    root = makeService(options).resource
    assert root._public_url == url and root.mirrors["npm"].tree._public_url == url


#: A value for each option's key in --config, and what it makes of it.
CONFIG_VALUES = {
    "cache-dir": ("{tmp}/other", lambda o: o["cache-dir"].basename() == "other"),
    "metrics-listen": ("tcp:0:interface=127.0.0.1",
                       lambda o: o["metrics-listen"] == "tcp:0:interface=127.0.0.1"),
    "max-cache-size": ("1G", lambda o: o["max-cache-size"] == 1024**3),
    "max-file-size": ("2M", lambda o: o["max-file-size"] == 2 * 1024**2),
    "max-downloads": (3, lambda o: o["max-downloads"] == 3),
    "access-log": ("{tmp}/access.log", lambda o: o["access-log"].endswith("/access.log")),
    "public-url": ("https://cache.example/", lambda o: o["public-url"] == "https://cache.example/"),
    "source": (["http://a.example/", "http://b.example/"],
               lambda o: [str(s) for s in o["sources"]] == [
                   "http://a.example/", "http://b.example/"]),
    "connect-timeout": (2.5, lambda o: o["connect-timeout"] == 2.5),
    "idle-timeout": (7, lambda o: o["idle-timeout"] == 7.0),
    "volatile": (["\\.json$"], lambda o: o["volatile"] == ["\\.json$"]),
    "volatile-max-age": (5, lambda o: o["volatile-max-age"] == 5.0),
    "negative-max-age": (0, lambda o: o["negative-max-age"] == 0.0),
    "stale-if-error": (0, lambda o: o["stale-if-error"] == 0.0),
    "min-revalidation-interval": (60, lambda o: o["min-revalidation-interval"] == 60.0),
    "log-requests": (True, lambda o: o["log-requests"] == 1),
    "node-name": ("office-1", lambda o: o["node-name"] == "office-1"),
    "peer": (["http://node-2.example:4000/", "http://node-3.example:4000/"],
             lambda o: [str(peer) for peer in o["peers"]]
             == ["http://node-2.example:4000/", "http://node-3.example:4000/"]),
    "peer-timeout": (0.5, lambda o: o["peer-timeout"] == 0.5),
    "trusted-proxy": (["10.0.0.0/8", "192.0.2.1"],
                      lambda o: o["trusted-proxy"] == ["10.0.0.0/8", "192.0.2.1"]),
    "listen": (["tcp:0:interface=127.0.0.1"],
               lambda o: o["listen"] == ["tcp:0:interface=127.0.0.1"]),
    "workers": (3, lambda o: o["workers"] == 3),
}
#: Options with no key in --config: about the command line itself, or
#: shorthands for what a file says with [mirrors.NAME] tables.
NOT_IN_CONFIG = {"config", "help", "version", "mirror", "mirror-files"}


def test_every_option_has_its_key_in_a_config_file(tmp_path):
    """A file can say all a command line can (so adding an option means adding it here)."""
    names = {name.rstrip("=") for name in Options().longOpt}
    assert names == set(CONFIG_VALUES) | NOT_IN_CONFIG
    for name, (value, check) in CONFIG_VALUES.items():
        if isinstance(value, str):
            value = value.format(tmp=tmp_path)
        lines = [f"{name} = {json.dumps(value)}"]
        if name != "source":
            lines.append('source = ["http://a.example/"]')
        config = tmp_path / "pkgcache.toml"
        config.write_text("\n".join(lines) + "\n")
        options = parse("--config", str(config), *(
            [] if name == "cache-dir" else ["--cache-dir", str(tmp_path / "cache")]
        ))
        assert check(options), name


def test_help_tells_of_the_mirror_options():
    text = str(Options())
    for option in ("--mirror=", "--mirror-files=", "--public-url="):
        assert option in text
    assert "NAME:KIND=URL[,URL...]" in text and "https://cache.example/" in text


def key(path: str):
    return cache_key_from_postpath([part.encode() for part in path.lstrip("/").split("/")])


def test_log_requests_is_off_unless_asked_for(tmp_path):
    """The per-request twisted.logger line costs a hit a quarter of its time: opt-in."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert not makeService(parse("--source", "http://a/", *cache)).resource._log_requests
    assert makeService(parse("--source", "http://a/", "--log-requests", *cache)).resource._log_requests
    root = makeService(parse("--mirror", "npm:npm=http://a/", "--log-requests", *cache)).resource
    assert root.mirrors["npm"].tree._log_requests


def test_a_flag_in_a_config_file_must_be_a_boolean(tmp_path):
    config = tmp_path / "pkgcache.toml"
    config.write_text('log-requests = "yes"\nsource = ["http://a.example/"]\n')
    with pytest.raises(usage.UsageError, match="'log-requests' must be true or false"):
        parse("--config", str(config), "--cache-dir", str(tmp_path / "cache"))


def test_the_node_name_reaches_every_tree(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert makeService(parse("--source", "http://a/", "--node-name", "dc-1", *cache)).resource.node == b"dc-1"
    root = makeService(parse("--mirror", "npm:npm=http://a/", "--node-name", "dc-1", *cache)).resource
    assert root.mirrors["npm"].tree.node == b"dc-1"
    assert makeService(parse("--source", "http://a/", *cache)).resource.node  # the host's


def test_trusted_proxies_reach_the_access_log(tmp_path):
    options = parse(
        "--source", "http://a/", "--cache-dir", str(tmp_path / "cache"),
        "--access-log", str(tmp_path / "access.log"), "--trusted-proxy", "10.0.0.0/8",
    )
    access_log = makeService(options).resource._access_log
    assert access_log._trusted_proxies.client("10.0.0.2", [], [b"198.51.100.7"]) == "198.51.100.7"
