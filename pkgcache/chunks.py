"""
The bytes of a download held in memory: those the disk has not taken yet,
and, once the spool is lost, those a client has not read yet.
"""

from __future__ import annotations

from bisect import bisect_right


class ChunkBuffer:
    """
    The bytes of a file from some offset up to what has been received, as
    the chunks they arrived in (so that nothing is copied to append, trim or
    hand to a writer).
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._chunks: list[bytes] = []
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        self._starts.append(self.end)
        self._chunks.append(data)
        self.end += len(data)

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (within one chunk)."""
        assert self.start <= offset <= self.end, "read outside the buffer"
        if offset == self.end:
            return b""
        index = bisect_right(self._starts, offset) - 1
        within = offset - self._starts[index]
        return self._chunks[index][within : within + length]

    def drop_before(self, offset: int) -> None:
        """Forget the chunks that end at or before ``offset``."""
        if offset >= self.end:
            self._starts.clear()
            self._chunks.clear()
            self.start = self.end
            return
        first_kept = bisect_right(self._starts, offset) - 1
        if first_kept > 0:
            del self._starts[:first_kept]
            del self._chunks[:first_kept]
            self.start = self._starts[0]
