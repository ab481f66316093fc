"""The target pool: worker processes supervised by one manager thread.

::

    engine (any thread)           manager thread "engine-manager"            worker processes
    ───────────────────           ───────────────────────────────            ────────────────
    add_feed / kill / close ──►  commands (SimpleQueue) + wake-up pipe
                                  │ waits on, never polls:
                                  │   the wake-up pipe
                                  │   each worker's outcome pipe  ◄─────────── a message per target
                                  │   each worker's sentinel      ◄─────────── the process exits
                                  │   the nearest target deadline
                                  │ sends a task to an idle worker ──────────► its own task pipe
                                  └ deliver(task, outcome): record + enqueue callbacks, never waits

Invariants:

* Only the manager thread touches workers, feeds and the requeue; other threads send commands.
* Each worker has its own pair of pipes and runs at most one task, and ``worker.task`` is that
  task, so a death or a timeout is charged to exactly the target that caused it and to no other.
* Every task taken from a feed is delivered exactly once: with its outcome, or with the reason it
  has none (crash, timeout, cancellation, pickling). A task whose worker died before it was sent
  is requeued, not failed: it never ran.
* Requests are pickled only when sent, so memory holds the work in flight, not the invocation.
* If the manager thread itself fails (a bug), every running, queued and later task fails with
  `EngineBrokenError` rather than leave a caller waiting.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import cloudpickle
import psutil
from loky.backend import get_context

from ._exceptions import (
    EngineBrokenError,
    MemoryLimitError,
    RemoteError,
    SerializationError,
    TargetCancelledError,
    TargetError,
    TargetTimeoutError,
    WorkerCrashedError,
    WorkerStartError,
    describe_exit,
)
from ._result import Outcome
from ._worker import READY, START_FAILED, serve

logger = logging.getLogger("engine")

_MAX_START_FAILURES = 3  # consecutive deaths before "ready": the pool stops spawning
_STOP_GRACE = 2.0  # seconds a worker gets to exit after being told to stop


@dataclasses.dataclass(slots=True, eq=False)
class Task:
    """One target to run: what the worker needs, plus its owner for the engine's bookkeeping."""

    owner: Any  #: the invocation it belongs to; the pool reads only its `cancelled`
    index: int
    target: str
    fn_blob: bytes
    request: Any
    timeout: float | None
    context: tuple[Any, ...]  #: the worker's CallContext, as a plain tuple
    retries: int = 0  #: further attempts allowed after a crash or a timeout
    retry_on: tuple[type[BaseException], ...] = ()  #: raised exceptions that are retried too
    attempt: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """When a worker is replaced although it is healthy."""

    max_tasks_per_worker: int | None = None
    max_memory_per_worker: int | None = None  #: bytes of resident memory
    memory_check_interval: float = 0.1  #: seconds between checks of a busy worker's memory
    initializer: bytes | None = None  #: cloudpickled (fn, args), run in each worker first


class Feed(Protocol):
    """A source of tasks, pulled only as workers free up."""

    def next_task(self) -> Task | None:
        """The next task, or None when there are no more."""


Deliver = Callable[[Task, Outcome], None]


class WorkerState(enum.Enum):
    STARTING = "starting"  #: spawned, has not said it is ready
    IDLE = "idle"  #: ready, running nothing
    BUSY = "busy"  #: running `task`


class _Worker:
    __slots__ = ("process", "tasks", "outcomes", "pid", "state", "task", "started", "deadline",
                 "tasks_run", "last_rss", "growth", "start_error")

    def __init__(self, process: Any, tasks: Connection, outcomes: Connection) -> None:
        self.process, self.tasks, self.outcomes = process, tasks, outcomes
        self.pid: int | None = process.pid
        self.state = WorkerState.STARTING
        self.task: Task | None = None
        self.started = 0.0  # epoch seconds when `task` was sent
        self.deadline: float | None = None  # monotonic seconds
        self.tasks_run = 0
        self.last_rss: int | None = None  # at the last memory check of the running task
        self.growth = 0  # consecutive checks that found it over the limit and growing
        self.start_error: str | None = None  # its initializer's traceback, if it raised

    def rss(self) -> int:
        """Resident memory in bytes, 0 if it cannot be read (the process is going)."""
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.Error, ValueError):
            return 0


@dataclasses.dataclass(slots=True)
class PoolStats:
    workers_started: int = 0
    worker_deaths: int = 0  #: workers that died or were killed while running a target
    workers_recycled: int = 0  #: healthy workers replaced: task count or memory limit
    start_failures: int = 0
    retries: int = 0  #: attempts run again after a crash, a timeout or a retried exception


class TargetPool:
    """Runs tasks from feeds on `size` worker processes; see the module docstring."""

    def __init__(self, size: int, deliver: Deliver, limits: Limits = Limits()) -> None:
        self._size = size
        self._deliver = deliver
        self._limits = limits
        self._context = get_context("loky")  # fork+exec: safe with threads, on 3.14 as well
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._retiring: list[_Worker] = []  # told to stop, not yet exited; not counted in size
        self._next_memory_check = 0.0  # monotonic seconds
        self._feeds: collections.deque[Feed] = collections.deque()
        self._requeued: collections.deque[Task] = collections.deque()
        self._closing = False
        self._consecutive_start_failures = 0
        # Why no target can run, once that is so: the error to fail each with, and its reason.
        self._broken: tuple[type[WorkerStartError | EngineBrokenError], str] | None = None
        self._accepting = True  # False once the manager thread has exited
        self._accepting_lock = threading.Lock()
        self._next_task_id = 0
        self.stats = PoolStats()
        self.pids: tuple[int, ...] = ()  # the live workers' pids, for observers
        self._thread = threading.Thread(target=self._run, name="engine-manager", daemon=True)
        self._thread.start()

    # -- the face other threads use: each call is a command to the manager thread --------------

    def add_feed(self, feed: Feed) -> None:
        if self._command("feed", feed):
            return
        while (task := feed.next_task()) is not None:  # the manager is gone: fail, never hang
            self._fail(task, self._unrunnable(task))

    def kill_running(self, owner: Any, reason: Callable[[Task], TargetError]) -> None:
        """Kill the workers running tasks of `owner`; each such task fails with `reason(task)`."""
        self._command("kill", owner, reason)

    def close(self) -> None:
        """Finish every feed and running task, then stop the workers and the manager thread."""
        self._command("close")

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _command(self, *command: Any) -> bool:
        """Queue a command and wake the manager; False if the manager thread has exited."""
        with self._accepting_lock:  # never write to the wake-up pipe once it may be closed
            if not self._accepting:
                return False
            self._commands.put(command)
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway
            return True

    # -- the manager thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._take_commands()
                self._spawn_missing()
                self._dispatch()
                if self._closing and not self._has_work():
                    break  # checked after dispatch: it may have found the last feed exhausted
                self._wait_for_events()
                self._expire()
        except BaseException:  # a bug here must not strand any caller: fail loudly instead
            logger.critical("engine manager thread failed; failing every pending target",
                            exc_info=True)
            self._broken = (EngineBrokenError, "its manager thread failed (see the log)")
        finally:
            with self._accepting_lock:
                self._accepting = False
            self._stop_workers()
            self._fail_everything()  # what was running, queued, or sent after the failure
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _has_work(self) -> bool:
        return bool(self._feeds or self._requeued
                    or any(w.state is WorkerState.BUSY for w in self._workers))

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "feed":
                self._feeds.append(command[1])
            elif kind == "kill":
                _, owner, reason = command
                for worker in list(self._workers):
                    if worker.task is not None and worker.task.owner is owner:
                        self._kill(worker, reason(worker.task))
            elif kind == "close":
                self._closing = True

    def _wait_for_events(self) -> None:
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        if self._limits.max_memory_per_worker is not None and self._has_work():
            deadlines.append(self._next_memory_check)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        by_handle: dict[Any, tuple[str, _Worker]] = {}
        for worker in self._workers:
            by_handle[worker.outcomes] = ("outcome", worker)
            by_handle[worker.process.sentinel] = ("exit", worker)
        for worker in self._retiring:
            by_handle[worker.process.sentinel] = ("retired", worker)
        ready = wait([self._wake_r, *by_handle], timeout)
        exits = []
        for handle in ready:
            if handle == self._wake_r:
                os.read(self._wake_r, 4096)
                continue
            kind, worker = by_handle[handle]
            if kind == "retired":
                self._retiring.remove(worker)
                _release(worker)
            elif kind == "exit" or (worker in self._workers and not self._receive(worker)):
                exits.append(worker)  # reaped after the outcomes: a worker may send, then exit
        for worker in exits:
            if worker in self._workers:
                self._reap(worker)

    # -- workers --------------------------------------------------------------------------------

    def _spawn_missing(self) -> None:
        if self._broken is not None or (self._closing and not self._has_work()):
            return
        while len(self._workers) < self._size:
            tasks_r, tasks_w = self._context.Pipe(duplex=False)
            outcomes_r, outcomes_w = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=serve, args=(tasks_r, outcomes_w, os.getpid(), self._limits.initializer),
                name="engine-worker")
            try:
                process.start()
            except OSError as exc:
                tasks_w.close()
                outcomes_r.close()
                self._start_failed(f"{type(exc).__name__}: {exc}")
                return
            finally:
                tasks_r.close()  # the child has its own copies now
                outcomes_w.close()
            self._workers.append(_Worker(process, tasks_w, outcomes_r))
            self.stats.workers_started += 1
        self._publish_pids()

    def _start_failed(self, reason: str) -> None:
        self.stats.start_failures += 1
        self._consecutive_start_failures += 1
        if self._consecutive_start_failures >= _MAX_START_FAILURES and self._broken is None:
            why = (f"{self._consecutive_start_failures} worker processes in a row failed to "
                   f"start; the last: {reason}")
            self._broken = (WorkerStartError, why)
            logger.error("engine stops starting workers; every target will fail: %s", why)

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message from `worker`; False if its pipe is closed (it is dead)."""
        try:
            message = worker.outcomes.recv_bytes()
        except (EOFError, OSError):
            return False
        task_id, *rest = pickle.loads(message)
        if task_id == START_FAILED:
            worker.start_error = rest[0]
            return True
        if task_id == READY:
            worker.pid = rest[0]
            worker.state = WorkerState.IDLE
            self._consecutive_start_failures = 0
            self._idle.append(worker)
            return True
        task = worker.task
        assert task is not None, "an outcome came from a worker that runs nothing"
        worker.task, worker.deadline, worker.state = None, None, WorkerState.IDLE
        worker.tasks_run += 1
        outcome = _outcome(task, worker.pid, *rest)
        if outcome.ok or not isinstance(outcome.value, task.retry_on) or not self._retry(task):
            self._deliver_safely(task, outcome)
        if self._worn_out(worker):
            self._retire(worker)
        else:
            self._idle.append(worker)
        return True

    def _retry(self, task: Task) -> bool:
        """Queue another attempt of `task` (first in line), if it has one left."""
        if task.attempt > task.retries:
            return False
        task.attempt += 1
        self.stats.retries += 1
        self._requeued.appendleft(task)
        return True

    def _worn_out(self, worker: _Worker) -> bool:
        limits = self._limits
        return (limits.max_tasks_per_worker is not None
                and worker.tasks_run >= limits.max_tasks_per_worker) or \
               (limits.max_memory_per_worker is not None
                and worker.rss() > limits.max_memory_per_worker)

    def _retire(self, worker: _Worker) -> None:
        """Replace a healthy worker: it is told to stop, and reaped when it has exited."""
        self._workers.remove(worker)
        self._retiring.append(worker)
        self.stats.workers_recycled += 1
        self._publish_pids()
        try:
            worker.tasks.send_bytes(b"")
        except OSError:
            pass  # it is gone already; its sentinel says so

    def _kill(self, worker: _Worker, reason: TargetError) -> None:
        """Kill `worker` and its children unless its task has finished after all."""
        self._drain(worker)
        if worker.task is None or worker not in self._workers:
            return  # the outcome won the race against the deadline or the cancellation
        _kill_tree(worker.process.pid)
        self._reap(worker, reason)

    def _drain(self, worker: _Worker) -> None:
        """Receive what a worker sent before dying or being killed."""
        try:
            while worker.outcomes.poll() and self._receive(worker):
                pass
        except OSError:
            pass

    def _reap(self, worker: _Worker, reason: TargetError | None = None) -> None:
        """Forget a dead worker; charge its task with `reason`, or with the death itself."""
        if reason is None:
            self._drain(worker)
        self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        exitcode = _release(worker)
        self._publish_pids()
        if worker.state is WorkerState.STARTING:
            self._start_failed(worker.start_error or f"worker {worker.pid} exited before it "
                               f"was ready, with {describe_exit(exitcode)}")
            return
        task = worker.task
        if task is None:
            if not self._closing:
                logger.warning("engine worker %s died idle with exit code %s", worker.pid, exitcode)
            return
        self.stats.worker_deaths += 1
        if reason is None:
            reason = WorkerCrashedError(task.target, worker.pid, exitcode)
            logger.warning("%s", reason)
        if isinstance(reason, (WorkerCrashedError, TargetTimeoutError)) and self._retry(task):
            return
        self._deliver_safely(task, Outcome.failure(reason, started=worker.started, pid=worker.pid))

    def _expire(self) -> None:
        """Kill the workers whose target is past its deadline or over the memory limit."""
        now = time.monotonic()
        limit = self._limits.max_memory_per_worker
        if limit is not None and now >= self._next_memory_check:
            self._next_memory_check = now + self._limits.memory_check_interval
        else:
            limit = None  # not time to look at memory yet
        for worker in list(self._workers):
            task = worker.task
            if task is None:
                continue
            if worker.deadline is not None and worker.deadline <= now:
                self._kill(worker, TargetTimeoutError(task.target, task.timeout or 0.0, worker.pid))
            elif limit is not None:
                # Over the limit and still growing at three checks in a row: killed now. Over
                # it but steady: the target may finish, and the worker is recycled after it.
                rss, last = worker.rss(), worker.last_rss
                worker.last_rss = rss
                growing = last is not None and rss > limit and rss > last
                worker.growth = worker.growth + 1 if growing else 0
                if worker.growth >= 3:
                    self._kill(worker, MemoryLimitError(task.target, limit, rss, worker.pid))

    def _stop_workers(self) -> None:
        """Stop every worker; a target still running on one (only if the manager failed) is
        requeued, to be failed with the reason."""
        for worker in self._workers:
            if worker.task is not None:
                self._requeued.append(worker.task)
                _kill_tree(worker.process.pid)
            try:
                worker.tasks.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_GRACE
        for worker in self._workers + self._retiring:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                _kill_tree(worker.process.pid)
            _release(worker)
        self._workers.clear()
        self._retiring.clear()
        self._idle.clear()
        self._publish_pids()

    def _publish_pids(self) -> None:
        self.pids = tuple(w.pid for w in self._workers if w.pid is not None)

    # -- dispatch -------------------------------------------------------------------------------

    def _next_task(self) -> Task | None:
        while self._requeued:
            task = self._requeued.popleft()
            if not task.owner.cancelled:
                return task
            self._fail(task, TargetCancelledError(task.target, running=False))
        while self._feeds:
            pulled = self._feeds[0].next_task()
            if pulled is None:
                self._feeds.popleft()
                continue
            self._feeds.rotate(-1)  # round robin: a small invocation is not stuck behind a big one
            return pulled
        return None

    def _dispatch(self) -> None:
        if self._broken is not None:
            self._fail_everything()
            return
        while self._idle:
            task = self._next_task()
            if task is None:
                return
            self._send(self._idle.pop(), task)

    def _send(self, worker: _Worker, task: Task) -> None:
        try:
            request = cloudpickle.dumps(task.request, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            self._idle.append(worker)
            self._fail(task, SerializationError(task.target, "request",
                                                f"{type(exc).__name__}: {exc}"))
            return
        self._next_task_id += 1
        message = pickle.dumps([(self._next_task_id, task.fn_blob, request, task.context)],
                               protocol=pickle.HIGHEST_PROTOCOL)
        try:
            worker.tasks.send_bytes(message)
        except OSError:
            self._requeued.appendleft(task)  # it never reached the worker; its sentinel reaps it
            return
        worker.task, worker.state, worker.started = task, WorkerState.BUSY, time.time()
        worker.last_rss, worker.growth = None, 0
        worker.deadline = None if task.timeout is None else time.monotonic() + task.timeout

    def _fail_everything(self) -> None:
        """Nothing can run: every waiting task fails now rather than wait forever."""
        self._take_commands()  # feeds sent before the manager stopped accepting them
        while (task := self._next_task()) is not None:
            self._fail(task, self._unrunnable(task))

    def _unrunnable(self, task: Task) -> TargetError:
        error, reason = self._broken or (EngineBrokenError, "it is shut down")
        return error(task.target, reason)

    def _fail(self, task: Task, error: TargetError) -> None:
        self._deliver_safely(task, Outcome.failure(error))

    def _deliver_safely(self, task: Task, outcome: Outcome) -> None:
        try:
            self._deliver(task, outcome)
        except BaseException:
            logger.critical("engine failed to record the result of %r", task.target, exc_info=True)


def _outcome(task: Task, pid: int | None, ok: bool, body: bytes, text: str | None,
             started: float, finished: float) -> Outcome:
    """Unpickle a worker's message in the caller; a body that won't load fails only this task."""
    try:
        value = pickle.loads(body)
    except BaseException as exc:
        detail = f"unpickling in the caller failed: {type(exc).__name__}: {exc}"
        if ok:
            error: BaseException = SerializationError(task.target, "response", detail)
            return Outcome.failure(error, started=started, finished=finished, pid=pid)
        value = RemoteError("unknown", detail, text or "")
    return Outcome(ok, value, text, started, finished, pid)


def _release(worker: _Worker) -> int | None:
    """Reap a worker that has exited or been killed, close its pipes; its exit code."""
    worker.process.join(_STOP_GRACE)
    exitcode: int | None = worker.process.exitcode
    for conn in (worker.tasks, worker.outcomes):
        conn.close()
    return exitcode


def _kill_tree(pid: int | None) -> None:
    """SIGKILL a worker and every process it started, so no grandchild outlives it."""
    if pid is None:
        return
    try:
        parent = psutil.Process(pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
