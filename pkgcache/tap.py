"""
``twist pkgcache``: command-line options and the service they describe.
"""

from __future__ import annotations

import os
import re

from twisted.internet import endpoints
from twisted.python import usage
from twisted.python.filepath import FilePath
from pkgcache.accesslog import AccessLog
from pkgcache.freshness import DEFAULT_MAX_AGE, DEFAULT_NEGATIVE_MAX_AGE, DEFAULT_STALE_IF_ERROR
from pkgcache.mirrors import ConfigError, load_config
from pkgcache.sizes import parse_size
from pkgcache.resource import PackageCacheResource
from pkgcache.root import MirrorsResource
from pkgcache.service import PackageCacheService
from pkgcache.store import CacheStore
from pkgcache.upstream import Source

DEFAULT_LISTEN = "tcp:4000"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/pkgcache``, i.e. ``~/.cache/pkgcache`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "pkgcache")


def _positive_seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise usage.UsageError(f"--{option}: a positive number of seconds, not {text!r}")
    return value


def _age(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise usage.UsageError(f"--{option}: a number of seconds, 0 or more, not {text!r}")
    return value


def _positive_size(option: str, text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as error:
        raise usage.UsageError(f"--{option}: {error}") from None
    if not size:
        raise usage.UsageError(f"--{option}: must be more than 0")
    return size


def _positive_count(option: str, text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise usage.UsageError(f"--{option}: a whole number of at least 1, not {text!r}")
    return count


class Options(usage.Options):
    """
    Options for ``twist pkgcache``.
    """

    synopsis = "--source URL [--source URL ...] [options]"
    longdesc = (
        "A caching reverse proxy for package downloads. A request for /PATH "
        "is answered from CACHE-DIR/PATH, or fetched from SOURCE/PATH of the "
        "first source that has it (in the order given), streamed to the "
        "client and stored."
    )

    optParameters = [
        ["config", None, None,
         "A TOML file of options (keys named as the options, e.g. cache-dir = "
         "\"/var/cache/pkgcache\", listen = [\"tcp:4000\"]) and of mirrors served "
         "under /NAME/ ([mirrors.NAME] with sources and kind); the command line "
         "wins over it."],
        ["cache-dir", None, None,
         "Directory the cache is kept in; created if missing. "
         "[default: $XDG_CACHE_HOME/pkgcache]"],
        ["metrics-listen", None, None,
         "Endpoint to serve Prometheus metrics on, at /metrics (e.g. "
         "tcp:9400:interface=127.0.0.1). [default: no metrics endpoint]"],
        ["max-cache-size", None, None,
         "Keep the cache under this size (e.g. 50G, 500M; K, M, G, T are "
         "powers of 1024): past it, the least recently used files are "
         "removed until it is 90% full. [default: no limit]"],
        ["max-file-size", None, None,
         "Refuse (502) and never cache files larger than this (e.g. 10G; "
         "K, M, G, T are powers of 1024), by their Content-Length or as a "
         "body without one passes it. [default: no limit]"],
        ["max-downloads", None, None,
         "Fetch at most this many files from the sources at once; further "
         "misses wait, in the order they came. [default: no limit]"],
        ["access-log", None, None,
         "File to append an access log to, in the combined log format with "
         "the cache outcome appended; - for standard output."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["sources"] = []
        self["listen"] = []
        self["connect-timeout"] = 10.0
        self["idle-timeout"] = 30.0
        self["volatile"] = []
        self["volatile-max-age"] = DEFAULT_MAX_AGE
        self["negative-max-age"] = DEFAULT_NEGATIVE_MAX_AGE
        self["stale-if-error"] = DEFAULT_STALE_IF_ERROR
        self["mirrors"] = []
        #: The options given on the command line (they win over --config).
        self.given: set[str] = set()
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = self._noting(handler)

    def _noting(self, handler):
        call = handler.dispatch if isinstance(handler, usage.CoerceParameter) else handler

        def dispatch(name: str, value: str) -> None:
            self.given.add(name.replace("_", "-"))
            call(name, value)

        return dispatch

    def opt_source(self, url: str) -> None:
        """Base URL to fetch files from (http or https); repeat for failover, in order of preference. At least one is required."""  # noqa: E501
        try:
            self["sources"].append(Source(url))
        except ValueError as error:
            raise usage.UsageError(f"--source: {error}") from None

    def opt_connect_timeout(self, seconds: str) -> None:
        """Seconds to wait for a source to accept a connection. [default: 10]"""
        self["connect-timeout"] = _positive_seconds("connect-timeout", seconds)

    def opt_idle_timeout(self, seconds: str) -> None:
        """Seconds a source may stay silent (before its headers or within a body) before it is given up and the next one tried. [default: 30]"""  # noqa: E501
        self["idle-timeout"] = _positive_seconds("idle-timeout", seconds)

    def opt_volatile(self, pattern: str) -> None:
        """A regular expression (searched in the request path, e.g. /dists/x/InRelease) of more files that change in place, served while fresh and then revalidated with their source; repeatable. Debian, Ubuntu, Gentoo, PyPI, RPM, Alpine and conda indexes are volatile already."""  # noqa: E501
        try:
            re.compile(pattern)
        except re.error as error:
            raise usage.UsageError(f"--volatile {pattern!r}: not a regular expression: {error}") from None
        self["volatile"].append(pattern)

    def opt_volatile_max_age(self, seconds: str) -> None:
        """Seconds a volatile file is served from the cache after it was last checked with its source. [default: 30]"""  # noqa: E501
        self["volatile-max-age"] = _age("volatile-max-age", seconds)

    def opt_negative_max_age(self, seconds: str) -> None:
        """Seconds a 404 from every source is remembered and answered without asking them again; 0 to never remember. [default: 60]"""  # noqa: E501
        self["negative-max-age"] = _age("negative-max-age", seconds)

    def opt_stale_if_error(self, seconds: str) -> None:
        """Seconds past its freshness a volatile file is still served when no source can revalidate it (all down, timing out or failing); 0 to disable. [default: 604800, 7 days]"""  # noqa: E501
        self["stale-if-error"] = _age("stale-if-error", seconds)

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, a Twisted endpoint string: tcp:4000, tcp:4000:interface=127.0.0.1, unix:/run/pkgcache.sock, ssl:4443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET6:name=pkgcache; repeatable. [default: tcp:4000]"""  # noqa: E501
        self["listen"].append(description)

    def _apply_config(self, path: str) -> None:
        try:
            config = load_config(path)
        except ConfigError as error:
            raise usage.UsageError(f"--config {error}") from None
        parameters = {parameter[0] for parameter in self.optParameters}
        for key, value in config.options.items():
            if key in self.given:
                continue
            handler = getattr(self, "opt_" + key.replace("-", "_"), None)
            if key in _LIST_OPTIONS:
                if not isinstance(value, list):
                    raise usage.UsageError(f"--config {path}: {key!r} must be a list")
                for item in value:
                    handler(str(item))
            elif handler is not None and key != "help":
                handler(str(value))
            elif key in parameters and key != "config":
                self[key] = str(value)
            else:
                raise usage.UsageError(f"--config {path}: unknown key {key!r}")
        self["mirrors"] = config.mirrors

    def postOptions(self) -> None:
        if self["config"] is not None:
            self._apply_config(self["config"])
        if self["mirrors"] and self["sources"]:
            raise usage.UsageError(
                "--source serves one tree at /, [mirrors] serve trees under /NAME/: "
                "use one or the other"
            )
        if not self["sources"] and not self["mirrors"]:
            raise usage.UsageError(
                "at least one --source URL is required (or [mirrors.NAME] in --config)"
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            _check_endpoint("--listen", description)
        if self["metrics-listen"] is not None:
            _check_endpoint("--metrics-listen", self["metrics-listen"])
        for option in ("max-cache-size", "max-file-size"):
            if self[option] is not None:
                self[option] = _positive_size(option, self[option])
        if self["max-downloads"] is not None:
            self["max-downloads"] = _positive_count("max-downloads", self["max-downloads"])
        if self["access-log"] not in (None, "-"):
            try:
                open(self["access-log"], "ab").close()
            except OSError as error:
                raise usage.UsageError(
                    f"--access-log: cannot write {self['access-log']}: "
                    f"{error.strerror or error}"
                ) from None
        if self["cache-dir"] is None:
            self["cache-dir"] = default_cache_dir()
        cache_dir = FilePath(os.path.abspath(self["cache-dir"]))
        try:
            CacheStore(cache_dir, reactor=None).create()
        except OSError as error:
            raise usage.UsageError(
                f"cannot use {cache_dir.path} as the cache directory: "
                f"{error.strerror or error}"
            ) from None
        self["cache-dir"] = cache_dir


#: Options given once per value; a list in --config.
_LIST_OPTIONS = ("source", "listen", "volatile")


def _check_endpoint(option: str, description: str) -> None:
    """
    Parse an endpoint string now, so that a typo is a usage error rather than
    a traceback at start-up.
    """
    from twisted.internet import reactor

    try:
        endpoints.serverFromString(reactor, description)
    except KeyError as error:
        # The systemd endpoint's way of saying it was given no such socket.
        raise usage.UsageError(
            f"{option} {description!r}: systemd passed no socket named {error.args[0]!r}"
        ) from None
    except Exception as error:
        raise usage.UsageError(f"{option} {description!r}: {error}") from None


def makeService(config: Options, reactor=None) -> PackageCacheService:
    if reactor is None:
        from twisted.internet import reactor
    access_log = None
    if config["access-log"] is not None:
        access_log = AccessLog.open(config["access-log"], reactor)
    options = dict(
        reactor=reactor,
        connect_timeout=config["connect-timeout"],
        idle_timeout=config["idle-timeout"],
        access_log=access_log,
        max_file_size=config["max-file-size"],
        max_downloads=config["max-downloads"],
        volatile=config["volatile"],
        volatile_max_age=config["volatile-max-age"],
        negative_max_age=config["negative-max-age"],
        stale_if_error=config["stale-if-error"],
    )
    if config["mirrors"]:
        resource = MirrorsResource(config["mirrors"], config["cache-dir"], **options)
    else:
        resource = PackageCacheResource(config["sources"], config["cache-dir"], **options)
    return PackageCacheService(
        resource,
        config["listen"],
        reactor,
        metrics_listen=config["metrics-listen"],
        max_cache_size=config["max-cache-size"],
    )
