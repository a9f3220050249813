"""
A local PEP 503 "simple" package index that a test can change while it runs,
and a runner for the real ``pip`` against it.

:class:`PackageIndexServer` serves, on 127.0.0.1:

- ``/simple/``: every project, as ``<a href="NAME/">``;
- ``/simple/NAME/`` (``NAME`` normalized, as PEP 503 says): the project's
  wheels, as ``<a href="../../files/FILE#sha256=HEX">``, relative links on
  the same host, with ``data-requires-python`` where a release has one;
- ``/files/FILE``: the wheel's bytes.

Or, as the real index does, with its files on another host: given a
:class:`FilesHost` (``PackageIndexServer(files_host=FilesHost())``), the
project pages link to each wheel with an ABSOLUTE URL,
``FILES_URL/packages/HH/HH/FILE#sha256=HEX`` (a hash-ish path), and only
that second server on 127.0.0.1 serves the wheels (the index's own
``/files/`` is then a 404).  It records its requests as the index does.

Like the indexes pip meets in the wild, ``/simple/NAME`` (no trailing
slash) and ``/simple/Not_Normalized/`` are answered with a 301 to
``/simple/name/``, and every answer carries ``ETag`` and ``Last-Modified``
and honours ``If-None-Match`` / ``If-Modified-Since`` with a 304, so that a
cache's conditional revalidation can be tested.  Every request is recorded
with its headers and the status it got.

The wheels are real (a module, ``METADATA``, ``WHEEL`` and a ``RECORD``
with correct hashes), built in memory, byte-for-byte the same each time:
pip installs them.

:class:`Pip` runs ``python -m pip`` from this interpreter's environment as a
subprocess on the reactor, isolated from every pip configuration and
environment variable of the machine, installing only into a ``--target``
directory, and killed if it outlives its timeout.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: The date inside every wheel's zip entries, so that a wheel built twice is
#: the same bytes (and so the same ``sha256``).
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


def normalize(name: str) -> str:
    """A project name as PEP 503 normalizes it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def build_wheel(name: str, version: str, requires_python: Optional[str] = None) -> tuple[str, bytes]:
    """
    A tiny pure-Python wheel: ``(file name, bytes)``.  It holds the module
    ``NAME.py`` (``NAME`` with ``-`` and ``.`` as ``_``), which sets
    ``__version__``, and a ``.dist-info`` with ``METADATA``, ``WHEEL`` and a
    ``RECORD`` that lists each file's hash and size.
    """
    distribution = re.sub(r"[-_.]+", "_", name)
    module = distribution.lower()
    dist_info = f"{distribution}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires_python:
        metadata += f"Requires-Python: {requires_python}\n"
    files = {
        f"{module}.py": f'__version__ = "{version}"\n'.encode(),
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: pkgcache-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            entry = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, data)
    return f"{distribution}-{version}-py3-none-any.whl", buffer.getvalue()


@dataclass
class Release:
    """One version of a project, as one wheel."""

    name: str
    version: str
    filename: str
    data: bytes
    requires_python: Optional[str] = None
    #: ``Last-Modified`` of the wheel: when it was published.
    modified: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def path(self) -> str:
        """Where the index serves the wheel (when it has no files host)."""
        return f"/files/{self.filename}"

    @property
    def hosted_path(self) -> str:
        """
        Where a :class:`FilesHost` serves the wheel:
        ``/packages/HH/HH/FILE``, the two ``HH`` from the wheel's
        ``blake2b`` digest (a path like the real files host's).
        """
        digest = hashlib.blake2b(self.data, digest_size=32).hexdigest()
        return f"/packages/{digest[:2]}/{digest[2:4]}/{self.filename}"


@dataclass
class Project:
    name: str
    releases: list[Release] = field(default_factory=list)
    #: ``Last-Modified`` of its page, in whole seconds since the epoch.
    modified: int = 0


@dataclass
class IndexRequest:
    """A request the index got, and the status it answered."""

    method: bytes
    path: str
    headers: dict[bytes, list[bytes]]
    status: int = 0

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@dataclass
class _Document:
    body: bytes
    content_type: bytes
    modified: int

    @property
    def etag(self) -> bytes:
        return b'"' + hashlib.sha256(self.body).hexdigest()[:20].encode() + b'"'


def _etag_matches(header: bytes, etag: bytes) -> bool:
    """``If-None-Match`` compares weakly (RFC 9110 §13.1.2)."""
    if header.strip() == b"*":
        return True
    strip = lambda tag: tag.strip().removeprefix(b"W/")  # noqa: E731
    return any(strip(tag) == strip(etag) for tag in header.split(b","))


class _RecordingResource(Resource):
    """
    A leaf resource that records every request (:class:`IndexRequest`) and
    answers with validators and conditional requests.

    :ivar requests: every request, in order.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[IndexRequest] = []

    def count(self, path: str, method: bytes = b"GET", status: Optional[int] = None) -> int:
        """How many ``method`` requests for ``path`` came (that got ``status``)."""
        return sum(
            1 for r in self.requests
            if r.path == path and r.method == method and status in (None, r.status)
        )

    def render_GET(self, request: Request) -> bytes:
        record = IndexRequest(
            request.method,
            request.path.decode("utf-8", "replace"),
            {name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()},
        )
        self.requests.append(record)
        body = self._answer(request, record.path)
        record.status = request.code
        return body

    render_HEAD = render_GET

    def _answer(self, request: Request, path: str) -> bytes:
        raise NotImplementedError

    @staticmethod
    def _not_found(request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain")
        return b"not here\n"

    def _send(self, request: Request, document: _Document, headers: dict) -> bytes:
        etag = document.etag
        request.setHeader(b"etag", etag)
        request.setHeader(b"last-modified", http.datetimeToString(document.modified))
        for name, value in headers.items():
            request.setHeader(name, value)
        if self._not_modified(request, etag, document.modified):
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        request.setHeader(b"content-type", document.content_type)
        request.setHeader(b"content-length", b"%d" % (len(document.body),))
        return document.body

    @staticmethod
    def _not_modified(request: Request, etag: bytes, modified: int) -> bool:
        # If-None-Match wins; If-Modified-Since counts only without it.
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None:
            return _etag_matches(if_none_match, etag)
        if_modified_since = request.getHeader(b"if-modified-since")
        if if_modified_since is not None:
            try:
                since = http.stringToDatetime(if_modified_since)
            except (ValueError, IndexError, KeyError):
                return False
            return modified <= since
        return False


class FilesResource(_RecordingResource):
    """
    A files host: ``/packages/HH/HH/FILE`` (a release's
    :attr:`Release.hosted_path`) is the wheel's bytes; anything else a 404.
    """

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Release] = {}

    def add(self, release: Release) -> None:
        self.files[release.hosted_path] = release

    def _answer(self, request: Request, path: str) -> bytes:
        release = self.files.get(path)
        if release is None:
            return self._not_found(request)
        return self._send(request, _Document(
            release.data, b"application/octet-stream", release.modified
        ), {})


class FilesHost:
    """
    A :class:`FilesResource` listening on 127.0.0.1, a server apart from the
    index's (another origin, as the real files host is).

    :ivar url: its root, ``http://127.0.0.1:PORT/`` (what a pypi mirror's
        ``files`` source is).
    """

    def __init__(self) -> None:
        self.resource = FilesResource()
        site = Site(self.resource)
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"

    def add(self, release: Release) -> None:
        self.resource.add(release)

    def url_of(self, release: Release) -> str:
        """The absolute URL of ``release``'s wheel here (no fragment)."""
        return self.url + release.hosted_path.lstrip("/")

    @property
    def requests(self) -> list[IndexRequest]:
        return self.resource.requests

    def count(self, path: str, method: bytes = b"GET", status: Optional[int] = None) -> int:
        return self.resource.count(path, method, status)

    def hits(self) -> dict[str, int]:
        """Every request (any method, any status), counted by path."""
        counts: dict[str, int] = {}
        for r in self.requests:
            counts[r.path] = counts.get(r.path, 0) + 1
        return counts

    def downloads(self) -> dict[str, int]:
        """Wheel bodies sent, by file name (full 200 answers to a GET)."""
        counts: dict[str, int] = {}
        for r in self.requests:
            if r.method == b"GET" and r.status == http.OK:
                name = r.path.rsplit("/", 1)[-1]
                counts[name] = counts.get(name, 0) + 1
        return counts

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()


class PackageIndex(_RecordingResource):
    """
    The index itself, a ``twisted.web`` resource (see the module's
    docstring for what it serves).

    :param files_host: where the wheels are, if not here: the pages then
        link to them there, by absolute URL, and ``/files/`` is a 404.
    :ivar requests: every request, in order.
    :ivar page_headers: extra headers on the ``/simple/`` pages (say a
        ``Cache-Control``); none by default.
    """

    def __init__(self, files_host: Optional["FilesHost"] = None) -> None:
        super().__init__()
        self.files_host = files_host
        self.projects: dict[str, Project] = {}
        self.files: dict[str, Release] = {}
        self.page_headers: dict[bytes, bytes] = {}
        self._root_modified = self._next_modified(0)

    @staticmethod
    def _next_modified(previous: int) -> int:
        # Last-Modified has whole seconds: a change within the same second
        # as the one before it still gets a later date, so that a cache
        # revalidating with If-Modified-Since alone is not told "304" for a
        # page that did change.
        return max(int(time.time()), previous + 1)

    def add_release(
        self, name: str, version: str, requires_python: Optional[str] = None
    ) -> Release:
        """Publish ``version`` of ``name``: it appears on the pages at once."""
        filename, data = build_wheel(name, version, requires_python)
        release = Release(name, version, filename, data, requires_python)
        key = normalize(name)
        project = self.projects.get(key)
        if project is None:
            project = self.projects[key] = Project(name)
            self._root_modified = self._next_modified(self._root_modified)
        project.releases.append(release)
        project.modified = self._next_modified(project.modified)
        release.modified = project.modified
        self.files[filename] = release
        if self.files_host is not None:
            self.files_host.add(release)
        return release

    def downloads(self) -> dict[str, int]:
        """Wheel bodies sent, by file name (full 200 answers to a GET)."""
        counts: dict[str, int] = {}
        for r in self.requests:
            if r.method == b"GET" and r.status == http.OK and r.path.startswith("/files/"):
                name = r.path[len("/files/"):]
                counts[name] = counts.get(name, 0) + 1
        return counts

    def page_requests(self) -> list[IndexRequest]:
        """The requests for ``/simple/`` pages."""
        return [r for r in self.requests if r.path.startswith("/simple")]

    def _answer(self, request: Request, path: str) -> bytes:
        segments = path.split("/")[1:]
        if segments == ["simple"]:
            return self._redirect(request, "/simple/")
        if segments == ["simple", ""]:
            return self._send(request, self._root_page(), self.page_headers)
        if segments[:1] == ["simple"] and segments[1] and segments[2:] in ([], [""]):
            name = segments[1]
            if len(segments) == 2 or name != normalize(name):
                # /simple/pkg, /simple/Pkg_Name/: to the canonical URL.
                return self._redirect(request, f"/simple/{normalize(name)}/")
            project = self.projects.get(name)
            if project is not None:
                return self._send(request, self._project_page(project), self.page_headers)
        elif segments[:1] == ["files"] and len(segments) == 2 and self.files_host is None:
            release = self.files.get(segments[1])
            if release is not None:
                return self._send(request, _Document(
                    release.data, b"application/octet-stream", release.modified
                ), {})
        return self._not_found(request)

    def _redirect(self, request: Request, path: str) -> bytes:
        host = request.getHost()
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"location", f"http://{host.host}:{host.port}{path}".encode())
        request.setHeader(b"content-type", b"text/plain")
        return b"moved\n"

    def _root_page(self) -> _Document:
        links = "".join(
            f'    <a href="{html.escape(key)}/">{html.escape(project.name)}</a><br>\n'
            for key, project in sorted(self.projects.items())
        )
        return _Document(_page("Simple index", links), b"text/html; charset=utf-8",
                         self._root_modified)

    def _project_page(self, project: Project) -> _Document:
        lines = []
        for release in project.releases:
            if self.files_host is None:
                href = f"../../files/{release.filename}"
            else:
                href = self.files_host.url_of(release)
            attributes = f'href="{html.escape(href)}#sha256={release.sha256}"'
            if release.requires_python:
                attributes += f' data-requires-python="{html.escape(release.requires_python)}"'
            lines.append(f"    <a {attributes}>{html.escape(release.filename)}</a><br>\n")
        return _Document(_page(f"Links for {project.name}", "".join(lines)),
                         b"text/html; charset=utf-8", project.modified)


def _page(title: str, links: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.0">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
        f"    <h1>{html.escape(title)}</h1>\n{links}  </body>\n</html>\n"
    ).encode("utf-8")


class PackageIndexServer:
    """
    A :class:`PackageIndex` listening on 127.0.0.1.

    :ivar url: the server's root, ``http://127.0.0.1:PORT/`` (what a
        pkgcache source is).
    :ivar index_url: ``http://127.0.0.1:PORT/simple/`` (what pip's
        ``--index-url`` is).
    :ivar files_host: the :class:`FilesHost` given, that serves the wheels
        (then :meth:`downloads` counts its downloads); ``None``: the index
        serves them itself.  :meth:`stop` stops it too.
    """

    def __init__(self, files_host: Optional[FilesHost] = None) -> None:
        self.files_host = files_host
        self.index = PackageIndex(files_host)
        site = Site(self.index)
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"
        self.index_url = self.url + "simple/"

    def add_release(self, name: str, version: str, requires_python: Optional[str] = None) -> Release:
        return self.index.add_release(name, version, requires_python)

    def count(self, path: str, method: bytes = b"GET", status: Optional[int] = None) -> int:
        return self.index.count(path, method, status)

    def downloads(self) -> dict[str, int]:
        if self.files_host is not None:
            return self.files_host.downloads()
        return self.index.downloads()

    @property
    def requests(self) -> list[IndexRequest]:
        return self.index.requests

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()
        if self.files_host is not None:
            await self.files_host.stop()


@dataclass
class PipResult:
    """What one pip run did."""

    args: list[str]
    code: Optional[int]
    out: str
    err: str

    def describe(self) -> str:
        return (f"pip {' '.join(self.args)}\nexit: {self.code}\n"
                f"--- stdout\n{self.out}\n--- stderr\n{self.err}")

    def check(self) -> "PipResult":
        """This result, if pip succeeded; else an ``AssertionError`` with its output."""
        if self.code != 0:
            raise AssertionError("pip failed:\n" + self.describe())
        return self


class _PipProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[Optional[int]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason) -> None:
        # exitCode is None when a signal ended it.
        code = reason.value.exitCode if reason.check(ProcessTerminated) else 0
        self.ended.callback(code)


class Pip:
    """
    The real pip (``sys.executable -m pip``: this virtualenv's), run as a
    subprocess without blocking the reactor.

    Every run is isolated from the machine: ``--isolated`` (no user
    configuration, no ``PIP_*`` variables) and ``PIP_CONFIG_FILE`` set to
    ``os.devnull`` (no configuration file at all, not even the global one),
    a private ``HOME`` and ``TMPDIR``, no proxy variables; no cache, no
    version check, no prompts, wheels only, one attempt with a 10 s network
    timeout.  Nothing is installed into the virtualenv: ``install`` uses
    ``--target``.

    :param workdir: an empty directory of the test's, for downloads, targets
        and pip's home.
    :param timeout: seconds a run may take; then it is killed (``SIGKILL``)
        and the run fails with what pip had written.
    """

    COMMON = (
        "--isolated", "--no-cache-dir", "--disable-pip-version-check", "--no-input",
        "--no-color", "--progress-bar", "off", "--timeout", "10", "--retries", "0",
        "--only-binary", ":all:",
    )

    def __init__(self, workdir: Path, timeout: float = 30.0) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.runs: list[PipResult] = []
        self._count = 0
        self._home = workdir / "home"
        self._tmp = workdir / "tmp"
        self._home.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)

    def _fresh(self, kind: str) -> Path:
        self._count += 1
        path = self.workdir / f"{kind}-{self._count}"
        path.mkdir()
        return path

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._home),
            "TMPDIR": str(self._tmp),
            "LC_ALL": "C.UTF-8",
            "PIP_CONFIG_FILE": os.devnull,
            "PYTHONDONTWRITEBYTECODE": "1",
            # requests honours proxy variables even for 127.0.0.1; none is set,
            # and should one come back this keeps pip off it.
            "NO_PROXY": "*",
        }

    async def run(self, *args: str) -> PipResult:
        """Run ``pip ARGS`` (no options added); its result, whatever its exit."""
        protocol = _PipProtocol()
        argv = [sys.executable, "-m", "pip", *args]
        process = reactor.spawnProcess(
            protocol, sys.executable, argv, env=self._env(), path=str(self.workdir)
        )
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            process.signalProcess("KILL")

        timer = reactor.callLater(self.timeout, expire)
        try:
            code = await protocol.ended
        finally:
            if timer.active():
                timer.cancel()
            if not protocol.ended.called:
                # The test gave up on this run (cancelled): leave nothing running.
                process.signalProcess("KILL")
        result = PipResult(
            list(args), code,
            b"".join(protocol.out).decode("utf-8", "replace"),
            b"".join(protocol.err).decode("utf-8", "replace"),
        )
        self.runs.append(result)
        if expired:
            raise AssertionError(f"pip was killed after {self.timeout} s:\n" + result.describe())
        return result

    async def download(self, index_url: str, *requirements: str) -> list[str]:
        """
        ``pip download`` of ``requirements`` from ``index_url`` into a new
        directory (so that nothing is "already downloaded"): the names of
        the files it got.  Fails if pip does.
        """
        dest = self._fresh("download")
        (await self.run(
            "download", *self.COMMON, "--index-url", index_url, "--dest", str(dest),
            *requirements,
        )).check()
        return sorted(os.listdir(dest))

    async def install(self, index_url: str, *requirements: str) -> Path:
        """
        ``pip install --target`` a new directory, of ``requirements`` from
        ``index_url``: that directory.  Fails if pip does.
        """
        target = self._fresh("target")
        (await self.run(
            "install", *self.COMMON, "--index-url", index_url, "--target", str(target),
            "--no-compile", "--no-warn-script-location", *requirements,
        )).check()
        return target


def installed_version(target: Path, module: str) -> str:
    """The ``__version__`` of ``module`` as installed in ``target`` (read, not imported)."""
    match = re.search(r'__version__ = "([^"]+)"', (target / f"{module}.py").read_text())
    assert match, f"no version in {module}.py"
    return match.group(1)
