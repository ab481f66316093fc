"""Messages over a pipe: a length, then the bytes, as `multiprocessing.connection` frames them.

Both ends use it: the pool on its ends of each worker's pipes, the worker on its own. It is
small and imports almost nothing, which matters for a worker's start-up.
"""

from __future__ import annotations

import os
import select
import struct


class Pipe:
    """One end of a pipe that carries whole messages."""

    _SIZE, _LARGE_SIZE = struct.Struct("!i"), struct.Struct("!Q")

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send_bytes(self, data: bytes | memoryview) -> None:
        size = len(data)
        if size <= 0x7FFFFFFF:
            header = self._SIZE.pack(size)
        else:
            header = self._SIZE.pack(-1) + self._LARGE_SIZE.pack(size)
        if size <= 1 << 16:
            self._write(header + data)  # one system call for a small message
        else:
            self._write(header)
            self._write(data)  # no copy of a large one

    def fileno(self) -> int:
        return self._fd

    def poll(self) -> bool:
        """Whether a message (or the end of the pipe) can be read without waiting."""
        poller = select.poll()  # not select.select: it cannot watch descriptors past 1023
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def recv_bytes(self) -> bytearray:
        (size,) = self._SIZE.unpack(self._read(4))
        if size == -1:
            (size,) = self._LARGE_SIZE.unpack(self._read(8))
        return self._read(size)

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _read(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:
            count = os.readv(self._fd, [view[done:]])
            if count == 0:
                raise EOFError("the other end closed the pipe")
            done += count
        return buffer
