"""The callback pool: callbacks run here, never on the thread that records results.

Threads are started as the backlog needs them, up to a limit, and are daemons so that nothing a
callback does can keep the interpreter from exiting; `Engine` drains them at exit instead. The
standard `ThreadPoolExecutor` is not used by default because it refuses new work once the
interpreter begins to exit, while results still arriving then must get their callbacks.
Callbacks can also go to any `concurrent.futures.Executor` given (a process pool, say); they
then travel with cloudpickle.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from ._context import CallContext, _current

logger = logging.getLogger("engine")

Callback = Callable[[dict[str, Any]], Any]


@dataclasses.dataclass(slots=True)
class CallbackStats:
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0  #: callbacks that raised (each one logged)
    max_lag: float = 0.0  #: the longest a callback waited in the backlog, seconds

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def backlog(self) -> int:
        """Callbacks submitted and not finished: queued or running."""
        return self.submitted - self.finished


@dataclasses.dataclass(slots=True)
class _Job:
    fn: Callback
    name: str
    payload: dict[str, Any]
    context: CallContext
    done: Callable[[], None]  #: called once when the callback returned or raised
    queued: float  #: monotonic seconds


class CallbackPool:
    """Runs each submitted callback once, in isolation: one that raises is logged and counted."""

    def __init__(self, max_workers: int, executor: concurrent.futures.Executor | None = None):
        if max_workers < 1:
            raise ValueError(f"callback_workers must be at least 1, not {max_workers}")
        self._max_workers = max_workers
        self._executor = executor
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._running: dict[int, str] = {}  # thread ident -> name of the callback it runs
        self._lock = threading.Lock()
        self.stats = CallbackStats()

    def submit(self, fn: Callback, name: str, payload: dict[str, Any], context: CallContext,
               done: Callable[[], None]) -> None:
        """Queue one call of `fn(payload)`; never blocks."""
        job = _Job(fn, name, payload, context, done, time.monotonic())
        with self._lock:
            self.stats.submitted += 1
        if self._executor is not None:
            self._submit_to_executor(job)
            return
        self._queue.put(job)
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if len(self._threads) < self._max_workers:
                    thread = threading.Thread(target=self._serve, daemon=True,
                                              name=f"engine-callback-{len(self._threads)}")
                    self._threads.append(thread)
                    thread.start()

    def owns_current_thread(self) -> bool:
        """True on one of this pool's threads: a callback must not wait for its own pool."""
        return threading.current_thread() in self._threads

    def running(self) -> list[str]:
        """Names of the callbacks running now."""
        with self._lock:
            return list(self._running.values())

    def shutdown(self, timeout: float | None = None) -> list[str]:
        """Run what is queued, stop the threads; the names of callbacks still running at timeout."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.running()

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            self._call(job)
            self._idle.release()

    def _call(self, job: _Job) -> None:
        ident = threading.get_ident()
        with self._lock:
            self._running[ident] = job.name
            self.stats.max_lag = max(self.stats.max_lag, time.monotonic() - job.queued)
        token = _current.set(job.context)
        try:
            job.fn(job.payload)
        except BaseException as exc:
            self._finished(job, exc)
        else:
            self._finished(job, None)
        finally:
            _current.reset(token)
            with self._lock:
                self._running.pop(ident, None)

    def _submit_to_executor(self, job: _Job) -> None:
        assert self._executor is not None
        blob = cloudpickle.dumps((job.fn, job.payload, job.context))
        try:
            future = self._executor.submit(_call_pickled, blob)
        except BaseException as exc:  # a broken or shut-down executor still counts the call
            self._finished(job, exc)
            return
        future.add_done_callback(lambda f: self._finished(job, f.exception()))

    def _finished(self, job: _Job, exc: BaseException | None) -> None:
        with self._lock:
            if exc is None:
                self.stats.succeeded += 1
            else:
                self.stats.failed += 1
        if exc is not None:
            logger.error("engine callback %s for cid %s (%s) raised", job.name, job.context.cid,
                         job.context.channel, exc_info=(type(exc), exc, exc.__traceback__))
        try:
            job.done()
        except BaseException:
            logger.critical("engine failed to account for callback %s", job.name, exc_info=True)


def _call_pickled(blob: bytes) -> None:
    """Run a callback in an executor's process, with its context set as on the thread pool."""
    fn, payload, context = cloudpickle.loads(blob)
    token = _current.set(context)
    try:
        fn(payload)
    finally:
        _current.reset(token)
