"""A worker's outcome journal: memory shared with the pool that outlives the worker.

A worker runs a batch of targets and reports their outcomes together, which is what makes
small targets fast. Outcomes not yet sent must not die with the worker, so each one is written
here the moment it exists (a memory copy, no system call), and the journal's bytes are what is
sent. If the worker dies mid-batch, the pool reads the outcomes from the journal instead.

The entries are one pickle stream, so that the pool reads a whole batch with one `pickle.loads`
into one flat list, five items an entry (no object per entry for the garbage collector): after
an 8-byte header holding the end of the committed entries come ``PROTO 3`` and ``MARK``, then
the entries, each the opcodes of its items ``task id, value, status, started, finished``; the
reader closes the list (``LIST``, ``STOP``). The opcodes are packed with `struct` (a task id
as ``LONG1``, a status as ``BININT1``, times as ``BINFLOAT``; a value that is ``None``, a 32-bit
int, a float, a str or bytes (a pickled response is bytes) as ``NONE``, ``BININT``,
``BINFLOAT``, ``BINUNICODE`` or ``BINBYTES``): a worker writes an entry in a fraction of what
pickling it costs. Any other value is the pickle of it alone, less ``PROTO`` and ``STOP``;
protocol 3 names its memo slots explicitly (4 and later number them implicitly), so such
pickles concatenate: each entry's references are to slots it set itself. The header is updated
only after an entry is complete, so a reader never sees half an entry.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing is not imported at run time: workers start faster without it)
    from collections.abc import Iterator
    from typing import Any

    Entry = tuple[int, Any, int, float, float]  #: task id, value, status, started, finished

OUTCOMES = b"\x80\x03("  #: the start of every message of entries: PROTO 3, MARK
_END = b"l."  #: LIST, STOP: what the reader appends
_HEADER = 8  #: bytes of the header: the end of the committed entries, an unsigned 64-bit int
_START = _HEADER + len(OUTCOMES)
_LONG1, _NONE, _BININT, _BININT1, _BINFLOAT = 0x8A, 0x4E, 0x4A, 0x4B, 0x47
_BINUNICODE, _BINBYTES = 0x58, 0x42
_ID = struct.Struct("<BBq")  #: the task id: LONG1 of 8 bytes (pickle's ints are little-endian)
_ID_NONE = struct.Struct("<BBqB")  #: ... and a None value
_ID_INT = struct.Struct("<BBqBi")  #: ... and a 32-bit int value
_ID_SIZED = struct.Struct("<BBqBI")  #: ... and the opcode and size of a str's or bytes' value
_REST = struct.Struct(">BBBdBd")  #: status, started, finished (BINFLOAT is big-endian)
_FLOAT_REST = struct.Struct(">BdBBBdBd")  #: a float value, then the rest


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
        start, kind = self._end, type(value)
        if value is None:
            middle = start + _ID_NONE.size
            if middle + _REST.size > self.size:
                return False
            _ID_NONE.pack_into(self._map, start, _LONG1, 8, task_id, _NONE)
        elif kind is int and -0x80000000 <= value < 0x80000000:
            middle = start + _ID_INT.size
            if middle + _REST.size > self.size:
                return False
            _ID_INT.pack_into(self._map, start, _LONG1, 8, task_id, _BININT, value)
        elif kind is bytes or kind is str:
            body = value if kind is bytes else value.encode("utf-8", "surrogatepass")
            middle = start + _ID_SIZED.size + len(body)
            if middle + _REST.size > self.size:
                return False
            _ID_SIZED.pack_into(self._map, start, _LONG1, 8, task_id,
                                _BINBYTES if kind is bytes else _BINUNICODE, len(body))
            self._map[middle - len(body):middle] = body
        elif kind is float:
            end = start + _ID.size + _FLOAT_REST.size
            if end > self.size:
                return False
            _ID.pack_into(self._map, start, _LONG1, 8, task_id)
            _FLOAT_REST.pack_into(self._map, start + _ID.size, _BINFLOAT, value, _BININT1, status,
                                  _BINFLOAT, started, _BINFLOAT, finished)
            self._end = self._committed[0] = end
            return True
        else:
            body = pickle.dumps(value, 3)[2:-1]
            middle = start + _ID.size + len(body)
            if middle + _REST.size > self.size:
                return False
            _ID.pack_into(self._map, start, _LONG1, 8, task_id)
            self._map[middle - len(body):middle] = body
        _REST.pack_into(self._map, middle, _BININT1, status, _BINFLOAT, started, _BINFLOAT,
                        finished)
        self._end = self._committed[0] = middle + _REST.size
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
    ``task id, value, status, started, finished``, in the order they ran."""
    items: list[Any] = pickle.loads(message + _END)
    return items


def entries(message: bytes | bytearray) -> Iterator[Entry]:
    """The entries of an `OUTCOMES` message, as tuples."""
    items = iter(read_items(message))
    return zip(items, items, items, items, items, strict=True)
