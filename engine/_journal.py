"""A worker's outcome journal: memory shared with the pool that outlives the worker.

A worker runs a batch of targets and reports their outcomes together, which is what makes
small targets fast. Outcomes not yet sent must not die with the worker, so each one is written
here the moment it exists (a memory copy, no system call), and the journal's bytes are what is
sent. If the worker dies mid-batch, the pool reads the outcomes from the journal instead.

Layout: an 8-byte header holding the end of the committed entries, then the message tag
(`OUTCOMES`), then entries; an entry is `ENTRY` followed by its pickled body. The header is
updated only after an entry is complete, so a reader never sees half an entry.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

OUTCOMES = b"O"  #: the first byte of a message of outcome entries
ENTRY = struct.Struct("<QIBdd")  #: task id, body length, status, started, finished
_HEADER = struct.Struct("<Q")
_START = _HEADER.size + len(OUTCOMES)


class Journal:
    """A fixed-size shared memory file, created by the pool and inherited by one worker."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, size)
        self._map[_HEADER.size:_START] = OUTCOMES
        self._end = _START

    @classmethod
    def create(cls, size: int) -> Journal:
        """A new journal in the caller; its `fd` is passed to the worker, which maps it too."""
        return cls(cls.shared_file(size), size)

    @staticmethod
    def shared_file(size: int) -> int:
        """A file in memory, without a name, of `size` bytes: its descriptor."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("engine", os.MFD_CLOEXEC)
        else:  # pragma: no cover - Linux has memfd_create
            import tempfile

            with tempfile.TemporaryFile() as file:
                fd = os.dup(file.fileno())
        os.ftruncate(fd, size)
        return fd

    # -- the worker's side -------------------------------------------------------------------

    def append(self, task_id: int, status: int, started: float, finished: float,
               body: bytes) -> bool:
        """Commit one entry; False if it does not fit in what is left."""
        end = self._end + ENTRY.size + len(body)
        if end > self.size:
            return False
        ENTRY.pack_into(self._map, self._end, task_id, len(body), status, started, finished)
        self._map[self._end + ENTRY.size:end] = body
        _HEADER.pack_into(self._map, 0, end)
        self._end = end
        return True

    def pending(self) -> memoryview | None:
        """The message to send: the tag and every entry committed since the last `clear`."""
        return memoryview(self._map)[_HEADER.size:self._end] if self._end > _START else None

    def clear(self) -> None:
        self._end = _START
        _HEADER.pack_into(self._map, 0, _START)

    # -- the pool's side, once the worker is gone ------------------------------------------------

    def committed(self) -> bytes:
        """The tag and every entry the worker committed and had not yet sent (or just sent)."""
        (end,) = _HEADER.unpack_from(self._map, 0)
        return self._map[_HEADER.size:min(max(end, _START), self.size)]

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


def entries(message: bytes | bytearray | memoryview,
            ) -> Iterator[tuple[int, int, float, float, memoryview]]:
    """(task id, status, started, finished, body) of each entry of an `OUTCOMES` message."""
    view = memoryview(message)
    position, size = len(OUTCOMES), len(view)
    while position + ENTRY.size <= size:
        task_id, length, status, started, finished = ENTRY.unpack_from(view, position)
        position += ENTRY.size
        yield task_id, status, started, finished, view[position:position + length]
        position += length
