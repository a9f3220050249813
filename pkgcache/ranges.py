"""
Which bytes of a file a ``Range`` request asks for, and how a multi-range
answer is framed (``multipart/byteranges``, RFC 9110 14.6): one set of
rules for hits and misses alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

#: More ranges than this, or ranges that overlap, and the whole file is sent
#: instead (a server may always ignore ``Range``): many small or overlapping
#: ranges make a large answer from a small request.
MAX_RANGES = 16


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` of a file (``end`` exclusive)."""

    start: int
    end: int

    def content_range(self, length: int) -> bytes:
        return b"bytes %d-%d/%d" % (self.start, self.end - 1, length)


class Unsatisfiable:
    """No range asked for is in the file: answer 416."""


UNSATISFIABLE = Unsatisfiable()


def requested_ranges(
    header: Optional[bytes], length: Optional[int]
) -> Union[None, Unsatisfiable, list[ByteRange]]:
    """
    The ranges of a file of ``length`` bytes that ``header`` asks for, in
    the order asked; ``None`` to send the whole file: for no header, an
    unknown length or an empty file, anything malformed (RFC 9110 says to
    ignore it), and too many or overlapping ranges.
    """
    if header is None or not length:
        return None
    unit, _, specs = header.partition(b"=")
    if unit.strip().lower() != b"bytes":
        return None
    ranges: list[ByteRange] = []
    for spec in specs.split(b","):
        first, dash, last = spec.strip().partition(b"-")
        if not dash or not _digits(first, last):
            return None
        if not first:
            if not last:
                return None
            suffix = int(last)
            if suffix:
                ranges.append(ByteRange(max(length - suffix, 0), length))
            continue
        start = int(first)
        if last and int(last) < start:
            return None
        if start < length:
            ranges.append(ByteRange(start, min(int(last) + 1, length) if last else length))
    if not ranges:
        return UNSATISFIABLE
    if len(ranges) > MAX_RANGES or _overlap(ranges):
        return None
    return ranges


def _digits(*parts: bytes) -> bool:
    return all(part.isdigit() or not part for part in parts)


def _overlap(ranges: list[ByteRange]) -> bool:
    ordered = sorted(ranges, key=lambda byte_range: byte_range.start)
    return any(later.start < earlier.end for earlier, later in zip(ordered, ordered[1:]))


@dataclass(frozen=True)
class Multipart:
    """
    The framing of a ``multipart/byteranges`` answer: the parts' headers go
    before each range, the closing delimiter after the last.
    """

    boundary: bytes
    content_type: bytes
    length: int

    @classmethod
    def new(cls, content_type: bytes, length: int) -> "Multipart":
        return cls(os.urandom(12).hex().encode("ascii"), content_type, length)

    @property
    def media_type(self) -> bytes:
        return b"multipart/byteranges; boundary=" + self.boundary

    def part_header(self, byte_range: ByteRange) -> bytes:
        return b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: %s\r\n\r\n" % (
            self.boundary, self.content_type, byte_range.content_range(self.length)
        )

    def closing(self) -> bytes:
        return b"\r\n--%s--\r\n" % (self.boundary,)

    def body_length(self, ranges: list[ByteRange]) -> int:
        return len(self.closing()) + sum(
            len(self.part_header(byte_range)) + byte_range.end - byte_range.start
            for byte_range in ranges
        )
