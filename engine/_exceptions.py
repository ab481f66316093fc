"""The exceptions the engine raises or puts into a failed `Result`.

::

    EngineError
     ├── InvocationError (ValueError)       invoke() refused its input; nothing was started
     │    ├── UnknownNameError (LookupError) a target or callback name that resolves to nothing
     │    └── DuplicateCidError              the CID belongs to an invocation still active
     ├── EngineClosedError (RuntimeError)    invoke() after shutdown() began
     └── TargetError                         why a target has no response (Result.exception)
          ├── WorkerCrashedError             its worker process died while running it
          ├── WorkerStartError               no worker process could be started for it
          ├── EngineBrokenError              the engine itself failed (a bug: see the log)
          ├── TargetTimeoutError (TimeoutError)      it ran past its time limit; worker killed
          ├── MemoryLimitError (MemoryError)         its worker grew past the memory limit; killed
          ├── TargetCancelledError (CancelledError)  cancel() or shutdown(cancel=True) stopped it
          ├── SerializationError             its function, request or response could not be pickled
          └── RemoteError                    it raised an exception that could not be pickled back

A target that raises an ordinary exception gets that very exception in `Result.exception`, not
one of these. Every class pickles, and prints as ``engine.X``.
"""

from __future__ import annotations

import concurrent.futures
import signal


class EngineError(Exception):
    """Base class of every exception the engine defines."""


class InvocationError(EngineError, ValueError):
    """Raised by `invoke`/`fanout` for input it refuses; no target of that call was started."""


class UnknownNameError(InvocationError, LookupError):
    """A target or callback name is neither registered nor an importable ``module:function``."""

    def __init__(self, kind: str, name: str, suggestions: list[str] | tuple[str, ...] = (),
                 reason: str = "") -> None:
        self.kind, self.name, self.suggestions, self.reason = kind, name, tuple(suggestions), reason
        close = ", ".join(map(repr, self.suggestions))
        hint = f"; did you mean {close}?" if close else ""
        why = f" ({reason})" if reason else ""
        super().__init__(f"unknown {kind} {name!r}{why}{hint}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.kind, self.name, self.suggestions, self.reason)


class DuplicateCidError(InvocationError):
    """The CID given to `invoke` belongs to an invocation that has not finished yet."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        super().__init__(f"CID {cid!r} belongs to an invocation that is still active")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.cid,)


class EngineClosedError(EngineError, RuntimeError):
    """`invoke` was called after `shutdown` began."""


class TargetError(EngineError):
    """Base class of the reasons a target has no response other than its own exception."""


def describe_exit(exitcode: int | None) -> str:
    """``SIGSEGV`` for a death by signal, ``EXIT(1)`` for an exit code, as loky names them."""
    if exitcode is None:
        return "UNKNOWN"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"SIGNAL({-exitcode})"
    return f"EXIT({exitcode})"


class WorkerCrashedError(TargetError):
    """The worker process running the target died (signal, ``os._exit``, OOM kill)."""

    def __init__(self, target: str, pid: int | None, exitcode: int | None) -> None:
        self.target, self.pid, self.exitcode = target, pid, exitcode
        self.cause = describe_exit(exitcode)
        super().__init__(f"worker {pid} died with {self.cause} while running target {target!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.pid, self.exitcode)


class WorkerStartError(TargetError):
    """Worker processes keep dying before they are ready, so the target could not run."""

    def __init__(self, target: str, reason: str) -> None:
        self.target, self.reason = target, reason
        super().__init__(f"no worker could be started for target {target!r}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.reason)


class EngineBrokenError(TargetError):
    """The engine's own machinery failed, so the target could not run. A bug: it is logged."""

    def __init__(self, target: str, reason: str) -> None:
        self.target, self.reason = target, reason
        super().__init__(f"the engine cannot run target {target!r}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.reason)


class TargetTimeoutError(TargetError, TimeoutError):
    """The target ran longer than its time limit; its worker was killed and replaced."""

    def __init__(self, target: str, timeout: float, pid: int | None) -> None:
        self.target, self.timeout, self.pid = target, timeout, pid
        super().__init__(f"target {target!r} timed out after {timeout:g} s; "
                         f"worker {pid} was killed")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.timeout, self.pid)


class MemoryLimitError(TargetError, MemoryError):
    """The target's worker grew past `max_memory_per_worker` while running it, and was killed."""

    def __init__(self, target: str, limit: int, rss: int, pid: int | None) -> None:
        self.target, self.limit, self.rss, self.pid = target, limit, rss, pid
        super().__init__(f"target {target!r} ran out of its memory limit: worker {pid} used "
                         f"{rss:,} bytes, over the limit of {limit:,}, and was killed")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.limit, self.rss, self.pid)


class TargetCancelledError(TargetError, concurrent.futures.CancelledError):
    """The target was cancelled: before it started, or while running (its worker was killed)."""

    def __init__(self, target: str, running: bool) -> None:
        self.target, self.running = target, running
        how = "while running; its worker was killed" if running else "before it started"
        super().__init__(f"target {target!r} was cancelled {how}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.running)


class SerializationError(TargetError):
    """The target's function, request or response could not be pickled or unpickled."""

    def __init__(self, target: str, what: str, detail: str) -> None:
        self.target, self.what, self.detail = target, what, detail
        super().__init__(f"the {what} of target {target!r} could not be pickled: {detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.target, self.what, self.detail)


class RemoteError(TargetError):
    """The target raised an exception that could not travel back; this carries its facts."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        self.type_name, self.message, self.traceback = type_name, message, traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.type_name, self.message, self.traceback)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}\n\nRemote traceback:\n{self.traceback}"


for _public in (EngineError, InvocationError, UnknownNameError, DuplicateCidError,
                EngineClosedError, TargetError, WorkerCrashedError, WorkerStartError,
                EngineBrokenError, TargetTimeoutError, MemoryLimitError, TargetCancelledError,
                SerializationError, RemoteError):  # reprs and pickles say engine.X
    _public.__module__ = "engine"
