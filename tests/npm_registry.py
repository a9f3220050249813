"""
A local npm registry that a test can publish to while it runs, and a runner
for the real ``npm`` against it.

:class:`NpmRegistryServer` serves, on 127.0.0.1, what ``npm install``
reads from a registry:

- ``/NAME`` and ``/@SCOPE%2fNAME`` (also ``/@SCOPE/NAME``): the package's
  document.  By the request's ``Accept``, the full one
  (``application/json``: every version's manifest, ``time``) or, to a
  client that prefers it, the abbreviated one
  (``application/vnd.npm.install-v1+json``: ``name``, ``modified``,
  ``dist-tags`` and, for each version, only ``name``, ``version``,
  ``dependencies`` and ``dist``).  Each has its own ``ETag``, answered
  with a 304 on ``If-None-Match``; both carry ``Vary: Accept``.  (npm 11
  resolves an install from the full documents, and asks for the
  abbreviated ones to fill in an old lockfile: :func:`old_lockfile_project`.)
- ``/NAME/-/NAME-1.0.0.tgz`` (``/@SCOPE/NAME/-/NAME-1.0.0.tgz``): the
  tarball, which every ``dist.tarball`` names by an ABSOLUTE URL, as the
  real registry does.  Given a :class:`TarballHost`, those URLs point at
  that second server instead, and only it serves the tarballs.

Every ``dist`` carries the tarball's ``integrity`` (``sha512-`` and the
base64 digest: what npm checks) and ``shasum`` (SHA-1, hex).  The tarballs
are real (``package/package.json`` and ``package/index.js`` in a gzipped
tar), built in memory, byte-for-byte the same each time.  Every request is
recorded with its headers, the status it got and the type it was answered
(:class:`~tests.pypi_index.IndexRequest`).

:class:`Npm` runs the real ``npm`` as a subprocess on the reactor, isolated
from the machine's configuration, installing into a fresh project
directory, and killed if it outlives its timeout.

:func:`start_npm_mirror` puts a pkgcache ``npm`` mirror (a
``MirrorsResource``) in front of a registry, recording what its clients
send it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from twisted.internet import reactor
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from pkgcache.mirrors import Mirror
from pkgcache.root import MirrorsResource
from pkgcache.service import CacheService
from pkgcache.sources import Source
from tests.pypi_index import (
    IndexRequest, PipResult, RecordingSite, _Document, _quality, _RecordingResource,
    _run_process, accept_ranges,
)

FULL = b"application/json"
ABBREVIATED = b"application/vnd.npm.install-v1+json"
TARBALL = b"application/octet-stream"
#: The date of every tarball entry (npm's own, 1985-10-26T08:15:00Z), so
#: that a tarball built twice is the same bytes (and so the same integrity).
_TAR_MTIME = 499162500


def build_tarball(name: str, version: str, dependencies: dict[str, str]) -> bytes:
    """
    A tiny package as ``npm pack`` makes it: ``package/package.json`` and
    ``package/index.js`` (which exports its name and version), in a tar
    with fixed dates and owners, gzipped without a date.
    """
    manifest = {"name": name, "version": version, "main": "index.js"}
    if dependencies:
        manifest["dependencies"] = dependencies
    files = {
        "package/package.json": json.dumps(manifest, indent=2).encode() + b"\n",
        "package/index.js": b"module.exports = %s;\n" % json.dumps(
            {"name": name, "version": version}
        ).encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path, data in files.items():
            entry = tarfile.TarInfo(path)
            entry.size, entry.mtime, entry.mode = len(data), _TAR_MTIME, 0o644
            archive.addfile(entry, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


@dataclass
class NpmRelease:
    """One version of a package, as one tarball."""

    name: str
    version: str
    dependencies: dict[str, str]
    data: bytes
    #: When it was published (whole seconds since the epoch).
    published: int

    @property
    def integrity(self) -> str:
        """What npm checks the tarball's bytes against (``dist.integrity``)."""
        return "sha512-" + base64.b64encode(hashlib.sha512(self.data).digest()).decode("ascii")

    @property
    def shasum(self) -> str:
        return hashlib.sha1(self.data).hexdigest()

    @property
    def tarball_path(self) -> str:
        """``/NAME/-/NAME-1.0.0.tgz``; for a scoped name, the file is named without its scope."""
        return f"/{self.name}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    def manifest(self, tarball_base: str, full: bool) -> dict:
        """Its entry in a document's ``versions``; ``tarball_base`` ends in ``/``."""
        entry: dict = {"name": self.name, "version": self.version}
        if full:
            entry.update({"_id": f"{self.name}@{self.version}", "main": "index.js",
                          "description": f"{self.name}, for tests"})
        if self.dependencies:
            entry["dependencies"] = self.dependencies
        entry["dist"] = {
            "integrity": self.integrity,
            "shasum": self.shasum,
            "tarball": tarball_base + self.tarball_path.lstrip("/"),
        }
        return entry


@dataclass
class NpmPackage:
    """A package: its releases, the last one its ``latest``."""

    name: str
    releases: list[NpmRelease] = field(default_factory=list)
    created: int = 0
    #: When a version was last published: the documents' ``Last-Modified``.
    modified: int = 0

    def document(self, tarball_base: str, abbreviated: bool) -> _Document:
        """Its full or abbreviated document, tarballs below ``tarball_base``."""
        full = not abbreviated
        versions = {r.version: r.manifest(tarball_base, full) for r in self.releases}
        tags = {"latest": self.releases[-1].version}
        if not full:
            body = {"name": self.name, "modified": _iso(self.modified),
                    "dist-tags": tags, "versions": versions}
        else:
            times = {"created": _iso(self.created), "modified": _iso(self.modified)}
            times.update((r.version, _iso(r.published)) for r in self.releases)
            body = {"_id": self.name, "name": self.name, "dist-tags": tags,
                    "versions": versions, "time": times}
        return _Document(json.dumps(body).encode(), FULL if full else ABBREVIATED, self.modified)


def prefers_abbreviated(accept: Optional[bytes]) -> bool:
    """Whether ``Accept`` likes the abbreviated document at least as much as JSON (npm's does)."""
    if accept is None:
        return False
    ranges = accept_ranges(accept)
    quality = _quality(ABBREVIATED, ranges)
    return quality > 0 and quality >= _quality(FULL, ranges)


class TarballResource(_RecordingResource):
    """Tarballs by :attr:`NpmRelease.tarball_path` (asked for percent-encoded or not)."""

    def __init__(self) -> None:
        super().__init__()
        #: Each release by its :attr:`NpmRelease.tarball_path`.
        self.files: dict[str, NpmRelease] = {}
        #: Bodies sent instead of the real ones, by path (a corrupted tarball).
        self.tampered: dict[str, bytes] = {}

    def add(self, release: NpmRelease) -> None:
        self.files[release.tarball_path] = release

    def downloads(self) -> dict[str, int]:
        """Tarball bodies sent (200 answers to a GET), by tarball path."""
        counts: dict[str, int] = {}
        for r in self.requests:
            path = unquote(r.path)
            if r.method == b"GET" and r.status == 200 and path in self.files:
                counts[path] = counts.get(path, 0) + 1
        return counts

    def _answer(self, request: Request, record: IndexRequest) -> bytes:
        path = unquote(record.path)
        release = self.files.get(path)
        if release is None:
            return self._not_found(request)
        body = self.tampered.get(path, release.data)
        return self._send(request, record, _Document(body, TARBALL, release.published), {})


class NpmRegistry(TarballResource):
    """
    The registry itself (see the module's docstring): documents, and its
    own tarballs unless ``tarball_host`` serves them.
    """

    def __init__(self, tarball_host: Optional["TarballHost"] = None) -> None:
        super().__init__()
        self.tarball_host = tarball_host
        self.packages: dict[str, NpmPackage] = {}
        #: Its root URL, once it listens: its own tarballs are linked below it.
        self.url = ""

    @property
    def tarballs(self) -> TarballResource:
        """What serves the tarballs: the tarball host's resource, or this one."""
        return self.tarball_host.resource if self.tarball_host is not None else self

    def document(self, name: str, abbreviated: bool) -> _Document:
        """``name``'s document as it is served now."""
        base = self.tarball_host.url if self.tarball_host is not None else self.url
        return self.packages[name].document(base, abbreviated)

    def add_release(
        self, name: str, version: str, dependencies: Optional[dict[str, str]] = None
    ) -> NpmRelease:
        """Publish ``version`` of ``name``: it is the package's ``latest`` at once."""
        package = self.packages.setdefault(name, NpmPackage(name, created=int(time.time())))
        # A publish within the same second as the one before still gets a
        # later Last-Modified.
        package.modified = max(int(time.time()), package.modified + 1)
        dependencies = dict(dependencies or {})
        data = build_tarball(name, version, dependencies)
        release = NpmRelease(name, version, dependencies, data, package.modified)
        package.releases.append(release)
        self.tarballs.add(release)
        return release

    def document_requests(self) -> list[IndexRequest]:
        """The requests for package documents (anything but a tarball path)."""
        return [r for r in self.requests if "/-/" not in r.path]

    def _answer(self, request: Request, record: IndexRequest) -> bytes:
        name = unquote(record.path[1:])
        if name not in self.packages:
            return super()._answer(request, record)
        document = self.document(name, prefers_abbreviated(request.getHeader(b"accept")))
        return self._send(request, record, document, {b"vary": b"Accept"})


def _listen(resource: Resource) -> tuple:
    """``resource`` served on 127.0.0.1 (a random port), unlogged: ``(port, URL ending in /)``."""
    site = Site(resource)
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}/"


class TarballHost:
    """
    A :class:`TarballResource` on a server of its own, apart from the
    registry's (another origin): what an npm mirror's ``files`` is.
    """

    def __init__(self) -> None:
        self.resource = TarballResource()
        self.port, self.url = _listen(self.resource)

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()


class NpmRegistryServer:
    """
    An :class:`NpmRegistry` listening on 127.0.0.1.

    :ivar url: its root, ``http://127.0.0.1:PORT/`` (an npm mirror's source).
    :ivar tarball_host: the :class:`TarballHost` given, if any: it serves
        the tarballs, and :meth:`stop` stops it too.
    """

    def __init__(self, tarball_host: Optional[TarballHost] = None) -> None:
        self.tarball_host = tarball_host
        self.registry = NpmRegistry(tarball_host)
        self.port, self.url = _listen(self.registry)
        self.registry.url = self.url

    def add_release(
        self, name: str, version: str, dependencies: Optional[dict[str, str]] = None
    ) -> NpmRelease:
        return self.registry.add_release(name, version, dependencies)

    def document(self, name: str, abbreviated: bool) -> bytes:
        """The body of ``name``'s full or abbreviated document, as it is served now."""
        return self.registry.document(name, abbreviated).body

    @property
    def tarballs(self) -> TarballResource:
        return self.registry.tarballs

    def tamper(self, release: NpmRelease, data: bytes) -> None:
        """From now on ``data`` is ``release``'s tarball (the documents keep its integrity)."""
        self.tarballs.tampered[release.tarball_path] = data

    def downloads(self) -> dict[str, int]:
        return self.tarballs.downloads()

    def document_requests(self) -> list[IndexRequest]:
        return self.registry.document_requests()

    @property
    def requests(self) -> list[IndexRequest]:
        """Every request, to the registry and to its tarball host."""
        host = self.tarball_host.resource.requests if self.tarball_host is not None else []
        return self.registry.requests + host

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()
        if self.tarball_host is not None:
            await self.tarball_host.stop()


# pkgcache in front of a registry.


@dataclass
class NpmMirror:
    """A ``MirrorsResource`` with one npm mirror, ``npm``, on 127.0.0.1."""

    url: str
    cache: Path
    #: Every request pkgcache answered.
    site: RecordingSite
    #: Whether its tarballs come from a tarball host (``files``).
    files: bool
    _port: object
    _service: CacheService

    @property
    def registry_url(self) -> str:
        """What npm's ``--registry`` is."""
        return self.url + "/npm/"

    @property
    def requests(self) -> list[IndexRequest]:
        return self.site.requests

    def _tarball_in_tree(self, release: NpmRelease) -> str:
        """``release``'s tarball within the mirror's tree (below ``files/`` from a tarball host)."""
        return ("files/" if self.files else "") + release.tarball_path.lstrip("/")

    def tarball_url(self, release: NpmRelease) -> str:
        """Where the documents it serves link ``release``'s tarball (npm's ``resolved``)."""
        return self.registry_url + self._tarball_in_tree(release)

    def cached_tarball(self, release: NpmRelease) -> Path:
        return self.cache / "npm" / self._tarball_in_tree(release)

    def cached_document(self, name: str, abbreviated: bool) -> Path:
        """Where the cache keeps a package's document, as the registry sent it."""
        suffix = ".abbreviated" if abbreviated else ""
        return self.cache / "npm" / name / f".pkgcache-index{suffix}"

    async def stop(self) -> None:
        await self._port.stopListening()
        if self._service.running:
            await self._service.stopService()


def start_npm_mirror(
    registry: NpmRegistryServer, cache_dir: Path, clock, max_age: float
) -> NpmMirror:
    """
    An npm mirror of ``registry`` (its tarballs from its tarball host, if
    it has one) with documents fresh for ``max_age`` by ``clock``.
    """
    files = (Source(registry.tarball_host.url),) if registry.tarball_host else ()
    root = MirrorsResource(
        [Mirror("npm", (Source(registry.url),), "npm", files=files)],
        cache_dir=FilePath(str(cache_dir)),
        clock=clock,
        volatile_max_age=max_age,
    )
    service = CacheService(root)
    service.startService()
    site = RecordingSite(root)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    return NpmMirror(url, cache_dir, site, bool(files), port, service)


# The client.


class Npm:
    """
    The real npm (the one on ``PATH``), one clean client: its own cache
    (``npm_config_cache``), so that a new ``Npm`` knows nothing another
    learnt.

    Every run is isolated from the machine: a private ``HOME`` and
    ``TMPDIR``, empty user and global ``.npmrc`` files, no proxy variables
    and no other ``npm_config_*`` than these; no update check, audit or
    funding message (each would be a request to a host of its own), no
    retries.  The registry given is the only host it is told of.

    :param workdir: an empty directory of the test's, for the cache, the
        projects and npm's home.
    :param timeout: seconds a run may take; then it is killed (``SIGKILL``)
        and the run fails with what npm had written.
    """

    def __init__(self, workdir: Path, timeout: float = 60.0) -> None:
        binary = shutil.which("npm")
        if binary is None:
            raise AssertionError("npm is not on PATH")
        self.binary = binary
        self.workdir = workdir
        self.timeout = timeout
        self.runs: list[PipResult] = []
        self.cache = workdir / "cache"
        self._count = 0
        self._home = workdir / "home"
        self._tmp = workdir / "tmp"
        for path in (self.cache, self._home, self._tmp):
            path.mkdir(parents=True, exist_ok=True)
        # Two files: npm refuses to load one file as both.
        self._npmrc = {level: workdir / f"{level}.npmrc" for level in ("user", "global")}
        for npmrc in self._npmrc.values():
            npmrc.touch()

    def _env(self, registry_url: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._home),
            "TMPDIR": str(self._tmp),
            "LC_ALL": "C.UTF-8",
            "NO_COLOR": "1",
            "npm_config_registry": registry_url,
            "npm_config_cache": str(self.cache),
            "npm_config_userconfig": str(self._npmrc["user"]),
            "npm_config_globalconfig": str(self._npmrc["global"]),
            "npm_config_update_notifier": "false",
            "npm_config_fetch_retries": "0",
            "npm_config_fetch_timeout": "10000",
            "npm_config_progress": "false",
            # Each request, its status and npm's cache's verdict on stderr.
            "npm_config_loglevel": "http",
        }

    async def run(self, registry_url: str, cwd: Path, *args: str) -> PipResult:
        """Run ``npm ARGS`` in ``cwd`` with ``registry_url``; its result, whatever its exit."""
        argv = [self.binary, *args]
        result = await _run_process("npm", argv, self._env(registry_url), cwd, self.timeout)
        self.runs.append(result)
        return result

    async def try_install(
        self, registry_url: str, *specs: str, files: Optional[dict[str, dict]] = None
    ) -> tuple[PipResult, Path]:
        """
        ``npm install`` of ``specs`` from ``registry_url`` in a new project
        directory (holding ``files``, JSON by name: a ``package.json``, a
        lockfile): the result, whatever npm's exit, and that directory.
        """
        self._count += 1
        project = self.workdir / f"project-{self._count}"
        project.mkdir()
        for name, content in (files or {}).items():
            (project / name).write_text(json.dumps(content, indent=2) + "\n")
        result = await self.run(
            registry_url, project, "install", "--registry", registry_url, "--prefix", str(project),
            "--no-audit", "--no-fund", *specs,
        )
        return result, project

    async def install(
        self, registry_url: str, *specs: str, files: Optional[dict[str, dict]] = None
    ) -> Path:
        """:meth:`try_install`'s directory; fails if npm does."""
        result, project = await self.try_install(registry_url, *specs, files=files)
        result.check()
        return project


def installed_version(project: Path, name: str) -> str:
    """The version of ``name`` as installed in ``project`` (from its ``package.json``)."""
    return json.loads((project / "node_modules" / name / "package.json").read_text())["version"]


def lockfile_packages(project: Path) -> dict[str, dict]:
    """The ``packages`` of ``project``'s ``package-lock.json``, but the project itself."""
    packages = json.loads((project / "package-lock.json").read_text())["packages"]
    return {path: entry for path, entry in packages.items() if path}


def old_lockfile_project(mirror: NpmMirror, *releases: NpmRelease) -> dict[str, dict]:
    """
    The files of a project that depends on ``releases[0]`` and was locked
    by npm 6 through ``mirror`` (``lockfileVersion`` 1, every release at
    the top level), for :meth:`Npm.install`'s ``files``: npm fetches the
    abbreviated documents to fill in what such a lockfile lacks.
    """
    root = releases[0]
    locked = {}
    for release in releases:
        entry = {"version": release.version, "resolved": mirror.tarball_url(release),
                 "integrity": release.integrity}
        if release.dependencies:
            entry["requires"] = release.dependencies
        locked[release.name] = entry
    manifest = {"name": "old-project", "version": "1.0.0",
                "dependencies": {root.name: f"^{root.version}"}}
    lockfile = {"name": "old-project", "version": "1.0.0", "lockfileVersion": 1,
                "requires": True, "dependencies": locked}
    return {"package.json": manifest, "package-lock.json": lockfile}
