"""Messages over a pipe: a length, then the bytes, as `multiprocessing.connection` frames them.

Both ends use it: the pool on its ends of each worker's pipes, the worker on its own. It is
small and imports almost nothing, which matters for a worker's start-up.
"""

from __future__ import annotations

import math
import os
import select
import struct
import time

#: give the CPU to whatever else is ready to run (a no-op where the system has no call for it)
yield_cpu = getattr(os, "sched_yield", lambda: None)


class Pipe:
    """One end of a pipe that carries whole messages."""

    _SIZE, _LARGE_SIZE = struct.Struct("!i"), struct.Struct("!Q")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # not select.select: it cannot watch descriptors past 1023
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

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
        return bool(self._poller.poll(0))

    def wait(self, seconds: float, spin: float = 0.0) -> bool:
        """Whether a message (or the end of the pipe) comes within `seconds`; for the first
        `spin` of them, watched for without sleeping (yielding the CPU to whatever else is ready
        to run): a process asleep in a read wakes some tens of microseconds after the write,
        and the write takes longer too."""
        poll, clock = self._poller.poll, time.monotonic
        start = clock()
        while not poll(0):
            waited = clock() - start
            if waited >= spin:
                return bool(poll(max(0, math.ceil((seconds - waited) * 1e3))))
            yield_cpu()
        return True

    def unread(self) -> bool:
        """Whether bytes written to the pipe are not read yet (True where that is unknown)."""
        count = bytearray(4)
        try:
            import fcntl  # (imported when first needed: a worker starts faster without)
            import termios

            fcntl.ioctl(self._fd, termios.FIONREAD, count)
        except (ImportError, AttributeError, OSError):
            return True
        return count != bytes(4)

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
