"""
The in-memory part of a download: chunks waiting for the disk or a reader.
"""

from pkgcache.chunks import ChunkBuffer


def filled(*chunks: bytes) -> ChunkBuffer:
    buffer = ChunkBuffer()
    for chunk in chunks:
        buffer.append(chunk)
    return buffer


def test_reads_within_and_across_chunks():
    buffer = filled(b"abc", b"defg", b"h")
    assert (buffer.start, buffer.end, len(buffer)) == (0, 8, 8)
    assert buffer.read(0, 2) == b"ab"
    assert buffer.read(2, 10) == b"c"  # one chunk at a time
    assert buffer.read(3, 10) == b"defg"
    assert buffer.read(5, 1) == b"f"
    assert buffer.read(8, 10) == b""


def test_dropping_keeps_the_chunk_holding_the_offset():
    buffer = filled(b"abc", b"defg", b"h")
    buffer.drop_before(2)
    assert buffer.start == 0
    buffer.drop_before(5)
    assert (buffer.start, len(buffer)) == (3, 5)
    assert buffer.read(5, 10) == b"fg"
    buffer.drop_before(8)
    assert (buffer.start, len(buffer)) == (8, 0)
    buffer.append(b"ij")
    assert buffer.read(8, 10) == b"ij"
    assert buffer.end == 10
