"""The callback pool: callbacks run here, never on the thread that records results.

One thread is started with the pool (so that callbacks run even where no thread may start, as
at interpreter exit on CPython 3.12: gh-113964), more as the backlog needs them, up to a limit;
they are daemons so that nothing a callback does can keep the interpreter from exiting;
`Engine` drains them at exit instead. The
standard `ThreadPoolExecutor` is not used by default because it refuses new work once the
interpreter begins to exit, while results still arriving then must get their callbacks.
Callbacks can also go to any `concurrent.futures.Executor` given (a process pool, say); they
then travel with cloudpickle.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle

from ._context import CallContext
from ._running import current

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


Context = CallContext | tuple[Any, ...]  #: a CallContext, or the tuple of its fields
Job = tuple[Callback, str, dict[str, Any], Context, Callable[[], None]]
"""(callback, its name, payload, context, done): `done` is called once it returned or raised."""


class CallbackPool:
    """Runs each submitted callback once, in isolation: one that raises is logged and counted.

    Jobs wait in one deque that every thread takes from; a burst of jobs wakes as many sleeping
    threads as it needs, at once, instead of one wake-up per job, and starts more (see `_grow`).
    """

    def __init__(self, max_workers: int, executor: concurrent.futures.Executor | None = None):
        if max_workers < 1:
            raise ValueError(f"callback_workers must be at least 1, not {max_workers}")
        self._max_workers = max_workers
        self._executor = executor
        self._jobs: collections.deque[tuple[Job, float]] = collections.deque()  # (job, queued)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sleeping = 0  # threads waiting on `_wake`
        self._blocked = 0  # threads whose callback waits for other callbacks (`waiting`)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count()  # thread names: threads come and go (`_retire`)
        self._running: dict[int, str] = {}  # thread ident -> name of the callback it runs
        self._cannot_grow = False  # a thread failed to start: said once
        self.stats = CallbackStats()
        if executor is None:
            self._threads.append(self._new_thread())
            self._threads[0].start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue one call of each job's callback; never blocks."""
        if not jobs:
            return
        with self._lock:
            self.stats.submitted += len(jobs)
        if self._executor is not None:
            for job in jobs:
                self._submit_to_executor(job)
            return
        queued = time.monotonic()
        self._jobs.extend((job, queued) for job in jobs)
        with self._lock:
            self._wake.notify(min(len(jobs), self._sleeping))
        self._grow()

    def _grow(self) -> None:
        """Start one more thread if more jobs wait than threads sleep (woken or not), and the
        limit allows. One at a time: `Thread.start` waits until the new thread runs, which takes
        a GIL switch interval (5 ms) while other threads run callbacks; so a thread that starts
        or wakes to a backlog starts the next one, and the thread that submits (the one
        recording results) waits for one start at most."""
        with self._lock:
            if len(self._jobs) <= self._sleeping or self._stopping \
                    or len(self._threads) >= self._limit:
                return
            thread = self._new_thread()
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # none may start (exit, limits): the others serve
            with self._lock:
                self._threads.remove(thread)
                said, self._cannot_grow = self._cannot_grow, True
            if not said:
                logger.warning("engine could not start a callback thread (%s); %d serve the "
                               "backlog", exc, len(self._threads))

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._serve, daemon=True,
                                name=f"engine-callback-{next(self._numbers)}")

    @property
    def _limit(self) -> int:
        """How many threads may run now: one more for each that waits (`waiting`)."""
        return self._max_workers + self._blocked

    def owns_current_thread(self) -> bool:
        """True on one of this pool's threads: a callback must not wait for its own pool."""
        return threading.current_thread() in self._threads

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a callback's wait for other callbacks to finish (`Engine.wait` on one of this
        pool's threads): those may be queued behind it, so while it waits one more thread may
        serve the backlog. Surplus threads exit once the wait is over."""
        with self._lock:
            self._blocked += 1
        self._grow()
        try:
            yield
        finally:
            with self._lock:
                self._blocked -= 1

    def running(self) -> list[str]:
        """Names of the callbacks running now."""
        return list(self._running.values())

    def shutdown(self, timeout: float | None = None) -> list[str]:
        """Run what is queued, stop the threads; the names of callbacks still running at timeout."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.running()

    def _serve(self) -> None:
        ident, woken = threading.get_ident(), True
        while True:
            if len(self._threads) > self._limit and self._retire():
                return
            try:
                job, queued = self._jobs.popleft()
            except IndexError:
                with self._lock:
                    while not self._jobs and not self._stopping:
                        self._sleeping += 1
                        self._wake.wait()
                        self._sleeping -= 1
                    if not self._jobs:
                        return  # stopping, and nothing is left to run
                woken = True
                continue
            if woken:  # started or woken by a burst, which may need another thread
                self._grow()
                woken = False
            lag = time.monotonic() - queued
            if lag > self.stats.max_lag:
                self.stats.max_lag = lag
            self._running[ident] = job[1]
            try:
                self._call(job)
            finally:
                del self._running[ident]

    def _retire(self) -> bool:
        """Leave the pool if it has more threads than it may (a wait that needed one ended)."""
        with self._lock:
            if len(self._threads) <= self._limit:
                return False
            self._threads.remove(threading.current_thread())
            if self._jobs:  # it may have been woken for one: another thread takes it
                self._wake.notify()
            return True

    def _call(self, job: Job) -> None:
        fn, _, payload, context, _ = job
        token = current.set(context)
        try:
            fn(payload)
        except BaseException as exc:
            self._finished(job, exc)
        else:
            self._finished(job, None)
        finally:
            current.reset(token)

    def _submit_to_executor(self, job: Job) -> None:
        assert self._executor is not None
        fn, _, payload, context, _ = job
        blob = cloudpickle.dumps((fn, payload, context))
        try:
            future = self._executor.submit(_call_pickled, blob)
        except BaseException as exc:  # a broken or shut-down executor still counts the call
            self._finished(job, exc)
            return
        future.add_done_callback(lambda f: self._finished(job, f.exception()))

    def _finished(self, job: Job, exc: BaseException | None) -> None:
        fn, name, _, context, done = job
        with self._lock:
            if exc is None:
                self.stats.succeeded += 1
            else:
                self.stats.failed += 1
        if exc is not None:
            cid, channel = (context[1], context[0]) if isinstance(context, tuple) \
                else (context.cid, context.channel)
            logger.error("engine callback %s for cid %s (%s) raised", name, cid, channel,
                         exc_info=(type(exc), exc, exc.__traceback__))
        try:
            done()
        except BaseException:
            logger.critical("engine failed to account for callback %s", name, exc_info=True)


def _call_pickled(blob: bytes) -> None:
    """Run a callback in an executor's process, with its context set as on the thread pool."""
    fn, payload, context = cloudpickle.loads(blob)
    token = current.set(context)
    try:
        fn(payload)
    finally:
        current.reset(token)
