"""
The access log's batches: lines wait in memory, and are written whole, in
one ``write`` per batch, by the clock's flush, when many are waiting, and
at close.
"""

from __future__ import annotations

import fcntl
import io
import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from pkgcache.accesslog import FLUSH_BYTES, FLUSH_INTERVAL, AccessLog
from pkgcache.outcomes import Outcome


class FinishedRequest:
    """What the access log reads of a finished request."""

    method = b"GET"
    clientproto = b"HTTP/1.1"
    code = 200
    sentLength = 4096

    def __init__(self, uri: bytes = b"/distfiles/x", user_agent: bytes = b"Wget/1.21") -> None:
        self.uri = uri
        self._headers = {b"user-agent": user_agent}

    def getClientAddress(self):
        return IPv4Address("TCP", "10.0.0.7", 40000)

    def getHeader(self, name: bytes):
        return self._headers.get(name)


class Writes(io.BytesIO):
    """A stream that counts its ``write`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        return super().write(data)


def started(clock: Clock) -> Clock:
    clock.advance(1_600_000_000)
    return clock


def test_lines_wait_at_most_a_second():
    assert FLUSH_INTERVAL <= 1.0


def test_lines_wait_for_the_clock_and_go_in_one_write():
    clock, stream = started(Clock()), Writes()
    access_log = AccessLog(stream, clock)
    for path in (b"/a", b"/b", b"/c"):
        access_log.record(FinishedRequest(path), Outcome.HIT, False)
    clock.advance(FLUSH_INTERVAL - 0.01)
    assert stream.getvalue() == b"" and stream.writes == 0
    clock.advance(0.01)
    lines = stream.getvalue().decode().splitlines()
    assert [line.split('"')[1] for line in lines] == ["GET /a HTTP/1.1", "GET /b HTTP/1.1",
                                                      "GET /c HTTP/1.1"]
    assert lines[0] == ('10.0.0.7 - - [13/Sep/2020:12:26:40 +0000] "GET /a HTTP/1.1" 200 4096 '
                        '"-" "Wget/1.21" hit')
    assert stream.writes == 1
    assert clock.getDelayedCalls() == [], "no timer while nothing waits"


def test_a_batch_is_timed_from_its_first_line():
    clock, stream = started(Clock()), Writes()
    access_log = AccessLog(stream, clock)
    access_log.record(FinishedRequest(b"/a"), Outcome.HIT, False)
    clock.advance(0.9)
    access_log.record(FinishedRequest(b"/b"), Outcome.MISS, True)
    clock.advance(0.1)
    assert stream.getvalue().count(b"\n") == 2 and stream.writes == 1
    assert stream.getvalue().endswith(b" miss dropped\n")


def test_many_lines_waiting_are_written_at_once():
    clock, stream = started(Clock()), Writes()
    access_log = AccessLog(stream, clock)
    line = len(_one_line())
    for _ in range(FLUSH_BYTES // line):
        access_log.record(FinishedRequest(), Outcome.HIT, False)
    assert stream.writes == 0
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    assert stream.writes == 1
    assert stream.getvalue().count(b"\n") == FLUSH_BYTES // line + 1
    assert clock.getDelayedCalls() == []


def test_close_writes_what_waits_and_later_lines_at_once():
    clock, stream = started(Clock()), Writes()
    access_log = AccessLog(stream, clock)
    access_log.record(FinishedRequest(b"/a"), Outcome.HIT, False)
    access_log.record(FinishedRequest(b"/b"), Outcome.HIT, False)
    access_log.close()
    assert stream.getvalue().count(b"\n") == 2 and stream.writes == 1
    assert clock.getDelayedCalls() == []
    access_log.record(FinishedRequest(b"/c"), Outcome.MISS, True)  # cut off by the shutdown
    assert stream.getvalue().count(b"\n") == 3 and stream.writes == 2
    assert clock.getDelayedCalls() == []


def test_a_short_write_is_followed_by_the_rest():
    class Short(io.BytesIO):
        def write(self, data) -> int:
            return super().write(bytes(data[:10]))

    clock, stream = started(Clock()), Short()
    access_log = AccessLog(stream, clock)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    access_log.flush()
    assert stream.getvalue() == _one_line()


def test_a_failed_write_is_logged_and_the_lines_dropped():
    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

    clock = started(Clock())
    access_log = AccessLog(Full(), clock)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(FLUSH_INTERVAL)
        access_log.flush()  # nothing left to write
    finally:
        globalLogPublisher.removeObserver(events.append)
    (event,) = [event for event in events if event["log_namespace"] == "pkgcache.accesslog"]
    assert formatEvent(event) == (
        "could not write the access log: [Errno 28] No space left on device"
    )
    assert clock.getDelayedCalls() == []


def test_the_time_stamp_follows_the_clock():
    clock, stream = started(Clock()), io.BytesIO()
    access_log = AccessLog(stream, clock)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    clock.advance(0.5)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    clock.advance(0.5)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    access_log.flush()
    stamps = [line.split("[")[1].split("]")[0] for line in stream.getvalue().decode().splitlines()]
    assert stamps == ["13/Sep/2020:12:26:40 +0000"] * 2 + ["13/Sep/2020:12:26:41 +0000"]


def test_quoted_fields_are_escaped():
    clock, stream = started(Clock()), io.BytesIO()
    access_log = AccessLog(stream, clock)
    access_log.record(FinishedRequest(b'/a"b\\c', b'evil" 200 1 "-\x01\xff'), Outcome.HIT, False)
    access_log.flush()
    line = stream.getvalue().decode()
    assert '"GET /a\\"b\\\\c HTTP/1.1"' in line
    assert '"evil\\" 200 1 \\"-\\x01\\xff"' in line


def test_a_file_is_opened_for_appending_and_shared_line_by_line(tmp_path):
    """Two processes' logs on one file (two workers): every line whole."""
    path = str(tmp_path / "access.log")
    clock = started(Clock())
    first, second = AccessLog.open(path, clock), AccessLog.open(path, clock)
    assert fcntl.fcntl(first._stream.fileno(), fcntl.F_GETFL) & os.O_APPEND
    for access_log in (first, second):
        access_log.record(FinishedRequest(b"/one"), Outcome.HIT, False)
        access_log.record(FinishedRequest(b"/two"), Outcome.HIT, False)
    first.flush()
    second.record(FinishedRequest(b"/three"), Outcome.HIT, False)
    second.flush()
    first.close()
    lines = open(path, "rb").read().splitlines()
    assert [line.split(b'"')[1].split()[1] for line in lines] == [
        b"/one", b"/two", b"/one", b"/two", b"/three"
    ]
    assert all(line == _one_line(line.split(b'"')[1].split()[1]).rstrip(b"\n") for line in lines)


def test_reopen_writes_what_waits_then_goes_on_in_a_new_file(tmp_path):
    """logrotate moves the file away, then SIGHUP: the next lines go to a new one."""
    path = tmp_path / "access.log"
    access_log = AccessLog.open(str(path), started(Clock()))
    access_log.record(FinishedRequest(b"/before"), Outcome.HIT, False)
    path.rename(tmp_path / "access.log.1")
    access_log.reopen()
    access_log.record(FinishedRequest(b"/after"), Outcome.HIT, False)
    access_log.close()
    assert (tmp_path / "access.log.1").read_bytes() == _one_line(b"/before")
    assert path.read_bytes() == _one_line(b"/after")


def test_a_log_that_cannot_be_reopened_goes_on_in_the_old_file(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    access_log = AccessLog.open(str(directory / "access.log"), started(Clock()))
    (directory / "access.log").rename(tmp_path / "access.log.1")
    directory.rmdir()
    access_log.reopen()
    access_log.record(FinishedRequest(b"/after"), Outcome.HIT, False)
    access_log.close()
    assert (tmp_path / "access.log.1").read_bytes() == _one_line(b"/after")


def test_standard_output_is_written_unbuffered(capfd):
    clock = started(Clock())
    access_log = AccessLog.open("-", clock)
    access_log.record(FinishedRequest(), Outcome.HIT, False)
    access_log.flush()
    assert capfd.readouterr().out == _one_line().decode()


def _one_line(path: bytes = b"/distfiles/x") -> bytes:
    stream = io.BytesIO()
    access_log = AccessLog(stream, started(Clock()))
    access_log.record(FinishedRequest(path), Outcome.HIT, False)
    access_log.flush()
    return stream.getvalue()
