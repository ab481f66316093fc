"""Worker processes: a fresh interpreter each, started by fork+exec.

Fork+exec (``subprocess``, which execs at once in the child) is safe whatever the caller's
threads hold, on every Python version. The child imports only the worker's modules, not the
caller's ``__main__``, so it is serving some tens of milliseconds after it was asked for. Its
pipes and journal are inherited file descriptors; the caller's ``sys.path`` is its first message,
so targets import in the worker as they do in the caller.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from multiprocessing.connection import Connection

from ._journal import Journal

_HAVE_PIDFD = hasattr(os, "pidfd_open")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from engine._worker import main; main(sys.argv[1:])")


class WorkerProcess:
    """One worker interpreter, with the caller's ends of its pipes and its journal."""

    def __init__(self, journal_size: int, initializer: bytes | None) -> None:
        tasks_r, tasks_w = os.pipe()
        outcomes_r, outcomes_w = os.pipe()
        # Where the kernel has no pidfd, a pipe only the child holds says when it exits.
        exit_r, exit_w = (None, None) if _HAVE_PIDFD else os.pipe()
        self.journal = Journal.create(journal_size)
        child_fds = (tasks_r, outcomes_w, self.journal.fd)
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_PARENT,
                 *map(str, child_fds), str(journal_size), str(os.getpid())],
                pass_fds=child_fds if exit_w is None else (*child_fds, exit_w),
                stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (tasks_w, outcomes_r, exit_r):
                if fd is not None:
                    os.close(fd)
            self.journal.close()
            raise
        finally:
            for fd in (tasks_r, outcomes_w, exit_w):
                if fd is not None:
                    os.close(fd)
        self.pid: int = self._popen.pid
        self.tasks = Connection(tasks_w, readable=False)
        self.outcomes = Connection(outcomes_r, writable=False)
        #: readable once the process has exited: for `multiprocessing.connection.wait`
        self.sentinel: int = os.pidfd_open(self.pid) if exit_r is None else exit_r
        self.tasks.send_bytes(pickle.dumps((sys.path, initializer)))  # fits the pipe's buffer

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
        self.tasks.close()
        self.outcomes.close()
        self.journal.close()
        os.close(self.sentinel)

