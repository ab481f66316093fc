"""A worker's outcome journal: memory shared with the pool that outlives the worker.

A worker runs a batch of targets and reports their outcomes together, which is what makes
small targets fast. Outcomes not yet sent must not die with the worker, so each one is written
here the moment it exists (a memory copy, no system call), and the journal's bytes are what is
sent. If the worker dies mid-batch, the pool reads the outcomes from the journal instead.

The entries are one pickle stream, so that the pool reads a whole batch with one `pickle.loads`
into one flat list, five items an entry (no object per entry for the garbage collector): after
an 8-byte header holding the end of the committed entries come ``PROTO 3`` and ``MARK``, then
the entries, each the opcodes of its items ``task id, status, started, finished, value`` (the
pickle of that tuple without its ``PROTO``, ``MARK``, ``TUPLE``, memo put and ``STOP``); the
reader closes the list (``LIST``, ``STOP``). Protocol 3 names its memo slots explicitly (4 and
later number them implicitly), so pickles made one by one concatenate: each entry's references
are to slots it set itself. The header is updated only after an entry is complete, so a reader
never sees half an entry.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Iterator
from typing import Any

OUTCOMES = b"\x80\x03("  #: the start of every message of entries: PROTO 3, MARK
_END = b"l."  #: LIST, STOP: what the reader appends
_HEADER = 8  #: bytes of the header: the end of the committed entries, an unsigned 64-bit int
_START = _HEADER + len(OUTCOMES)
Entry = tuple[int, int, float, float, Any]  #: task id, status, started, finished, value


class Journal:
    """A fixed-size shared memory file, created by the pool and inherited by one worker."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, size)
        self._map[_HEADER:_START] = OUTCOMES
        self._committed = memoryview(self._map)[:_HEADER].cast("Q")
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
               value: Any) -> bool:
        """Commit one entry; False if it does not fit in what is left. `value` must be of a
        builtin type that any interpreter unpickles (the pool reads a batch at once)."""
        entry = pickle.dumps((task_id, status, started, finished, value), 3)[3:-4]
        start = self._end
        end = start + len(entry)
        if end > self.size:
            return False
        self._map[start:end] = entry
        self._committed[0] = end
        self._end = end
        return True

    def pending(self) -> memoryview | None:
        """The message to send: every entry committed since the last `clear`."""
        return memoryview(self._map)[_HEADER:self._end] if self._end > _START else None

    def clear(self) -> None:
        self._end = self._committed[0] = _START

    # -- the pool's side, once the worker is gone ------------------------------------------------

    def committed(self) -> bytes:
        """Every entry the worker committed and had not yet sent (or just sent)."""
        return self._map[_HEADER:min(max(self._committed[0], _START), self.size)]

    def close(self) -> None:
        self._committed.release()
        self._map.close()
        os.close(self.fd)


def read_items(message: bytes | bytearray) -> list[Any]:
    """The items of an `OUTCOMES` message (or of a journal's committed part): five an entry,
    ``task id, status, started, finished, value``, in the order they ran."""
    items: list[Any] = pickle.loads(message + _END)
    return items


def entries(message: bytes | bytearray) -> Iterator[Entry]:
    """The entries of an `OUTCOMES` message, as tuples."""
    items = iter(read_items(message))
    return zip(items, items, items, items, items, strict=True)
