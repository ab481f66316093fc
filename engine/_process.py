"""Worker processes: a fresh interpreter each, started by fork+exec.

Fork+exec (``subprocess``, which execs at once in the child) is safe whatever the caller's
threads hold, on every Python version. The child imports only the worker's modules, not the
caller's ``__main__``, so it is serving some tens of milliseconds after it was asked for. Its
pipes, journal and spill file are inherited file descriptors; the caller's ``sys.path`` is its
first message, so targets import in the worker as they do in the caller. A large response is
read from the spill file here (`engine._spill`).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from . import _spill
from ._journal import Journal
from ._pipe import Pipe


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except (AttributeError, OSError):  # not Linux, or a kernel older than 5.3
        return False


_HAVE_PIDFD = _pidfd_works()
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from engine._worker import main; main(sys.argv[1:])")


class WorkerProcess:
    """One worker interpreter, with the caller's ends of its pipes and its journal."""

    def __init__(self, journal_size: int, initializer: bytes | None, nudge: int) -> None:
        """`nudge`: the write end of a pipe that wakes the pool's manager (see `engine._worker`)."""
        tasks_r, tasks_w = os.pipe()
        outcomes_r, outcomes_w = os.pipe()
        acks_r, acks_w = os.pipe()
        # Where the kernel has no pidfd, a pipe only the child holds says when it exits.
        exit_r, exit_w = (None, None) if _HAVE_PIDFD else os.pipe()
        self.journal = Journal.create(journal_size)
        self.spill = Journal.shared_file(0)  #: where the worker writes large responses
        child_fds = (tasks_r, outcomes_w, self.journal.fd)
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_PARENT,
                 *map(str, child_fds), str(journal_size), str(self.spill), str(acks_r),
                 str(os.getpid()), str(nudge)],
                pass_fds=(*child_fds, self.spill, acks_r, nudge,
                          *(() if exit_w is None else (exit_w,))),
                stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (tasks_w, outcomes_r, acks_w, self.spill, exit_r):
                if fd is not None:
                    os.close(fd)
            self.journal.close()
            raise
        finally:
            for fd in (tasks_r, outcomes_w, acks_r, exit_w):
                if fd is not None:
                    os.close(fd)
        self.pid: int = self._popen.pid
        self._closed = False
        self._copied: tuple[int, int] | None = None  # the spill's part read last: to give back
        self._copy: _spill.Copy | None = None  # a part read while the worker writes it
        self.tasks = Pipe(tasks_w)
        #: how many bytes the task pipe holds: what may be sent ahead without blocking
        self.pipe_bytes = _enlarge(tasks_w, 1 << 20)
        self.outcomes = Pipe(outcomes_r)
        self.acks = acks_w  #: a byte here tells the worker its spill file was read
        #: readable once the process has exited: for `multiprocessing.connection.wait`
        self.sentinel: int = os.pidfd_open(self.pid) if exit_r is None else exit_r
        try:
            self.tasks.send_bytes(pickle.dumps((sys.path, initializer)))
        except OSError:
            pass  # it died already: its sentinel says so, and the pool reaps it as usual

    @property
    def exitcode(self) -> int | None:
        """None while it runs; then its exit status, or minus the signal that killed it."""
        return self._popen.poll()

    def join(self, timeout: float | None) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Close the caller's ends; call once it has exited."""
        self._closed, self._copy = True, None
        self.tasks.close()
        self.outcomes.close()
        self.journal.close()
        for fd in (self.spill, self.acks, self.sentinel):
            os.close(fd)

    def follow(self, offset: int, size: int) -> None:
        """Read the copied part of a large response the worker is writing at (offset, size)
        for as long as it keeps writing; `read_spill` takes it from there."""
        try:
            copy = _spill.Copy(self.spill, offset, size)
            copy.follow()
        except Exception:  # e.g. no memory for it: `read_spill` tries again, and reports
            return
        self._copy = copy

    def read_spill(self, raw: bool, places: list[tuple[int, int]]) -> object:
        """The large response the worker wrote to its spill file at `places`, (offset, size)
        each: the `bytes` response or the pickle (the first) is copied; the pickle's
        out-of-band buffers are mapped with no copy (`engine._spill.Buffer`), so a numpy array
        is made on the pages the worker wrote. The worker writes no other response until
        `release_spill`."""
        (offset, size), *buffers = places
        copy, self._copy = self._copy, None
        if copy is None or (copy.offset, copy.size) != (offset, size):
            copy = _spill.Copy(self.spill, offset, size)
        self._copied = offset, size
        data = copy.finish()
        if raw:
            return data
        return pickle.loads(data, buffers=[_spill.Buffer(self.spill, length, at)
                                           for at, length in buffers])

    def release_spill(self) -> None:
        """Free the part of the spill file read last, and tell the worker it may write the next
        response (freeing 50 MB takes some milliseconds: the pool does it after delivering)."""
        if self._closed:
            return
        if self._copied is not None:
            _spill.free(self.spill, *self._copied)
            self._copied = None
        try:
            os.write(self.acks, b"\0")
        except OSError:
            pass  # it is gone


def _enlarge(fd: int, size: int) -> int:
    """Ask for a pipe buffer of `size` bytes (Linux); the size it has."""
    try:
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):  # not Linux, or over the system's limit
        return 1 << 16  # Linux's default
