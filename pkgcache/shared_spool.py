"""
Downloads shared by the processes on one cache directory: a process that
misses a file another process is downloading follows that download from
its spool instead of fetching the file again.

The spool of a shared download is named by its key
(``CACHE_DIR/.pkgcache-spool/<SHA-256 of the path under CACHE_DIR>.<name>``,
see :func:`pkgcache.spool.new_spool`), and the process downloading it holds
an exclusive ``flock`` on it from the moment it claims the file until the
spool is published or removed.  What a follower needs besides the bytes,
the downloader keeps on the spool itself, in its ``user.pkgcache.spool``
extended attribute: a small JSON :class:`SpoolRecord`, replaced whole
(never seen half written), that says

- the source's status, ``Content-Type``, ``ETag`` and ``Last-Modified``,
  the source it came from, and the file's length and time, once known;
- ``"end": "complete"`` once every byte is on disk (before the ``fsync``
  and the rename), or ``"end": "failed"`` and why before it is removed;
- a beat, counted up every second, so that a follower can tell a
  downloader that waits (for a slot, for a slow source) from one that hangs.

Kept on the inode rather than in a file beside it, the record is read
through the follower's own descriptor: it always describes the download
that follower follows, whatever became of the names since (a dead
process's spool taken over, a failed one removed), and it still says how
that download ended once its name is gone.  No second name can be left
behind, so the start-up sweep keeps its one rule: a spool nobody holds
locked is stale.

A :class:`SpoolFollower` looks at such a spool when asked
(:meth:`SpoolFollower.poll`): ``fstat`` for the bytes written, a
``LOCK_SH|LOCK_NB`` probe (given back at once) for whether the downloader
still holds it, and the record; nothing that can wait.  Once the lock is
free, the download is over, and the names tell how:

- the spool's name is gone and the inode has another: it was renamed into
  the cache (published);
- else the record says: complete (every byte is there, not published), or
  failed (before the headers: how each source failed);
- the spool still has its name: its process died (its lock died with it);
- neither: it was given up without a word (taken over after a crash).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from typing import Optional, Union

from twisted.logger import Logger
from twisted.web import http
from twisted.web.http_headers import Headers

from pkgcache.metadata import EntryMetadata
from pkgcache.sources import AllSourcesFailed, Attempt, FailureKind, Source, SourceAnswer

#: The extended attribute of a shared spool that holds its record.
RECORD_XATTR = "user.pkgcache.spool"
#: A record longer than this (a source's absurdly long ``ETag``) is not
#: kept: an inode's room for extended attributes is small.  The spool is
#: then marked unshared, and followers fetch the file themselves.
MAX_RECORD_BYTES = 2048
#: The response headers a follower's clients are sent, from the record
#: (Via and Cache-Status: the entries of an upper tier or a peer).
RECORDED_HEADERS = ("content-type", "etag", "last-modified", "via", "cache-status")
#: A recorded header longer than this is left out (it would crowd the
#: record out of its attribute, and the download would not be shared).
MAX_RECORDED_HEADER = 256

#: What ``getxattr`` and ``setxattr`` say where user attributes are not kept
#: (as :mod:`pkgcache.metadata` takes them).
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)

log = Logger()


class SpoolUnshared(Exception):
    """
    This spool cannot be followed: its filesystem keeps no extended
    attributes, or its downloader could not record what followers need.
    """


@dataclass(frozen=True)
class FollowedHeaders:
    """
    What the downloading process knows of the file once its source answered.

    :ivar fields: the :data:`RECORDED_HEADERS` the source sent.
    :ivar length: the file's length, if the source said.
    :ivar last_modified: the file's time (the source's ``Last-Modified``,
        or when it answered), seconds since the epoch.
    :ivar checked: when the source was asked.
    """

    code: int
    source: str
    fields: dict
    length: Optional[int]
    last_modified: float
    checked: float

    @classmethod
    def of(cls, response, *, length, last_modified: float, checked: float) -> "FollowedHeaders":
        """Those of an :class:`~pkgcache.upstream.UpstreamResponse`."""
        fields = {}
        for name in RECORDED_HEADERS:
            value = response.header_line(name.encode("ascii"))
            if value is not None and len(value) <= MAX_RECORDED_HEADER:
                fields[name] = value.decode("latin-1")
        return cls(response.code, str(response.source), fields, length, last_modified, checked)

    @classmethod
    def of_published(cls, metadata: EntryMetadata, size: int, mtime: float) -> "FollowedHeaders":
        """Those of a file already in the cache, from what is kept with it."""
        fields = {}
        for name, value in (
            ("content-type", metadata.content_type),
            ("etag", metadata.etag),
            ("last-modified", metadata.last_modified),
        ):
            if value is not None:
                fields[name] = value.decode("latin-1")
        return cls(
            http.OK, metadata.source or "-", fields, size, mtime, metadata.checked or 0.0
        )

    def to_json(self) -> dict:
        return {
            "code": self.code,
            "source": self.source,
            "fields": self.fields,
            "length": self.length,
            "last-modified": self.last_modified,
            "checked": self.checked,
        }

    @classmethod
    def from_json(cls, value) -> Optional["FollowedHeaders"]:
        try:
            fields = {
                str(name): str(text) for name, text in value["fields"].items()
                if name in RECORDED_HEADERS
            }
            length = value["length"]
            return cls(
                int(value["code"]),
                str(value["source"]),
                fields,
                None if length is None else int(length),
                float(value["last-modified"]),
                float(value["checked"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


@dataclass
class SpoolRecord:
    """
    What a downloading process says about its download, on its spool.

    :ivar end: ``None`` while it runs, then ``"complete"`` (every byte is
        on disk) or ``"failed"``.
    :ivar failure: why it failed: ``{"sources": [[source, kind, detail],
        ...], "configured": N}`` when no source provided it, else
        ``{"reason": text}``.
    :ivar received: the file's length on disk, once complete.
    :ivar beat: counted up while nothing else changes, so that the record
        changes (and with it the spool's ``ctime``) while the process lives.
    :ivar unshared: what a follower needs could not be recorded.
    """

    headers: Optional[FollowedHeaders] = None
    end: Optional[str] = None
    failure: Optional[dict] = None
    received: Optional[int] = None
    beat: int = 0
    unshared: bool = False

    def encode(self) -> bytes:
        """As kept in :data:`RECORD_XATTR` (marked unshared if too long)."""
        value: dict = {"beat": self.beat}
        if self.unshared:
            value["unshared"] = True
        else:
            if self.headers is not None:
                value["headers"] = self.headers.to_json()
            if self.end is not None:
                value["end"] = self.end
            if self.failure is not None:
                value["failure"] = self.failure
            if self.received is not None:
                value["received"] = self.received
        encoded = json.dumps(value, separators=(",", ":")).encode("utf-8")
        if len(encoded) > MAX_RECORD_BYTES:
            return json.dumps({"beat": self.beat, "unshared": True}).encode("utf-8")
        return encoded

    @classmethod
    def decode(cls, raw: bytes) -> "SpoolRecord":
        try:
            value = json.loads(raw)
        except ValueError:
            return cls()
        if not isinstance(value, dict):
            return cls()
        headers = value.get("headers")
        failure = value.get("failure")
        received = value.get("received")
        return cls(
            headers=FollowedHeaders.from_json(headers) if headers is not None else None,
            end=value.get("end") if value.get("end") in ("complete", "failed") else None,
            failure=failure if isinstance(failure, dict) else None,
            received=received if isinstance(received, int) else None,
            beat=value.get("beat") if isinstance(value.get("beat"), int) else 0,
            unshared=value.get("unshared") is True,
        )


def failure_record(reason: BaseException) -> dict:
    """How :attr:`SpoolRecord.failure` says ``reason``."""
    if isinstance(reason, AllSourcesFailed):
        return {
            "sources": [
                [attempt.source.text, attempt.kind.value, attempt.detail]
                for attempt in reason.attempts
            ],
            "configured": reason.configured,
        }
    return {"reason": str(reason) or type(reason).__name__}


def _sources_failure(failure: Optional[dict]) -> Optional[AllSourcesFailed]:
    """The :class:`AllSourcesFailed` a record's failure says, if it says one."""
    if failure is None or "sources" not in failure:
        return None
    try:
        attempts = [
            Attempt(Source(source), FailureKind(kind), str(detail))
            for source, kind, detail in failure["sources"]
        ]
        return AllSourcesFailed(attempts, int(failure["configured"]))
    except (TypeError, ValueError, KeyError):
        return None


class FollowedResponse(SourceAnswer):
    """
    The source's response as the downloading process received it: what
    the resource reads of an :class:`~pkgcache.upstream.UpstreamResponse`
    to answer a client (its body is read from the spool, never from here).
    """

    offset = 0

    def __init__(self, headers: FollowedHeaders) -> None:
        self.code = headers.code
        self.source: Union[Source, str] = _source(headers.source)
        self.headers = Headers()
        for name, value in headers.fields.items():
            self.headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
        self.total_length = self.body_length = headers.length


def _source(text: str) -> Union[Source, str]:
    try:
        return Source(text)
    except ValueError:
        return text


class SpoolFollower:
    """
    Another process's download of a file, seen through its spool: the
    bytes it has written, its record, and whether it still holds the lock.

    Nothing happens unless :meth:`poll` is called: whoever follows decides
    how often (and stops while nobody waits).

    :ivar headers: the download's headers, once they can be trusted: seen
        in its record while its downloader held the lock and the spool
        still had its name (a dead process's record is never believed).
    :ivar size: how many bytes are in the spool.
    :ivar complete: every byte is there (the record said so, or the file
        was published).
    :ivar ended: the downloader let go of the spool: nothing more will come.
    :ivar published: it was renamed into the cache.
    :ivar reason: why it ended short of the whole file, if it did.
    :ivar sources_failure: before its headers: how every source failed.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd: Optional[int] = fd
        self.path = path
        self.headers: Optional[FollowedHeaders] = None
        self.size = 0
        self.complete = False
        self.ended = False
        self.published = False
        self.reason = "stopped"
        self.sources_failure: Optional[AllSourcesFailed] = None
        self._seen: tuple = ()

    def poll(self) -> bool:
        """
        Look at the spool once.

        :return: whether anything changed since the last look (bytes, the
            record, or the inode's ``ctime``: the downloader's beat).
        :raises SpoolUnshared: if it cannot be followed.
        :raises OSError: if the spool cannot be looked at.
        """
        fd = self._fd
        assert fd is not None, "follower already closed"
        # The lock first: if it is free, the downloader is done, and what
        # fstat and the record say next is final.
        held = _locked(fd)
        info = os.fstat(fd)
        raw = _read_record(fd)
        record = SpoolRecord.decode(raw) if raw is not None else SpoolRecord()
        if record.unshared:
            raise SpoolUnshared("its downloader could not record what followers need")
        self.size = info.st_size
        seen = (info.st_size, info.st_ctime_ns, raw)
        changed, self._seen = seen != self._seen, seen
        if held:
            if (
                self.headers is None and record.headers is not None
                and record.end != "failed" and _names(self.path, info)
            ):
                self.headers = record.headers
            if self.headers is not None and record.end == "complete":
                self._complete(record)
            return changed
        self.ended = True
        if _names(self.path, info):
            # Nobody holds it, and nobody renamed or removed it: its process
            # died.  A record that says complete was written once every
            # byte was on disk, so those bytes are still the whole file.
            self.reason = "died"
        elif info.st_nlink > 0:
            self.published = True
            if self.headers is None:
                self.headers = record.headers if record.headers is not None else (
                    FollowedHeaders.of_published(
                        EntryMetadata.read(fd), info.st_size, info.st_mtime
                    )
                )
            self._complete(record)
            return True
        if record.end == "complete" and record.headers is not None:
            if self.headers is None:
                self.headers = record.headers
            self._complete(record)
        elif record.end == "failed":
            failure = record.failure or {}
            self.sources_failure = _sources_failure(failure)
            self.reason = f"failed: {failure.get('reason') or self.sources_failure or 'unknown'}"
        return True

    def _complete(self, record: SpoolRecord) -> None:
        length = self.headers.length if self.headers is not None else None
        if record.received is not None and record.received != self.size and not self.published:
            self.reason = f"ended at byte {self.size} of {record.received}"
            return
        if length is not None and length != self.size:
            self.reason = f"ended at byte {self.size} of {length}"
            return
        self.complete = True

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the spool from ``offset``."""
        assert self._fd is not None, "follower already closed"
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _locked(fd: int) -> bool:
    """Whether another open file holds an exclusive ``flock`` on ``fd``'s file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _read_record(fd: int) -> Optional[bytes]:
    try:
        return os.getxattr(fd, RECORD_XATTR)
    except OSError as error:
        if error.errno == errno.ENODATA:
            return None
        if error.errno in _UNSUPPORTED:
            raise SpoolUnshared("the cache's filesystem keeps no extended attributes") from None
        raise


def _names(path: str, info: os.stat_result) -> bool:
    """Whether ``path`` is still a name of the file ``info`` describes."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino)


def set_record(fd: int, record: bytes) -> None:
    """
    Put ``record`` on the spool ``fd`` (blocks: disk thread only).  On a
    filesystem without extended attributes nothing is recorded: followers
    find that out themselves, and fetch the file on their own.
    """
    try:
        os.setxattr(fd, RECORD_XATTR, record)
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise


def remove_record(fd: int) -> None:
    """Take the record off a published file (blocks: disk thread only)."""
    try:
        os.removexattr(fd, RECORD_XATTR)
    except OSError:
        pass
