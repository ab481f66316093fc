"""The caller's side of a worker's spill file, a file in memory where it writes large responses.

A part that is copied (a `bytes` response, or a pickle) is read into a new object (`Copy`), a
large one while its worker writes it; a part that is mapped (an out-of-band buffer, a numpy
array's data) stays in the file's pages (`Buffer`). A copied part's pages are freed after
delivery (`free`).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any, NoReturn

from ._pipe import yield_cpu

_REMOVE = getattr(mmap, "MADV_REMOVE", 0)  # Linux: free the pages and the file's memory
#: Seconds `Copy.follow` waits for its worker to write more before it leaves the rest for later.
PATIENCE = 0.002


class Copy:
    """A copied part of a large response, read into a new `bytes` while its worker writes it.

    Writing 50 MB into the spill file and reading it out cost about the same (fresh memory, page
    by page); reading each page as soon as it is written takes the two together about as long
    as the slower one. Where the C API cannot make a blank `bytes` to fill, the part is read
    whole once written.
    """

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.size = fd, offset, size
        self.done = 0  #: bytes read so far
        self._blank = _blank_bytes(size)

    def follow(self, patience: float = PATIENCE) -> None:
        """Read what is written, until the whole part is or nothing more came for `patience`
        seconds (the worker slowed down, stopped or died: `finish` reads the rest later)."""
        if self._blank is None:
            return
        clock = time.monotonic
        since = clock()
        while self.done < self.size:
            if self._read_more():
                since = clock()
            elif clock() - since > patience:
                return
            else:
                yield_cpu()

    def finish(self) -> bytes:
        """The whole part, once its worker has written all of it."""
        if self._blank is None:
            return read(self.fd, self.size, self.offset)
        data, view = self._blank
        with view:
            while self.done < self.size:
                if not self._read_more():
                    _short()
        return data

    def _read_more(self) -> int:
        """Read on from `done` up to what is written (the file's end); how many bytes."""
        assert self._blank is not None
        got = os.preadv(self.fd, [self._blank[1][self.done:]], self.offset + self.done)
        self.done += got
        return got


def read(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes of the file `fd` from `offset`, as a new `bytes`."""
    data = os.pread(fd, size, offset)
    if len(data) < size:  # one read returns at most about 2 GB
        parts = [data]
        while (done := sum(map(len, parts))) < size:
            parts.append(os.pread(fd, size - done, offset + done) or _short())
        data = b"".join(parts)
    return data


def _short() -> NoReturn:
    raise EOFError("the spill file is shorter than announced")


def free(fd: int, offset: int, size: int) -> None:
    """Free the memory of `size` bytes of the file `fd` from `offset` (a hole remains)."""
    if size and _REMOVE:
        with mmap.mmap(fd, size, offset=offset) as pages:
            pages.madvise(_REMOVE)


class Buffer(mmap.mmap):
    """An out-of-band buffer of a response, mapped from its worker's spill file with no copy.

    The mapping is private, as memory of one's own: a write copies its page, and a child forked
    later keeps its own view. The pages leave the file when the last object made on the buffer
    is freed (through a second, shared mapping: only such a mapping may free a file's pages),
    unless the process forked meanwhile, for the child may still read them: they then go with
    the spill file, when the worker is gone and no mapping is left.
    """

    __slots__ = ("_file", "_forks")
    _file: mmap.mmap  #: the same pages, shared: what frees them
    _forks: int  #: `_forks` when it was made

    def __new__(cls, fd: int, length: int, offset: int) -> Buffer:
        file = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, offset=offset)
        self = super().__new__(cls, fd, length, flags=mmap.MAP_PRIVATE, offset=offset)
        self._file, self._forks = file, _forks
        return self

    def __del__(self) -> None:
        with self._file:
            if self._forks == _forks and _REMOVE:
                self._file.madvise(_REMOVE)


_forks = 0  #: how many times this process forked: buffers older than a fork are shared


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(before=_count_fork)


def _blank_bytes(size: int) -> tuple[bytes, memoryview] | None:
    """A new `bytes` of `size` unset bytes, and a writable view of it to fill before anything
    else sees it; None where ctypes cannot."""
    global _c_api
    if _c_api is None:
        _c_api = _load_c_api()
    if not _c_api:
        return None
    new_bytes, address_of, view_of = _c_api
    data = new_bytes(None, size)
    return data, view_of(address_of(data), size, _PyBUF_WRITE)


_PyBUF_WRITE = 0x200
_c_api: tuple[Any, ...] | None = None  #: the C functions `_blank_bytes` uses; () if none


def _load_c_api() -> tuple[Any, ...]:
    try:
        import ctypes

        api = ctypes.pythonapi  # [name]: a function of our own
        new_bytes, address_of = api["PyBytes_FromStringAndSize"], api["PyBytes_AsString"]
        view_of = api["PyMemoryView_FromMemory"]
    except (ImportError, AttributeError):  # no ctypes, or not CPython
        return ()
    new_bytes.argtypes, new_bytes.restype = (ctypes.c_void_p, ctypes.c_ssize_t), ctypes.py_object
    address_of.argtypes, address_of.restype = (ctypes.py_object,), ctypes.c_void_p
    view_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    view_of.restype = ctypes.py_object
    return new_bytes, address_of, view_of
