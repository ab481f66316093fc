"""The caller's side of a worker's spill file, a file in memory where it writes large responses.

A part that is copied (a `bytes` response, or a pickle) is read into a new object; a part that
is mapped (an out-of-band buffer, a numpy array's data) stays in the file's pages (`Buffer`).
A copied part's pages are freed after delivery (`free`).
"""

from __future__ import annotations

import mmap
import os
from typing import Any, NoReturn

#: A copied part this large is read into transparent huge pages. Every C library maps a block
#: this large on its own (glibc's largest threshold), so the advice concerns that block alone.
HUGE_READ_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 0)  # Linux's; given to libc's madvise
_REMOVE = getattr(mmap, "MADV_REMOVE", 0)  # Linux: free the pages and the file's memory


def read(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes of the file `fd` from `offset`, as a new `bytes`.

    A new 50 MB object costs as much in page faults as in copying: 12,800 of them. From
    `HUGE_READ_BYTES` up, the object is made blank (as C code makes one before filling it),
    advised onto huge pages (25 faults), then filled: half the time, where the system offers
    transparent huge pages on advice (Linux's default) or always.
    """
    blank = _blank_bytes(size) if size >= HUGE_READ_BYTES else None
    if blank is None:
        data = os.pread(fd, size, offset)
        if len(data) < size:  # one read returns at most about 2 GB
            parts = [data]
            while (done := sum(map(len, parts))) < size:
                parts.append(os.pread(fd, size - done, offset + done) or _short())
            data = b"".join(parts)
        return data
    data, view = blank
    with view:
        done = 0
        while done < size:
            done += os.preadv(fd, [view[done:]], offset + done) or _short()
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
    """A new `bytes` of `size` unset bytes, on huge pages where the system gives them, and a
    writable view of it to fill before anything else sees it; None where ctypes cannot."""
    global _c_api
    if _c_api is None:
        _c_api = _load_c_api()
    if not _c_api:
        return None
    new_bytes, address_of, view_of, madvise = _c_api
    data = new_bytes(None, size)
    address = address_of(data)
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
    if end > start and _MADV_HUGEPAGE:
        madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal only costs the faults
    return data, view_of(address, size, _PyBUF_WRITE)


_PyBUF_WRITE = 0x200
_c_api: tuple[Any, ...] | None = None  #: the C functions `_blank_bytes` uses; () if none


def _load_c_api() -> tuple[Any, ...]:
    try:
        import ctypes

        api, libc = ctypes.pythonapi, ctypes.CDLL(None)  # [name]: a function of our own
        new_bytes, address_of = api["PyBytes_FromStringAndSize"], api["PyBytes_AsString"]
        view_of, madvise = api["PyMemoryView_FromMemory"], libc["madvise"]
    except (ImportError, AttributeError, OSError):  # no ctypes, not CPython, no madvise
        return ()
    new_bytes.argtypes, new_bytes.restype = (ctypes.c_void_p, ctypes.c_ssize_t), ctypes.py_object
    address_of.argtypes, address_of.restype = (ctypes.py_object,), ctypes.c_void_p
    view_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    view_of.restype = ctypes.py_object
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return new_bytes, address_of, view_of, madvise
