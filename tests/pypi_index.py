"""
A local "simple" package index (PEP 503 HTML, PEP 691 JSON, PEP 658
metadata) that a test can change while it runs, and runners for the real
``pip`` and ``uv`` against it.

:class:`PackageIndexServer` serves, on 127.0.0.1:

- ``/simple/``: every project;
- ``/simple/NAME/`` (``NAME`` normalized, as PEP 503 says): the project's
  wheels, as ``<a href="../../files/FILE#sha256=HEX">``, relative links on
  the same host, with ``data-requires-python`` where a release has one and
  ``data-yanked`` where it was yanked (:meth:`PackageIndex.yank`);
- ``/files/FILE``: the wheel's bytes.

Both pages come as the real index sends them, by the request's ``Accept``
(q-values weighed, the most specific range winning; no ``Accept``, or
nothing acceptable: HTML): ``text/html``,
``application/vnd.pypi.simple.v1+html`` or, to a client that prefers it
(pip and uv do), PEP 691 JSON, ``application/vnd.pypi.simple.v1+json``,
whose ``files`` entries carry ``filename``, ``url``, ``hashes``
(``sha256``), ``requires-python``, ``yanked``, ``size``, ``upload-time``,
``core-metadata`` and ``dist-info-metadata``.  Each representation has its
own ``ETag``; every page carries ``Vary: Accept``.

With ``core_metadata=True`` the index offers each wheel's ``METADATA`` as
PEP 658 / PEP 714 say: ``data-core-metadata="sha256=HEX"`` and
``data-dist-info-metadata="sha256=HEX"`` on the links, ``{"sha256": HEX}``
in JSON (else ``false``), and ``FILE.metadata`` is served next to every
wheel (pip 22.3+ and uv then read it instead of the wheel to resolve).  It
is off by default: a plain PEP 503 index, to which pip sends one request
per wheel.

Or, as the real index does, with its files on another host: given a
:class:`FilesHost` (``PackageIndexServer(files_host=FilesHost())``), the
project pages link to each wheel with an ABSOLUTE URL,
``FILES_URL/packages/HH/HH/FILE#sha256=HEX`` (a hash-ish path; the same
URL, without the fragment, in JSON), and only that second server on
127.0.0.1 serves the wheels and their ``.metadata`` (the index's own
``/files/`` is then a 404).  It records its requests as the index does.

Like the indexes pip meets in the wild, ``/simple/NAME`` (no trailing
slash) and ``/simple/Not_Normalized/`` are answered with a 301 to
``/simple/name/``, and every answer carries ``ETag`` and ``Last-Modified``
and honours ``If-None-Match`` / ``If-Modified-Since`` with a 304, so that a
cache's conditional revalidation can be tested.  Every request is recorded
with its headers, the status it got and the type of what it was answered.

The wheels are real (a module, ``METADATA``, ``WHEEL`` and a ``RECORD``
with correct hashes), built in memory, byte-for-byte the same each time:
pip and uv install them.

:class:`Pip` runs ``python -m pip`` from this interpreter's environment,
and :class:`Uv` the ``uv`` next to it, as subprocesses on the reactor,
isolated from every configuration and environment variable of the
machine, installing only into a ``--target`` directory, and killed if they
outlive their timeout.

:func:`start_pypi_mirror` puts a pkgcache ``pypi`` mirror (a
``MirrorsResource``) in front of an index, recording what its clients send
it (:class:`RecordingSite`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: The date inside every wheel's zip entries, so that a wheel built twice is
#: the same bytes (and so the same ``sha256``).
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)

#: The representations of a page, as the index names them in ``Content-Type``.
TEXT_HTML = b"text/html"
V1_HTML = b"application/vnd.pypi.simple.v1+html"
V1_JSON = b"application/vnd.pypi.simple.v1+json"
#: What the index offers, in its order of preference when a client likes
#: several as much (``*/*``: HTML, as the real index).
_OFFERS = (TEXT_HTML, V1_HTML, V1_JSON)
_ALIASES = {
    b"application/vnd.pypi.simple.latest+html": V1_HTML,
    b"application/vnd.pypi.simple.latest+json": V1_JSON,
}


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


def wheel_metadata(data: bytes) -> bytes:
    """The ``METADATA`` inside a wheel's bytes (what PEP 658 serves as ``FILE.metadata``)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        [path] = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        return archive.read(path)


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
    #: ``None``: not yanked; else yanked, with this reason (maybe ``""``).
    yanked: Optional[str] = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @functools.cached_property
    def metadata(self) -> bytes:
        """The wheel's ``METADATA``: the body of ``FILE.metadata``."""
        return wheel_metadata(self.data)

    @property
    def metadata_sha256(self) -> str:
        return hashlib.sha256(self.metadata).hexdigest()

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

    @property
    def hosted_metadata_path(self) -> str:
        """Where a :class:`FilesHost` serves the wheel's ``METADATA`` (PEP 658)."""
        return self.hosted_path + ".metadata"


@dataclass
class Project:
    name: str
    releases: list[Release] = field(default_factory=list)
    #: ``Last-Modified`` of its page, in whole seconds since the epoch.
    modified: int = 0


@dataclass
class IndexRequest:
    """A request a server got, and how it answered."""

    method: bytes
    path: str
    headers: dict[bytes, list[bytes]]
    status: int = 0
    #: The type of the document it answered with (on a 304 too); ``None``
    #: for an error or a redirect.
    content_type: Optional[bytes] = None

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def conditional(self) -> bool:
        """Whether it carried a validator (``If-None-Match``, ``If-Modified-Since``)."""
        return bool(self.header(b"if-none-match") or self.header(b"if-modified-since"))


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


def accept_ranges(accept: bytes) -> list[tuple[bytes, float]]:
    """
    The media ranges of an ``Accept`` header with their ``q`` (1 if not
    given, 0 if not a number, clamped to 0..1), lower-cased, parameters
    other than ``q`` dropped, PyPI's ``latest`` aliases made ``v1``.
    """
    ranges = []
    for item in accept.split(b","):
        media_range, *parameters = (part.strip() for part in item.split(b";"))
        if not media_range:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        media_range = media_range.lower()
        ranges.append((_ALIASES.get(media_range, media_range), q))
    return ranges


def _quality(offer: bytes, ranges: Sequence[tuple[bytes, float]]) -> float:
    """``offer``'s q: that of the most specific range it matches (RFC 9110 §12.5.1)."""
    major = offer.split(b"/")[0] + b"/*"
    best: tuple[int, float] = (-1, 0.0)
    for media_range, q in ranges:
        specificity = {offer: 2, major: 1, b"*/*": 0}.get(media_range)
        if specificity is not None and (specificity, q) > best:
            best = (specificity, q)
    return best[1]


def negotiate(accept: Optional[bytes]) -> bytes:
    """
    The representation of a page (its ``Content-Type``) for a request's
    ``Accept``: the offer of the highest q, on a tie the index's preferred
    (HTML first); HTML when there is no ``Accept`` or nothing in it is
    acceptable, as the real index answers.
    """
    if accept is None or not accept.strip():
        return TEXT_HTML
    ranges = accept_ranges(accept)
    chosen, chosen_q = TEXT_HTML, 0.0
    for offer in _OFFERS:
        q = _quality(offer, ranges)
        if q > chosen_q:
            chosen, chosen_q = offer, q
    return chosen


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
        body = self._answer(request, record)
        record.status = request.code
        return body

    render_HEAD = render_GET

    def _answer(self, request: Request, record: IndexRequest) -> bytes:
        raise NotImplementedError

    @staticmethod
    def _not_found(request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain")
        return b"not here\n"

    def _send(
        self, request: Request, record: IndexRequest, document: _Document, headers: dict
    ) -> bytes:
        etag = document.etag
        record.content_type = document.content_type
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

    def _send_release_file(
        self, request: Request, record: IndexRequest, release: Release, metadata: bool
    ) -> bytes:
        """A wheel's bytes, or (``metadata``) its ``METADATA``'s."""
        body = release.metadata if metadata else release.data
        return self._send(
            request, record, _Document(body, b"application/octet-stream", release.modified), {}
        )

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


def _file_downloads(requests: Sequence[IndexRequest], metadata: bool) -> dict[str, int]:
    """Bodies sent (200 answers to a GET) of wheels, or of ``.metadata`` files, by file name."""
    counts: dict[str, int] = {}
    for r in requests:
        name = r.path.rsplit("/", 1)[-1]
        if (
            r.method == b"GET" and r.status == http.OK and r.content_type is not None
            and name.endswith(".metadata") == metadata
        ):
            counts[name] = counts.get(name, 0) + 1
    return counts


class FilesResource(_RecordingResource):
    """
    A files host: ``/packages/HH/HH/FILE`` (a release's
    :attr:`Release.hosted_path`) is the wheel's bytes, and
    ``/packages/HH/HH/FILE.metadata`` its ``METADATA``; anything else a 404.
    """

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Release] = {}
        #: Bodies sent instead of the real ones, by path (a corrupted file).
        self.tampered: dict[str, bytes] = {}

    def add(self, release: Release) -> None:
        self.files[release.hosted_path] = release

    def _answer(self, request: Request, record: IndexRequest) -> bytes:
        path = record.path
        metadata = path.endswith(".metadata")
        release = self.files.get(path[: -len(".metadata")] if metadata else path)
        if release is None:
            return self._not_found(request)
        if path in self.tampered:
            return self._send(request, record, _Document(
                self.tampered[path], b"application/octet-stream", release.modified
            ), {})
        return self._send_release_file(request, record, release, metadata)


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

    def tamper(self, release: Release, data: bytes) -> None:
        """Serve ``data`` as ``release``'s wheel from now on (its hash no longer matches)."""
        self.resource.tampered[release.hosted_path] = data

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
        """Wheel bodies sent, by file name (full 200 answers to a GET; no ``.metadata``)."""
        return _file_downloads(self.requests, metadata=False)

    def metadata_downloads(self) -> dict[str, int]:
        """``FILE.metadata`` bodies sent, by name (``FILE.metadata``)."""
        return _file_downloads(self.requests, metadata=True)

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()


class PackageIndex(_RecordingResource):
    """
    The index itself, a ``twisted.web`` resource (see the module's
    docstring for what it serves).

    :param files_host: where the wheels are, if not here: the pages then
        link to them there, by absolute URL, and ``/files/`` is a 404.
    :param core_metadata: offer each wheel's ``METADATA`` (PEP 658).
    :ivar requests: every request, in order.
    :ivar page_headers: extra headers on the ``/simple/`` pages (say a
        ``Cache-Control``); none by default.
    """

    def __init__(self, files_host: Optional["FilesHost"] = None, *, core_metadata: bool = False) -> None:
        super().__init__()
        self.files_host = files_host
        self.core_metadata = core_metadata
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

    def yank(self, name: str, version: str, reason: str = "") -> Release:
        """Yank (PEP 592) ``version`` of ``name``: its page says so at once."""
        project = self.projects[normalize(name)]
        [release] = [r for r in project.releases if r.version == version]
        release.yanked = reason
        project.modified = self._next_modified(project.modified)
        return release

    def downloads(self) -> dict[str, int]:
        """Wheel bodies sent, by file name (full 200 answers to a GET; no ``.metadata``)."""
        return _file_downloads([r for r in self.requests if r.path.startswith("/files/")], False)

    def metadata_downloads(self) -> dict[str, int]:
        """``FILE.metadata`` bodies sent from ``/files/``, by name (``FILE.metadata``)."""
        return _file_downloads([r for r in self.requests if r.path.startswith("/files/")], True)

    def page_requests(self) -> list[IndexRequest]:
        """The requests for ``/simple/`` pages."""
        return [r for r in self.requests if r.path.startswith("/simple")]

    def _answer(self, request: Request, record: IndexRequest) -> bytes:
        segments = record.path.split("/")[1:]
        if segments == ["simple"]:
            return self._redirect(request, "/simple/")
        accept = request.requestHeaders.getRawHeaders(b"accept")
        representation = negotiate(b",".join(accept) if accept else None)
        headers = {b"vary": b"Accept", **self.page_headers}
        if segments == ["simple", ""]:
            return self._send(request, record, self._root_page(representation), headers)
        if segments[:1] == ["simple"] and segments[1] and segments[2:] in ([], [""]):
            name = segments[1]
            if len(segments) == 2 or name != normalize(name):
                # /simple/pkg, /simple/Pkg_Name/: to the canonical URL.
                return self._redirect(request, f"/simple/{normalize(name)}/")
            project = self.projects.get(name)
            if project is not None:
                return self._send(
                    request, record, self._project_page(project, representation), headers
                )
        elif segments[:1] == ["files"] and len(segments) == 2 and self.files_host is None:
            metadata = segments[1].endswith(".metadata")
            release = self.files.get(segments[1][: -len(".metadata")] if metadata else segments[1])
            if release is not None:
                return self._send_release_file(request, record, release, metadata)
        return self._not_found(request)

    def _redirect(self, request: Request, path: str) -> bytes:
        host = request.getHost()
        request.setResponseCode(http.MOVED_PERMANENTLY)
        request.setHeader(b"location", f"http://{host.host}:{host.port}{path}".encode())
        request.setHeader(b"content-type", b"text/plain")
        return b"moved\n"

    def _root_page(self, representation: bytes) -> _Document:
        projects = sorted(self.projects.items())
        if representation == V1_JSON:
            body = _json({
                "meta": {"api-version": "1.1"},
                "projects": [{"name": project.name} for _, project in projects],
            })
        else:
            body = _page("Simple index", "".join(
                f'    <a href="{html.escape(key)}/">{html.escape(project.name)}</a><br>\n'
                for key, project in projects
            ))
        return _Document(body, _content_type(representation), self._root_modified)

    def _url_of(self, release: Release) -> str:
        if self.files_host is None:
            return f"../../files/{release.filename}"
        return self.files_host.url_of(release)

    def _project_page(self, project: Project, representation: bytes) -> _Document:
        if representation == V1_JSON:
            body = _json({
                "meta": {"api-version": "1.1"},
                "name": normalize(project.name),
                "versions": list(dict.fromkeys(r.version for r in project.releases)),
                "files": [self._json_file(release) for release in project.releases],
            })
        else:
            body = _page(f"Links for {project.name}", "".join(
                self._html_link(release) for release in project.releases
            ))
        return _Document(body, _content_type(representation), project.modified)

    def _html_link(self, release: Release) -> str:
        attributes = f'href="{html.escape(self._url_of(release))}#sha256={release.sha256}"'
        if release.requires_python:
            attributes += f' data-requires-python="{html.escape(release.requires_python)}"'
        if release.yanked is not None:
            attributes += f' data-yanked="{html.escape(release.yanked)}"'
        if self.core_metadata:
            attributes += (f' data-dist-info-metadata="sha256={release.metadata_sha256}"'
                           f' data-core-metadata="sha256={release.metadata_sha256}"')
        return f"    <a {attributes}>{html.escape(release.filename)}</a><br>\n"

    def _json_file(self, release: Release) -> dict:
        metadata = {"sha256": release.metadata_sha256} if self.core_metadata else False
        return {
            "filename": release.filename,
            "url": self._url_of(release),
            "hashes": {"sha256": release.sha256},
            "requires-python": release.requires_python,
            "yanked": (release.yanked or True) if release.yanked is not None else False,
            "size": len(release.data),
            "upload-time": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(release.modified)),
            "core-metadata": metadata,
            "dist-info-metadata": metadata,
        }


def _content_type(representation: bytes) -> bytes:
    return representation + (b"; charset=utf-8" if representation == TEXT_HTML else b"")


def _json(document: dict) -> bytes:
    return json.dumps(document, indent=1).encode("utf-8") + b"\n"


def _page(title: str, links: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.1">\n'
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

    def __init__(self, files_host: Optional[FilesHost] = None, *, core_metadata: bool = False) -> None:
        self.files_host = files_host
        self.index = PackageIndex(files_host, core_metadata=core_metadata)
        site = Site(self.index)
        site.log = lambda request: None
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"
        self.index_url = self.url + "simple/"

    def add_release(self, name: str, version: str, requires_python: Optional[str] = None) -> Release:
        return self.index.add_release(name, version, requires_python)

    def yank(self, name: str, version: str, reason: str = "") -> Release:
        return self.index.yank(name, version, reason)

    def count(self, path: str, method: bytes = b"GET", status: Optional[int] = None) -> int:
        return self.index.count(path, method, status)

    def downloads(self) -> dict[str, int]:
        if self.files_host is not None:
            return self.files_host.downloads()
        return self.index.downloads()

    def metadata_downloads(self) -> dict[str, int]:
        if self.files_host is not None:
            return self.files_host.metadata_downloads()
        return self.index.metadata_downloads()

    @property
    def requests(self) -> list[IndexRequest]:
        return self.index.requests

    def page_requests(self) -> list[IndexRequest]:
        return self.index.page_requests()

    async def stop(self) -> None:
        if self.port.connected:
            await self.port.stopListening()
        if self.files_host is not None:
            await self.files_host.stop()


# pkgcache in front of an index.


class RecordingSite(Site):
    """
    A ``Site`` that records every request it answered, as an
    :class:`IndexRequest` with the answer's ``Content-Type``: what pip or uv
    sent to pkgcache and what they got.
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.requests: list[IndexRequest] = []

    def log(self, request: Request) -> None:
        headers = {name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()}
        [content_type] = request.responseHeaders.getRawHeaders(b"content-type", [None])
        self.requests.append(IndexRequest(
            request.method, request.path.decode("utf-8", "replace"), headers, request.code,
            content_type,
        ))


@dataclass
class PypiMirror:
    """A ``MirrorsResource`` with one pypi mirror, ``pypi``, on 127.0.0.1."""

    url: str
    cache: Path
    #: Every request pkgcache answered.
    site: RecordingSite

    @property
    def index_url(self) -> str:
        return self.url + "/pypi/simple/"

    @property
    def requests(self) -> list[IndexRequest]:
        return self.site.requests

    def cached(self, release: Release) -> Path:
        """Where the cache keeps ``release``'s wheel from the files host."""
        return self.cache / "pypi" / "files" / release.hosted_path.lstrip("/")

    def cached_metadata(self, release: Release) -> Path:
        return self.cache / "pypi" / "files" / release.hosted_metadata_path.lstrip("/")


def start_pypi_mirror(index: PackageIndexServer, cache_dir: Path, clock, max_age: float):
    """
    A pypi mirror of ``index`` (its files from ``index.files_host``) with
    pages fresh for ``max_age`` by ``clock``: ``(PypiMirror, stop)``,
    ``stop()`` a coroutine that stops it.
    """
    from pkgcache.mirrors import Mirror
    from pkgcache.root import MirrorsResource
    from pkgcache.service import CacheService
    from pkgcache.sources import Source

    root = MirrorsResource(
        [Mirror("pypi", (Source(index.url),), "pypi", files=(Source(index.files_host.url),))],
        cache_dir=FilePath(str(cache_dir)),
        clock=clock,
        volatile_max_age=max_age,
    )
    service = CacheService(root)
    service.startService()
    site = RecordingSite(root)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        if service.running:
            await service.stopService()

    return PypiMirror(f"http://127.0.0.1:{port.getHost().port}", cache_dir, site), stop


# The clients.


@dataclass
class PipResult:
    """What one run of a client (pip, uv) did."""

    args: list[str]
    code: Optional[int]
    out: str
    err: str
    tool: str = "pip"

    def describe(self) -> str:
        return (f"{self.tool} {' '.join(self.args)}\nexit: {self.code}\n"
                f"--- stdout\n{self.out}\n--- stderr\n{self.err}")

    def check(self) -> "PipResult":
        """This result, if the client succeeded; else an ``AssertionError`` with its output."""
        if self.code != 0:
            raise AssertionError(f"{self.tool} failed:\n" + self.describe())
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


async def _run_process(
    tool: str, argv: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> PipResult:
    """
    ``argv`` on the reactor (never blocking it): its result, whatever its
    exit; killed (``SIGKILL``) after ``timeout`` seconds, and then an
    ``AssertionError`` with what it had written.
    """
    protocol = _PipProtocol()
    process = reactor.spawnProcess(protocol, argv[0], argv, env=env, path=str(cwd))
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        process.signalProcess("KILL")

    timer = reactor.callLater(timeout, expire)
    try:
        code = await protocol.ended
    finally:
        if timer.active():
            timer.cancel()
        if not protocol.ended.called:
            # The test gave up on this run (cancelled): leave nothing running.
            process.signalProcess("KILL")
    result = PipResult(
        argv[1:], code,
        b"".join(protocol.out).decode("utf-8", "replace"),
        b"".join(protocol.err).decode("utf-8", "replace"),
        tool,
    )
    if expired:
        raise AssertionError(f"{tool} was killed after {timeout} s:\n" + result.describe())
    return result


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
        argv = [sys.executable, "-m", "pip", *args]
        result = await _run_process("pip", argv, self._env(), self.workdir, self.timeout)
        result.args = list(args)
        self.runs.append(result)
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


def uv_binary() -> Path:
    """
    The ``uv`` of this virtualenv (next to ``sys.executable``; the ``test``
    extra installs it); a clear failure if it is missing.
    """
    path = Path(sys.executable).parent / "uv"
    if not os.access(path, os.X_OK):
        raise AssertionError(
            f"uv is not installed: no {path} (it is in the test extra: pip install '.[test]')"
        )
    return path


class Uv:
    """
    The real uv (:func:`uv_binary`), one clean client: its own cache
    (``UV_CACHE_DIR``), so that a new ``Uv`` knows nothing another learnt.

    Every run is isolated from the machine: ``--no-config`` (no
    ``uv.toml``, no ``pyproject.toml``), a private ``HOME``, ``TMPDIR`` and
    XDG directories, no proxy variables, no Python downloads, no builds
    (wheels only), one attempt with a 10 s network timeout; the index URL
    given is the only host it is told of.  Nothing is installed into the
    virtualenv: ``install`` uses ``--target`` (with this interpreter as the
    Python to install for).

    :param workdir: an empty directory of the test's, for the cache, the
        targets and uv's home.
    :param timeout: seconds a run may take; then it is killed.
    """

    def __init__(self, workdir: Path, timeout: float = 30.0) -> None:
        self.binary = uv_binary()
        self.workdir = workdir
        self.timeout = timeout
        self.runs: list[PipResult] = []
        self.cache = workdir / "cache"
        self._count = 0
        self._home = workdir / "home"
        self._tmp = workdir / "tmp"
        for path in (self.cache, self._home, self._tmp):
            path.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._home),
            "TMPDIR": str(self._tmp),
            "XDG_CONFIG_HOME": str(self._home / ".config"),
            "XDG_CACHE_HOME": str(self._home / ".cache"),
            "XDG_DATA_HOME": str(self._home / ".local" / "share"),
            "LC_ALL": "C.UTF-8",
            "UV_CACHE_DIR": str(self.cache),
            "UV_NO_CONFIG": "1",
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_HTTP_TIMEOUT": "10",
            "UV_HTTP_RETRIES": "0",
            "UV_NO_PROGRESS": "1",
            "UV_LINK_MODE": "copy",
            "NO_COLOR": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    async def run(self, *args: str) -> PipResult:
        """Run ``uv ARGS`` (no options added); its result, whatever its exit."""
        argv = [str(self.binary), *args]
        result = await _run_process("uv", argv, self._env(), self.workdir, self.timeout)
        self.runs.append(result)
        return result

    async def try_install(self, index_url: str, *requirements: str) -> tuple[PipResult, Path]:
        """
        ``uv pip install --target`` a new directory, of ``requirements``
        from ``index_url``: the result, whatever uv's exit, and that directory.
        """
        self._count += 1
        target = self.workdir / f"target-{self._count}"
        result = await self.run(
            "pip", "install", "--no-config", "--python", sys.executable,
            "--no-python-downloads", "--target", str(target), "--index-url", index_url,
            "--no-build", "--color", "never", *requirements,
        )
        return result, target

    async def install(self, index_url: str, *requirements: str) -> Path:
        """:meth:`try_install`'s directory; fails if uv does."""
        result, target = await self.try_install(index_url, *requirements)
        result.check()
        return target


def installed_version(target: Path, module: str) -> str:
    """The ``__version__`` of ``module`` as installed in ``target`` (read, not imported)."""
    match = re.search(r'__version__ = "([^"]+)"', (target / f"{module}.py").read_text())
    assert match, f"no version in {module}.py"
    return match.group(1)
