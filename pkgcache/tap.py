"""
``twist pkgcache``: command-line options and the service they describe.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet import endpoints
from twisted.python import usage
from twisted.python.filepath import FilePath
from pkgcache.accesslog import AccessLog
from pkgcache.forwarded import TrustedProxies, parse_networks
from pkgcache.freshness import DEFAULT_MAX_AGE, DEFAULT_NEGATIVE_MAX_AGE, DEFAULT_STALE_IF_ERROR
from pkgcache.mirrors import KINDS, ConfigError, Mirror, load_config, mirror_from_table
from pkgcache.sizes import parse_size
from pkgcache.resource import PackageCacheResource
from pkgcache.root import MirrorsResource
from pkgcache.service import PackageCacheService
from pkgcache.store import CacheStore
from pkgcache.sources import Peer, Source
from pkgcache.via import is_node_name
from pkgcache.workers import SHAREABLE_ENDPOINTS, Supervisor, worker_count

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

    synopsis = (
        "(--source URL ... | --mirror NAME[:KIND]=URL[,URL...] ... | --config FILE) [options]"
    )
    longdesc = (
        "A caching reverse proxy for package downloads. A request for /PATH "
        "is answered from CACHE-DIR/PATH, or fetched from SOURCE/PATH of the "
        "first source that has it (in the order given), streamed to the "
        "client and stored. With --mirror (or [mirrors.NAME] in --config), "
        "several such trees share the port, each under /NAME/ and kept in "
        "CACHE-DIR/NAME/."
    )

    optFlags = [
        ["log-requests", None,
         "Also log a line per request through twisted.logger (method, path, "
         "outcome, status, bytes, duration, source); the access log is the "
         "cheap record of every request. [default: only failures and "
         "events are logged]"],
    ]

    optParameters = [
        ["config", None, None,
         "A TOML file of options (keys named as the options, e.g. cache-dir = "
         "\"/var/cache/pkgcache\", listen = [\"tcp:4000\"]) and of mirrors served "
         "under /NAME/ ([mirrors.NAME] with sources and kind; --mirror adds "
         "more); the command line wins over it."],
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
        ["node-name", None, None,
         "This node's name in the Via header of the requests it sends and the "
         "answers it serves (a token); a request whose Via already names it "
         "is refused with 508, so caches that are each other's sources fail "
         "at once instead of looping. [default: the host name]"],
        ["public-url", None, None,
         "The absolute http(s) URL clients reach pkgcache by, behind a load "
         "balancer or reverse proxy (e.g. https://cache.example/), for the "
         "links that must be absolute (npm tarballs, the list of mirrors at /). "
         "[default: the Host of each request]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["sources"] = []
        self["peers"] = []
        self["peer-timeout"] = 2.0
        self["listen"] = []
        self["trusted-proxy"] = []
        self["connect-timeout"] = 10.0
        self["idle-timeout"] = 30.0
        self["volatile"] = []
        self["volatile-max-age"] = DEFAULT_MAX_AGE
        self["negative-max-age"] = DEFAULT_NEGATIVE_MAX_AGE
        self["stale-if-error"] = DEFAULT_STALE_IF_ERROR
        self["min-revalidation-interval"] = 0.0
        self["mirrors"] = []
        self["workers"] = 1
        #: --mirror's tables by name and --mirror-files' URLs, made mirrors
        #: once every option is in (either may come first).
        self._mirror_tables: dict[str, dict[str, Any]] = {}
        self._mirror_files: dict[str, list[str]] = {}
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

    def opt_peer(self, url: str) -> None:
        """Root URL of a sibling pkgcache node with the same mirrors (behind the same load balancer): a miss of a file that does not change is asked of the peers first, with Cache-Control: only-if-cached, and of the sources only if no peer has it, so that keys a balancer moves are copied between nodes, not fetched again; repeatable, in order of preference. Listing this node too is harmless (it answers 508 and is skipped). [default: none]"""  # noqa: E501
        try:
            self["peers"].append(Peer(url))
        except ValueError as error:
            raise usage.UsageError(f"--peer: {error}") from None

    def opt_peer_timeout(self, seconds: str) -> None:
        """Seconds a peer may take to accept a connection and send its answer's headers before the sources are asked instead (one that fails is skipped for a back-off that starts at 10s; a body that stalls once begun is given up after --idle-timeout, and the rest fetched from the sources). [default: 2]"""  # noqa: E501
        self["peer-timeout"] = _positive_seconds("peer-timeout", seconds)

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

    def opt_min_revalidation_interval(self, seconds: str) -> None:
        """Seconds a volatile file checked with its source is served from the cache even to a client that asks for a fresh copy (Cache-Control: no-cache or max-age=0, as apt and pip send on every index request): a LAN of such clients then costs a source one check per file per interval, not one per client; 0 to revalidate whenever a client asks. [default: 0]"""  # noqa: E501
        self["min-revalidation-interval"] = _age("min-revalidation-interval", seconds)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """An address or CIDR network (e.g. 10.0.0.0/8) of load balancers or proxies whose X-Forwarded-For or Forwarded header names the client in the access log; repeatable. [default: none: the peer is the client]"""  # noqa: E501
        try:
            parse_networks([cidr])
        except ValueError:
            raise usage.UsageError(
                f"--trusted-proxy {cidr!r}: not an address or a CIDR network"
            ) from None
        self["trusted-proxy"].append(cidr)

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, a Twisted endpoint string: tcp:4000, tcp:4000:interface=127.0.0.1, unix:/run/pkgcache.sock, ssl:4443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET6:name=pkgcache; repeatable. [default: tcp:4000]"""  # noqa: E501
        self["listen"].append(description)

    def opt_workers(self, count: str) -> None:
        """Processes that serve: N, or auto for one per CPU. With more than one, this process binds the --listen sockets (or takes systemd's) and supervises N worker processes serving them (one that dies is restarted; SIGTERM stops them all; SIGHUP makes them reopen --access-log); it alone culls for --max-cache-size and serves --metrics-listen, with the sums over the workers. [default: 1, this process alone]"""  # noqa: E501
        try:
            self["workers"] = worker_count(count)
        except ValueError:
            raise usage.UsageError(
                f"--workers: a whole number of at least 1, or auto, not {count!r}"
            ) from None

    def opt_mirror(self, text: str) -> None:
        name, kind, urls = _mirror_argument("mirror", text)
        if name in self._mirror_tables:
            raise usage.UsageError(f"--mirror: a mirror named {name!r} is given twice")
        self._mirror_tables[name] = {"sources": urls, **({} if kind is None else {"kind": kind})}

    opt_mirror.__doc__ = (
        "A mirror served at /NAME/ and kept in CACHE-DIR/NAME/, as a [mirrors.NAME] table of "
        "--config would be: NAME=URL[,URL...] (failover, in order) or NAME:KIND=URL[,URL...], "
        f"KIND one of {', '.join(KINDS)} [default: generic]; repeatable, added to --config's."
    )

    def opt_mirror_files(self, text: str) -> None:
        """The files host of --mirror NAME (a pypi mirror's, required; an npm mirror's, optional), its table's files: NAME=URL[,URL...] (failover, in order)."""  # noqa: E501
        name, kind, urls = _mirror_argument("mirror-files", text)
        if kind is not None:
            raise usage.UsageError(f"--mirror-files {text!r}: NAME=URL[,URL...], no KIND")
        if name in self._mirror_files:
            raise usage.UsageError(f"--mirror-files: {name!r} is given twice")
        self._mirror_files[name] = urls

    def _apply_config(self, path: str) -> None:
        try:
            config = load_config(path)
        except ConfigError as error:
            raise usage.UsageError(f"--config {error}") from None
        parameters = {parameter[0] for parameter in self.optParameters}
        flags = {flag[0] for flag in self.optFlags}
        for key, value in config.options.items():
            if key in _COMMAND_LINE_ONLY:
                raise usage.UsageError(f"--config {path}: {key!r} {_COMMAND_LINE_ONLY[key]}")
            if key in self.given:
                continue
            handler = getattr(self, "opt_" + key.replace("-", "_"), None)
            if key in flags:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"--config {path}: {key!r} must be true or false")
                self[key] = int(value)
            elif key in _LIST_OPTIONS:
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

    def _add_command_line_mirrors(self) -> None:
        """
        --mirror's mirrors after the file's, each made and checked as a
        file's table is (its --mirror-files as the table's ``files``).
        """
        for name in self._mirror_files:
            if name not in self._mirror_tables:
                raise usage.UsageError(
                    f"--mirror-files {name}: no --mirror {name} (a --config table gives 'files')"
                )
        in_file = {mirror.name for mirror in self["mirrors"]}
        added: list[Mirror] = []
        for name, table in self._mirror_tables.items():
            if name in self._mirror_files:
                table = {**table, "files": self._mirror_files[name]}
            try:
                added.append(mirror_from_table("--mirror", name, table))
            except ConfigError as error:
                raise usage.UsageError(str(error)) from None
            if name in in_file:
                raise usage.UsageError(
                    f"--mirror: a mirror named {name!r} is given twice (--config {self['config']} "
                    f"has [mirrors.{name}])"
                )
        self["mirrors"] = [*self["mirrors"], *added]

    def postOptions(self) -> None:
        if self["config"] is not None:
            self._apply_config(self["config"])
        self._add_command_line_mirrors()
        if self["mirrors"] and self["sources"]:
            raise usage.UsageError(
                "--source serves one tree at /, --mirror and [mirrors] serve trees under "
                "/NAME/: use one or the other"
            )
        if not self["sources"] and not self["mirrors"]:
            raise usage.UsageError(
                "at least one --source URL is required (or --mirror NAME=URL, or "
                "[mirrors.NAME] in --config)"
            )
        if self["public-url"] is not None:
            _check_public_url(self["public-url"])
        if self["node-name"] is not None and not is_node_name(self["node-name"]):
            raise usage.UsageError(
                f"--node-name {self['node-name']!r}: letters, digits and !#$%&'*+.^_`|~- only"
            )
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for description in self["listen"]:
            endpoint = _check_endpoint("--listen", description)
            if self["workers"] > 1 and not isinstance(endpoint, SHAREABLE_ENDPOINTS):
                raise usage.UsageError(
                    f"--listen {description!r}: --workers can share tcp, tcp6, ssl, unix and "
                    "systemd endpoints only"
                )
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
_LIST_OPTIONS = ("source", "peer", "listen", "volatile", "trusted-proxy")

#: Options that have no key in --config, and why: its tables say it all.
_COMMAND_LINE_ONLY = {
    "mirror": "is the command line's shorthand for a [mirrors.NAME] table: write the table",
    "mirror-files": "is the command line's for a mirror's 'files': give 'files' in its "
    "[mirrors.NAME] table",
}


def _mirror_argument(option: str, text: str) -> tuple[str, Optional[str], list[str]]:
    """
    ``NAME[:KIND]=URL[,URL...]`` in its parts, as a table would give them:
    judging them is left to the table's checks, so that both say the same.
    """
    label, equals, urls = text.partition("=")
    if not equals:
        raise usage.UsageError(
            f"--{option} {text!r}: "
            + ("NAME=URL[,URL...] or NAME:KIND=URL[,URL...]" if option == "mirror"
               else "NAME=URL[,URL...]")
        )
    name, colon, kind = label.partition(":")
    sources = [url.strip() for url in urls.split(",")] if urls.strip() else []
    return name, (kind if colon else None), sources


def _check_public_url(text: str) -> None:
    """
    The URL clients reach pkgcache by starts links as it is given: it must
    be one a client can follow, and leave room for a path after it.
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(char.isspace() or not char.isprintable() for char in text)
    ):
        problem = "not an absolute http:// or https:// URL"
    elif "?" in text or "#" in text:
        problem = "links are made below it, so it has no query or fragment"
    elif "@" in parts.netloc:
        problem = "links are made from it, so it has no user or password"
    else:
        return
    raise usage.UsageError(f"--public-url {text!r}: {problem}")


def _check_endpoint(option: str, description: str):
    """
    Parse an endpoint string now, so that a typo is a usage error rather than
    a traceback at start-up; the endpoint it describes.
    """
    from twisted.internet import reactor

    try:
        return endpoints.serverFromString(reactor, description)
    except KeyError as error:
        # The systemd endpoint's way of saying it was given no such socket.
        raise usage.UsageError(
            f"{option} {description!r}: systemd passed no socket named {error.args[0]!r}"
        ) from None
    except Exception as error:
        raise usage.UsageError(f"{option} {description!r}: {error}") from None


def makeService(config: Options, reactor=None):
    """
    The service of ``config``: a :class:`PackageCacheService`, or with
    ``--workers`` above 1 a :class:`~pkgcache.workers.Supervisor` of worker
    processes, each serving what :func:`make_resource` makes.
    """
    if reactor is None:
        from twisted.internet import reactor
    if config["workers"] > 1:
        return Supervisor(config, reactor)
    access_log = None
    if config["access-log"] is not None:
        access_log = AccessLog.open(config["access-log"], reactor, trusted_proxies(config))
    return PackageCacheService(
        make_resource(config, reactor, access_log),
        config["listen"],
        reactor,
        metrics_listen=config["metrics-listen"],
        max_cache_size=config["max-cache-size"],
        access_log=access_log,
    )


def trusted_proxies(config) -> TrustedProxies:
    """The peers that may name the client, from ``--trusted-proxy``."""
    return TrustedProxies(parse_networks(config["trusted-proxy"]))


def make_resource(config, reactor, access_log: Optional[AccessLog]):
    """The resource ``config`` (:class:`Options`, or a dict of them) describes."""
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
        min_revalidation_interval=config["min-revalidation-interval"],
        public_url=config["public-url"],
        log_requests=bool(config["log-requests"]),
        node_name=config["node-name"],
        peers=config["peers"],
        peer_timeout=config["peer-timeout"],
    )
    if config["mirrors"]:
        return MirrorsResource(config["mirrors"], config["cache-dir"], **options)
    return PackageCacheResource(config["sources"], config["cache-dir"], **options)
