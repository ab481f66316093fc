"""The target pool: worker processes supervised by one manager thread.

::

    engine (any thread)           manager thread "engine-manager"            worker processes
    ───────────────────           ───────────────────────────────            ────────────────
    add_feed / kill / close ──►  commands (a deque) + wake-up pipe
                                  │ waits on, never polls:
                                  │   the wake-up pipe
                                  │   each worker's outcome pipe  ◄─────────── outcomes, batched
                                  │   each worker's sentinel      ◄─────────── the process exits
                                  │   the nearest target deadline
                                  │ sends a batch to a worker ───────────────► its own task pipe
                                  └ then deliver(owner, results), out of the lock: record + enqueue
                                    callbacks, never waits
    add_feed of a list, while the manager waits: sends the first batches itself ──► task pipes
    wait / as_completed, its targets all sent: polls their workers' lent pipes  ◄── outcomes
                                  wake-up pipe  ◄──── a worker's nudge: what it sent is unread

Quick targets travel in batches (about `BATCH_SECONDS` of work each, sized from what the
owner's targets took so far; one at a time until that is known, or when they are slow). A worker
runs its batch in order and writes each outcome to its journal (`engine._journal`) as it happens.

Invariants:

* Workers, feeds and the requeue are touched under `_lock` only: by the manager thread, and by
  a caller's thread while the manager waits: one that adds a feed (it sends the first batches
  itself), or one that waits for its invocation's last targets (the outcome pipes of their
  workers are lent to it, `lend`, and it receives them itself, `give_back`); each saves the
  manager a wake-up. Other calls are commands to the manager. Results are queued
  under the lock and delivered once it is released, after the next batches are sent: a caller
  woken by its result finds the pool free for its next invocation.
* A worker's outcome pipe is watched by one thread at most: the manager; or a waiting caller's
  thread it is lent to; or, from when a caller's thread sent it an invocation's last batch until
  that caller waits (kept), nobody: if what it sent is still unread 1 ms after it went idle, the
  worker nudges the manager, which watches it again.
* Each worker has its own pipes and journal; ``worker.inflight`` holds the batches sent to it in
  the order it runs them, so the first task without an outcome of its first batch is the one
  running. A death or a timeout is charged to exactly that target: what finished before it is
  delivered (from the journal if it was not sent), what is queued behind it never started and
  is requeued.
* Every task taken from a feed is delivered exactly once: with its outcome, or with the reason it
  has none (crash, timeout, cancellation, pickling).
* Requests are pickled only when sent, so memory holds the work in flight, not the invocation;
  a feed whose callbacks lag (`Owner.lagging`) is not pulled until its owner calls `resume`.
* The manager never blocks on a busy worker: a batch is sent ahead to a busy worker only if it
  fits in the pipe's buffer.
* If the manager thread itself fails (a bug), every running, queued and later task fails with
  `EngineBrokenError` rather than leave a caller waiting.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import pickle
import select
import selectors
import signal
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, cast

import cloudpickle

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
from ._journal import OUTCOMES, read_items
from ._process import WorkerProcess
from ._result import Outcome, Record, Records, Responses, record
from ._worker import FAILED, FOLLOW, KEEP_SECONDS, LARGE, OK, PICKLED, START_FAILED, UNLOADED

LOADED = -3  #: a status of the pool's own: a large response, already read from the spill file

logger = logging.getLogger("engine")

_MAX_START_FAILURES = 3  # consecutive deaths before "ready": the pool stops spawning
_KILLED_START_WEIGHT = 0.25  # a SIGKILL at start mostly comes from outside: it counts less
_STOP_GRACE = 2.0  # seconds a worker gets to exit after being told to stop
BATCH_SECONDS = 0.002  # the work a batch of quick targets should hold
MAX_BATCH = 512  # targets in one batch at most
MAX_BATCH_BYTES = 1 << 20  # pickled requests in one batch at most, unless it is one target
_PREFETCH_BYTES = 32 << 10  # a batch sent to a busy worker must fit in its pipe's buffer
_AHEAD = 3  # batches of quick targets queued for a busy worker, if its pipe holds them
_JOURNAL_SIZE = 1 << 20  # bytes of outcomes a worker holds before it must send them


@dataclasses.dataclass(slots=True, eq=False)
class Batch:
    """Tasks of one owner that one worker runs in order, kept as columns: the engine makes no
    object per target (a million of them would keep the garbage collector busy).

    Task `k` runs `functions[positions[k]]` (target `targets[k]`) on `requests[k]`; it is at
    `indices[k]` in its owner's input, and a worker reports it as task ``first_id + k``.
    """

    owner: Owner
    indices: Sequence[int]
    targets: list[str]
    functions: list[bytes]  #: pickled functions, each once
    positions: list[int]
    requests: Sequence[Any]
    attempt: int = 1  #: of every task in it (a task run again travels alone)
    first_id: int = 0  #: set when sent
    done: int = 0  #: the first `done` tasks have their outcome

    def __len__(self) -> int:
        return len(self.requests)

    def part(self, start: int, stop: int | None = None) -> Batch:
        """Tasks `start` to `stop` as a batch not yet sent."""
        return Batch(self.owner, self.indices[start:stop], self.targets[start:stop],
                     self.functions, self.positions[start:stop], self.requests[start:stop],
                     self.attempt)

    def singles(self) -> list[Batch]:
        return [self.part(k, k + 1) for k in range(len(self))]


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """When a worker is replaced although it is healthy."""

    max_tasks_per_worker: int | None = None
    max_memory_per_worker: int | None = None  #: bytes of resident memory
    memory_check_interval: float = 0.1  #: seconds between checks of a busy worker's memory
    initializer: bytes | None = None  #: cloudpickled (fn, args), run in each worker first


class Owner(Protocol):
    """The invocation a task belongs to: what the pool reads of it, and its source of tasks."""

    cid: str
    req_ts: float  #: epoch seconds when it was issued
    cancelled: bool
    timeout: float | None
    retries: int  #: further attempts allowed after a crash or a timeout
    retry_on: tuple[type[BaseException], ...]  #: raised exceptions that are retried too
    prefix: tuple[str, str, str]  #: (channel, cid, source) of each target's CallContext
    pace: Pace  #: the pool's own record of how long its targets take

    @property
    def lagging(self) -> bool:
        """Its callbacks are far behind: pull no more of it until it calls `resume`."""

    def next_tasks(self, limit: int) -> Batch | None:
        """Up to `limit` next tasks, pulled only as workers free up; None once there are none."""

    @property
    def exhausted(self) -> bool:
        """Every task was pulled, as far as is known without pulling again."""


Deliver = Callable[[Owner, Records], None]  #: an owner's results, in the order they ran


class _Worker:
    __slots__ = ("process", "tasks", "outcomes", "journal", "pid", "ready", "inflight", "held",
                 "gone", "lent", "kept_since", "head_since", "deadline", "tasks_run", "last_rss",
                 "growth", "start_error")

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.tasks, self.outcomes, self.journal = process.tasks, process.outcomes, process.journal
        self.pid: int = process.pid
        self.ready = False  # it has said it serves
        self.inflight: collections.deque[Batch] = collections.deque()  # sent, in run order
        self.held: tuple[Batch, bytes] | None = None  # a batch waiting for it to be idle
        self.gone = False  # its task pipe is broken: it is dying, its sentinel will say so
        self.lent = False  # a waiting caller's thread watches its outcome pipe, not the manager
        #: monotonic seconds since nobody watches its outcome pipe: the caller's thread that sent
        #: it an invocation's last batch is likely to wait for it (see `_dispatch_here`)
        self.kept_since: float | None = None
        self.head_since = 0.0  # epoch seconds when inflight[0] started (at the latest)
        self.deadline: float | None = None  # monotonic seconds, for inflight[0]
        self.tasks_run = 0
        self.last_rss: int | None = None  # at the last memory check of the running task
        self.growth = 0  # consecutive checks that found it over the limit and growing
        self.start_error: str | None = None  # its initializer's traceback, if it raised

    def running(self) -> tuple[Batch, int] | None:
        """The batch and position of the task it runs now, if any."""
        return (self.inflight[0], self.inflight[0].done) if self.inflight else None

    def waiting(self) -> int:
        """Tasks sent to it that have no outcome yet."""
        return sum(len(batch) - batch.done for batch in self.inflight)

    def rss(self) -> int:
        """Resident memory in bytes, 0 if it cannot be read (the process is going)."""
        import psutil  # imported when first needed: it is slow to import

        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.Error, ValueError):
            return 0


@dataclasses.dataclass(frozen=True, slots=True)
class Loan:
    """Workers whose outcome pipes a waiting caller's thread watches instead of the manager."""

    workers: list[_Worker]
    fds: list[int]  #: their outcome pipes and process sentinels

    def wait(self, wake: int, timeout: float | None) -> list[int]:
        """Until one of the workers reports or exits, `wake` is readable, or `timeout` passed:
        the descriptors that are ready."""
        poller = select.poll()
        for fd in (wake, *self.fds):
            poller.register(fd, select.POLLIN)
        return [fd for fd, _ in poller.poll(None if timeout is None else math.ceil(timeout * 1e3))]


@dataclasses.dataclass(slots=True)
class PoolStats:
    workers_started: int = 0
    worker_deaths: int = 0  #: workers that died or were killed while running a target
    workers_recycled: int = 0  #: healthy workers replaced: task count or memory limit
    start_failures: int = 0
    retries: int = 0  #: attempts run again after a crash, a timeout or a retried exception


@dataclasses.dataclass(slots=True)
class Pace:
    """What batches of an owner's targets should hold, as the pool measured so far."""

    duration: float | None = None  #: seconds a target takes in its worker, reporting included
    request_bytes: float = 0.0  #: the size of a pickled request

    def ran(self, duration: float, count: int) -> None:
        """Follow the measured durations: at once the first time, then smoothly."""
        if self.duration is None:
            self.duration = duration
        else:
            self.duration += (duration - self.duration) * min(1.0, count / 16)


class TargetPool:
    """Runs tasks from feeds on `size` worker processes; see the module docstring."""

    def __init__(self, size: int, deliver: Deliver, limits: Limits = Limits()) -> None:
        self._size = size
        self._deliver = deliver
        self._limits = limits
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # What the manager waits on: registered once, not for every wait.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._workers: list[_Worker] = []
        self._retiring: list[_Worker] = []  # told to stop, not yet exited; not counted in size
        self._next_memory_check = 0.0  # monotonic seconds
        self._keeping = True  # whether callers wait for their results (see `_dispatch_here`)
        self._feeds: collections.deque[Owner] = collections.deque()
        self._requeued: collections.deque[Batch] = collections.deque()
        self._closing = False
        self._consecutive_start_failures = 0.0
        # Why no target can run, once that is so: the error to fail each with, and its reason.
        self._broken: tuple[type[WorkerStartError | EngineBrokenError], str] | None = None
        self._accepting = True  # False once the manager thread has exited
        self._accepting_lock = threading.RLock()
        # The pool's state: the manager holds it but while it waits for events; a caller's
        # thread may take it then, to send its invocation's first batches itself.
        self._lock = threading.Lock()
        self._next_task_id = 0
        self._taken: collections.deque[tuple[Owner, Records]] = collections.deque()
        self._spills_read: list[WorkerProcess] = []  # to release, once their results are in
        #: Ctrl-C while a caller's thread read a large response on loan: raised once it is given
        #: back (the pool's state is whole: the interrupted read is read again, or fails its target)
        self._interrupt: KeyboardInterrupt | None = None
        self.stats = PoolStats()
        self.pids: tuple[int, ...] = ()  # the live workers' pids, for observers
        self._thread = threading.Thread(target=self._run, name="engine-manager", daemon=True)
        self._thread.start()

    # -- the face other threads use: each call is a command to the manager thread --------------

    def add_feed(self, feed: Owner, *, here: bool = False) -> None:
        """Run `feed`'s tasks. With `here` (a feed whose pulls run no caller's code: a list),
        if the manager thread is waiting, not busy, the calling thread sends the feed's first
        batches to idle workers itself: that saves waking the manager, a quarter of a round
        trip."""
        if here and self._lock.acquire(blocking=False):
            try:
                dispatched = self._accepting and not self._closing and self._broken is None
                if dispatched:
                    self._dispatch_here(feed)
            finally:
                self._lock.release()
            self._deliver_taken()
            if dispatched:
                return
        if self._command("feed", feed):
            return
        while batch := feed.next_tasks(MAX_BATCH):  # the manager is gone: fail, never hang
            self._fail(batch, self._unrunnable)
        self._deliver_taken()

    def _dispatch_here(self, feed: Owner) -> None:
        """Under `_lock`, in a caller's thread: add `feed` and dispatch. The manager is woken
        when it must look again: to time a deadline, or when no running task will wake it.

        The manager stops watching the worker sent the feed's last batch (it is *kept*): the
        caller is likely to wait for its result next, and to receive it itself (`lend`). A quick
        target may finish before the caller waits; were the manager watching, it would wake and
        take the result over, which costs both threads the hand-over of the GIL. A worker whose
        outcome nobody read for `KEEP_SECONDS` wakes the manager (`engine._worker`), which
        watches it again (`_watch_kept`): a result whose caller does not wait is received all
        the same, that much later; from then on no worker is kept until a caller waits again."""
        self._feeds.append(feed)
        keep = self._keeping and feed.timeout is None and self._limits.max_memory_per_worker is None
        last = False  # the feed's last batch was taken
        try:
            for worker in [] if self._requeued else sorted(self._workers, key=_Worker.waiting):
                room = self._room(worker)  # (what was requeued goes first: the manager's)
                if not room:
                    continue
                batch = feed.next_tasks(min(room, self._batch_size(feed)))
                last = batch is None or feed.exhausted
                if last:
                    self._feeds.pop()  # all sent: nothing left for the manager to pull
                if batch is None:
                    break
                if keep and last and not worker.lent and worker.kept_since is None:
                    self._selector.unregister(worker.outcomes)
                    worker.kept_since = time.monotonic()
                self._send(worker, batch)
                if last:
                    break
            if not last:
                self._watch_kept(0.0)  # the manager sends the rest as workers report
        except BaseException as exc:
            self._wake()
            self._break("dispatch", exc)
            return
        if not keep or self._requeued or not any(w.inflight for w in self._workers):
            self._wake()  # a deadline to time, memory to watch, or no outcome that wakes it

    def lend(self, owner: Owner) -> Loan | None:
        """Lend the outcome pipes of the workers running `owner`'s last tasks to the calling
        thread, which waits for them: their outcomes are then received in the thread that waits
        for them, without waking the manager thread and handing the GIL over to it (a sixth of a
        round trip). None if not now: the manager is busy, `owner` has tasks not yet sent, or
        none running. Never blocks. Each loan ends with `give_back`."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self._accepting or self._closing or self._broken is not None \
                    or owner in self._feeds or any(b.owner is owner for b in self._requeued):
                return None
            lent = [w for w in self._workers if not w.lent and not w.gone
                    and any(batch.owner is owner for batch in w.inflight)]
            if not lent:
                return None
            for worker in lent:
                if worker.kept_since is None:
                    self._selector.unregister(worker.outcomes)
                worker.lent, worker.kept_since = True, None
            self._keeping = True  # callers wait for their results
            fds = [fd for w in lent for fd in (w.outcomes.fileno(), w.process.sentinel)]
            return Loan(lent, fds)
        finally:
            self._lock.release()

    def give_back(self, loan: Loan, ready: Collection[int]) -> None:
        """End a loan: receive here what its workers sent (the `ready` descriptors), as the
        manager would, and let it watch them again; it is woken only if it has something to do
        (any further message wakes it as usual)."""
        with self._lock:
            try:
                for worker in loan.workers:
                    worker.lent = False
                    if worker not in self._workers:
                        continue  # reaped meanwhile, by the manager
                    # (polled again: the manager may have drained it meanwhile, to kill it)
                    if worker.outcomes.fileno() in ready and worker.outcomes.poll() \
                            and not self._receive(worker):
                        worker.gone = True  # it died: the manager reaps it
                    if worker.process.sentinel in ready:
                        worker.gone = True  # it exited: not lent again meanwhile
                    if worker in self._workers:  # (not retired just now)
                        self._selector.register(worker.outcomes, selectors.EVENT_READ,
                                                ("outcome", worker))
            except BaseException as exc:
                self._break("receive outcomes", exc)
            finally:
                if self._manager_needed():
                    self._wake()
                interrupt, self._interrupt = self._interrupt, None
        self._deliver_taken()
        if interrupt is not None:
            raise interrupt

    def _break(self, what: str, exc: BaseException) -> None:
        """Under `_lock`, in a caller's thread: its share of the manager's work failed (a bug,
        or Ctrl-C while it ran), so the pool's state may have lost a task; the manager fails
        every pending target, as for a failure of its own. An interrupt goes on."""
        logger.critical("engine failed to %s in a caller's thread; failing every pending "
                        "target", what, exc_info=True)
        self._broken = (EngineBrokenError, f"the engine failed to {what} (see the log)")
        if not isinstance(exc, Exception):
            raise exc

    def _manager_needed(self) -> bool:
        """Under `_lock`: whether the manager has something to do beyond waiting for events."""
        return bool(self._feeds or self._requeued or self._spills_read or self._closing
                    or self._broken is not None or len(self._workers) < self._size
                    or self._limits.max_memory_per_worker is not None
                    or any(w.deadline is not None or w.held is not None for w in self._workers))

    def resume(self) -> None:
        """A feed that lagged behind its callbacks may be pulled again."""
        self._wake()

    def kill_running(self, owner: Owner, reason: Callable[[str], TargetError]) -> None:
        """Kill the workers running tasks of `owner`; each such task fails with reason(target)."""
        self._command("kill", owner, reason)

    def close(self) -> None:
        """Finish every feed and running task, then stop the workers and the manager thread."""
        self._command("close")

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _command(self, *command: Any) -> bool:
        """Queue a command and wake the manager; False if the manager thread has exited."""
        with self._accepting_lock:
            if not self._accepting:
                return False
            self._commands.append(command)
            self._wake()
            return True

    def _wake(self) -> None:
        with self._accepting_lock:  # never write to the wake-up pipe once it may be closed
            if not self._accepting:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending anyway

    # -- the manager thread -------------------------------------------------------------------

    def _run(self) -> None:
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            while True:
                with self._lock:
                    self._handle(ready)
                    self._watch_kept(KEEP_SECONDS / 2)  # (the worker waits a whole one)
                    self._expire()
                    self._take_commands()
                    self._spawn_missing()
                    self._dispatch()
                    if self._closing and not self._has_work():
                        break  # checked after dispatch: it may have found the last feed done
                    timeout = self._select_timeout()
                self._deliver_taken()  # workers have their next batches before results land
                while self._spills_read:  # here only: this thread is the one that closes them
                    self._spills_read.pop().release_spill()
                ready = self._selector.select(timeout)  # the only time the lock is free
        except BaseException:  # a bug here must not strand any caller: fail loudly instead
            logger.critical("engine manager thread failed; failing every pending target",
                            exc_info=True)
            self._broken = (EngineBrokenError, "its manager thread failed (see the log)")
        finally:
            with self._lock:
                with self._accepting_lock:
                    self._accepting = False
                self._stop_workers()
                self._fail_everything()  # what was running, queued, or sent after the failure
                self._selector.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
            self._deliver_taken()

    def _has_work(self) -> bool:
        return bool(self._feeds or self._requeued or any(w.inflight for w in self._workers))

    def _take_commands(self) -> None:
        while self._commands:  # only this thread takes; others append
            command = self._commands.popleft()
            kind = command[0]
            if kind == "feed":
                self._feeds.append(command[1])
            elif kind == "kill":
                _, owner, reason = command
                for worker in list(self._workers):
                    running = worker.running()
                    if running is not None and running[0].owner is owner:
                        batch, k = running
                        self._kill(worker, reason(batch.targets[k]))
            elif kind == "close":
                self._closing = True

    def _select_timeout(self) -> float | None:
        """Seconds until the nearest deadline or memory check; None if there is none."""
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        if self._limits.max_memory_per_worker is not None and self._has_work():
            deadlines.append(self._next_memory_check)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _watch_kept(self, age: float) -> None:
        """Watch again the workers kept at least `age` seconds (see `_dispatch_here`); if one
        has an outcome, its caller did not wait for it: keep no more until one does."""
        now = time.monotonic()
        for worker in self._workers:
            if worker.kept_since is not None and now - worker.kept_since >= age:
                worker.kept_since = None
                if age and worker.outcomes.poll():
                    self._keeping = False
                self._selector.register(worker.outcomes, selectors.EVENT_READ,
                                        ("outcome", worker))

    def _handle(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        exits = []
        for key, _ in ready:
            kind, worker = key.data
            if kind == "wake":
                os.read(self._wake_r, 4096)
            elif kind == "retired":
                self._retiring.remove(worker)
                self._release(worker)
            elif kind == "exit" or (worker in self._workers and worker.outcomes.poll()
                                    and not self._receive(worker)):
                exits.append(worker)  # reaped after the outcomes: a worker may send, then exit
        for worker in exits:
            if worker in self._workers:
                self._reap(worker)

    # -- workers --------------------------------------------------------------------------------

    def _spawn_missing(self) -> None:
        if self._broken is not None or (self._closing and not self._has_work()):
            return
        while len(self._workers) < self._size:
            try:
                process = WorkerProcess(_JOURNAL_SIZE, self._limits.initializer, self._wake_w)
            except OSError as exc:
                self._start_failed(f"{type(exc).__name__}: {exc}")
                return
            worker = _Worker(process)
            self._workers.append(worker)
            self._selector.register(worker.outcomes, selectors.EVENT_READ, ("outcome", worker))
            self._selector.register(process.sentinel, selectors.EVENT_READ, ("exit", worker))
            self.stats.workers_started += 1
            self._publish_pids()

    def _start_failed(self, reason: str, weight: float = 1.0) -> None:
        self.stats.start_failures += 1
        self._consecutive_start_failures += weight
        if self._consecutive_start_failures >= _MAX_START_FAILURES and self._broken is None:
            why = (f"worker processes failed to start {self.stats.start_failures} times; "
                   f"the last: {reason}")
            self._broken = (WorkerStartError, why)
            logger.error("engine stops starting workers; every target will fail: %s", why)

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message from `worker`; False if its pipe is closed (it is dead)."""
        try:
            message = worker.outcomes.recv_bytes()
        except (EOFError, OSError):
            return False
        if message.startswith(OUTCOMES):
            self._take_outcomes(worker, read_items(message))
        elif message[:1] == FOLLOW:
            try:
                worker.process.follow(*pickle.loads(message[1:]))
            except KeyboardInterrupt as exc:  # nothing is lost: read whole once announced
                self._interrupt = exc
            return True
        elif message[:1] == LARGE:
            task_id, status, started, finished, raw, places = pickle.loads(message[1:])
            value: Any
            try:  # a failure's body is read as it is, and unpickled as any failure's
                value = (True, worker.process.read_spill(raw or status != OK, places))
            except BaseException as exc:  # Ctrl-C (in a caller's thread) fails this target only
                value = (False, exc)
                if isinstance(exc, KeyboardInterrupt):
                    self._interrupt = exc
            finally:
                self._spills_read.append(worker.process)
            if status == OK:
                self._take_outcomes(worker, [task_id, value, LOADED, started, finished])
            else:
                body = value[1] if value[0] else pickle.dumps((b"", repr(value[1])))
                self._take_outcomes(worker, [task_id, body, status, started, finished])
        else:
            kind, detail = pickle.loads(message[1:])
            if kind == START_FAILED:
                worker.start_error = detail
            else:
                worker.pid, worker.ready = detail, True
                self._consecutive_start_failures = 0.0
                self._publish_pids()
            return True
        if worker not in self._workers:
            return True  # drained while being reaped
        if worker.inflight:
            self._started(worker, time.time())
        elif worker.held is not None:
            self._send_message(worker, *worker.held)
        elif self._worn_out(worker):
            self._retire(worker)
        return True

    def _started(self, worker: _Worker, since: float) -> None:
        """`worker.inflight[0]` started at `since` (epoch seconds) at the latest."""
        worker.head_since = since
        worker.last_rss, worker.growth = None, 0
        timeout = worker.inflight[0].owner.timeout
        worker.deadline = None if timeout is None else time.monotonic() + timeout

    def _take_outcomes(self, worker: _Worker, items: list[Any]) -> None:
        """Deliver what a worker reports: `items` holds five per outcome (task id, value,
        status, started, finished), in the order they ran; what was delivered already is skipped.

        A batch's run of responses is kept as its columns (`Responses`: a few slices), with no
        Python code per target: at a million targets, that code was most of what the caller
        spent."""
        inflight, pid = worker.inflight, worker.pid
        position, end = 0, len(items)
        while end - position >= 5 and inflight:
            batch = inflight[0]
            k = items[position] - batch.first_id
            if k < batch.done:  # read again from the journal after it was sent
                position += 5 * (min(batch.done - k, (end - position) // 5) if k >= 0 else 1)
                continue
            n = min(len(batch) - k, (end - position) // 5)
            chunk = items[position:position + 5 * n]
            position += 5 * n
            assert k == batch.done and chunk[-5] == batch.first_id + k + n - 1, \
                "a worker reported outcomes out of order"
            records: Records | None = self._responses(batch, k, chunk, pid)
            if records is None:
                records = self._records(batch, k, chunk, pid)
            batch.done = k + n  # only now: should the above fail, they are failed, not lost
            if batch.done == len(batch):
                inflight.popleft()
            if records:
                self._deliver_later(batch.owner, records)
            batch.owner.pace.ran((chunk[-1] - chunk[3]) / n, n)  # (they ran back to back)
            worker.tasks_run += n
        worker.deadline = None

    @staticmethod
    def _responses(batch: Batch, k: int, chunk: list[Any], pid: int | None) -> Responses | None:
        """The results of `chunk`, outcomes of tasks `k`... of `batch`, if each is a response
        (as it is, or pickled); None if any is not, or will not unpickle."""
        values, statuses = chunk[1::5], chunk[2::5]
        plain = statuses.count(OK)
        if plain < len(statuses):
            if plain + statuses.count(PICKLED) < len(statuses):
                return None
            try:
                values = [value if status == OK else pickle.loads(value)
                          for status, value in zip(statuses, values, strict=True)]
            except BaseException:
                return None  # taken one by one: only the culprit fails
        owner, stop = batch.owner, k + len(statuses)
        # Tuples, not lists: a tuple of plain values drops out of the collector's view.
        return Responses(owner.cid, tuple(batch.targets[k:stop]), _frozen(batch.indices[k:stop]),
                         tuple(values), owner.req_ts, tuple(chunk[4::5]), tuple(chunk[3::5]),
                         pid, batch.attempt)

    def _records(self, batch: Batch, k: int, chunk: list[Any], pid: int | None) -> list[Record]:
        """The records of `chunk`, one by one: failures, retries, spilled responses; a task
        whose batch did not unpickle in the worker is sent again on its own."""
        records, resend = [], []
        for j in range(0, len(chunk), 5):
            _, body, status, started, finished = chunk[j:j + 5]
            task = k + j // 5
            outcome: Outcome | None
            if status == UNLOADED:
                resend.append(batch.part(task, task + 1))
                continue
            if status == OK:
                outcome = Outcome(True, body, None, started, finished, pid)
            else:
                outcome = self._unusual_outcome(batch, task, status, started, finished, body, pid)
            if outcome is not None:
                records.append(record(batch.owner, batch.indices[task], batch.targets[task],
                                      outcome, batch.attempt))
        self._requeued.extendleft(reversed(resend))  # first in line
        return records

    def _unusual_outcome(self, batch: Batch, k: int, status: int, started: float,
                         finished: float, body: Any, pid: int | None) -> Outcome | None:
        """The outcome of task `k` whose entry is not a plain response; None if it is retried."""
        target = batch.targets[k]
        if status == FAILED:
            outcome = _failure(body, started, finished, pid)
            if isinstance(outcome.value, batch.owner.retry_on) and self._retry(batch, k):
                return None
            return outcome
        try:
            if status == LOADED:
                loaded, value = cast(tuple[bool, Any], body)
                if not loaded:
                    raise cast(BaseException, value)
            else:
                value = pickle.loads(body)
            return Outcome(True, value, None, started, finished, pid)
        except BaseException as exc:
            detail = f"unpickling in the caller failed: {type(exc).__name__}: {exc}"
            return Outcome.failure(SerializationError(target, "response", detail),
                                   started=started, finished=finished, pid=pid)

    def _retry(self, batch: Batch, k: int) -> bool:
        """Queue another attempt of task `k` of `batch` (first in line, on its own: it may be
        what kills workers), if it has one left."""
        if batch.attempt > batch.owner.retries:
            return False
        again = batch.part(k, k + 1)
        again.attempt += 1
        self.stats.retries += 1
        self._requeued.appendleft(again)
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
        self._unwatch(worker.outcomes)  # it has nothing more to say
        self._selector.modify(worker.process.sentinel, selectors.EVENT_READ, ("retired", worker))
        self.stats.workers_recycled += 1
        self._publish_pids()
        try:
            worker.tasks.send_bytes(b"")
        except OSError:
            pass  # it is gone already; its sentinel says so

    def _kill(self, worker: _Worker, reason: TargetError) -> None:
        """Kill `worker` and its children unless its running task has finished after all."""
        running = worker.running()
        self._drain(worker)
        if worker not in self._workers or worker.running() != running:
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
        """Forget a dead worker. What it finished is delivered (its journal has what it had not
        sent); the task it was running is charged with `reason`, or with the death itself; the
        tasks queued behind it never started, and are requeued."""
        self._workers.remove(worker)
        worker.process.join(_STOP_GRACE)
        self._drain(worker)  # a dead worker's pipe still holds what it sent
        if worker.inflight:
            self._take_outcomes(worker, read_items(worker.journal.committed()))
        exitcode = self._release(worker)
        self._publish_pids()
        if not worker.ready:
            weight = _KILLED_START_WEIGHT if exitcode == -signal.SIGKILL else 1.0
            self._start_failed(worker.start_error or f"worker {worker.pid} exited before it "
                               f"was ready, with {describe_exit(exitcode)}", weight)
            return
        running = worker.running()
        self._requeued.extendleft(reversed(self._unsent(worker)))
        if running is None:
            if not self._closing:
                logger.warning("engine worker %s died idle with exit code %s", worker.pid, exitcode)
            return
        batch, k = running
        self.stats.worker_deaths += 1
        if reason is None:
            reason = WorkerCrashedError(batch.targets[k], worker.pid, exitcode)
            logger.warning("%s", reason)
        if isinstance(reason, (WorkerCrashedError, TargetTimeoutError)) and self._retry(batch, k):
            return
        outcome = Outcome.failure(reason, started=worker.head_since, pid=worker.pid)
        self._deliver_later(batch.owner, [record(batch.owner, batch.indices[k],
                                                 batch.targets[k], outcome, batch.attempt)])

    def _expire(self) -> None:
        """Kill the workers whose target is past its deadline or over the memory limit."""
        now = time.monotonic()
        limit = self._limits.max_memory_per_worker
        if limit is not None and now >= self._next_memory_check:
            self._next_memory_check = now + self._limits.memory_check_interval
        else:
            limit = None  # not time to look at memory yet
        for worker in list(self._workers):
            running = worker.running()
            if running is None:
                continue
            batch, k = running
            target = batch.targets[k]
            if worker.deadline is not None and worker.deadline <= now:
                self._kill(worker, TargetTimeoutError(target, batch.owner.timeout or 0.0,
                                                      worker.pid))
            elif limit is not None:
                # Over the limit and still growing at three checks in a row: killed now. Over
                # it but steady: the target may finish, and the worker is recycled after it.
                rss, last = worker.rss(), worker.last_rss
                worker.last_rss = rss
                growing = last is not None and rss > limit and rss > last
                worker.growth = worker.growth + 1 if growing else 0
                if worker.growth >= 3:
                    self._kill(worker, MemoryLimitError(target, limit, rss, worker.pid))

    def _stop_workers(self) -> None:
        """Stop every worker; a target still running on one (only if the manager failed) is
        requeued, to be failed with the reason."""
        for worker in self._workers:
            if worker.inflight:
                _kill_tree(worker.process.pid)
            self._requeued.extend(self._unsent(worker, running_too=True))
            try:
                worker.tasks.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_GRACE
        for worker in self._workers + self._retiring:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                _kill_tree(worker.process.pid)
            self._release(worker)
        self._workers.clear()
        self._retiring.clear()
        self._publish_pids()

    def _release(self, worker: _Worker) -> int | None:
        """Reap a worker that has exited or been killed, close its pipes and files; its exit
        code."""
        for handle in (worker.outcomes, worker.process.sentinel):
            self._unwatch(handle)
        exitcode = worker.process.join(_STOP_GRACE)
        worker.process.close()
        return exitcode

    def _unwatch(self, handle: Any) -> None:
        try:
            self._selector.unregister(handle)
        except KeyError:
            pass  # a retired worker's outcomes, or a lent one's, are not watched

    def _publish_pids(self) -> None:
        self.pids = tuple(w.pid for w in self._workers if w.pid is not None)

    # -- dispatch -------------------------------------------------------------------------------

    def _batch_size(self, owner: Owner) -> int:
        """Targets to send together: about `BATCH_SECONDS` of work; one while it is unknown."""
        pace = owner.pace
        if pace.duration is None:
            return 1
        size = min(BATCH_SECONDS / max(pace.duration, 1e-7),
                   MAX_BATCH_BYTES / max(pace.request_bytes, 1.0))
        return max(1, min(MAX_BATCH, int(size)))

    def _next_batch(self, room: int, *, paced: bool = True) -> Batch | None:
        """Up to `room` tasks of one owner: requeued ones first, then round robin over feeds
        (if `paced`, over those whose callbacks keep up: a lagging one would only add payloads
        to the callbacks' queue, so that memory grew with the invocation)."""
        batch: Batch | None
        while self._requeued:
            batch = self._requeued.popleft()
            if batch.owner.cancelled:
                self._fail(batch, lambda target: TargetCancelledError(target, running=False))
                continue
            limit = min(room, self._batch_size(batch.owner))
            if len(batch) > limit:
                self._requeued.appendleft(batch.part(limit))
                batch = batch.part(0, limit)
            return batch
        for _ in range(len(self._feeds)):
            feed = self._feeds[0]
            if paced and feed.lagging:
                self._feeds.rotate(-1)
                continue
            batch = feed.next_tasks(min(room, self._batch_size(feed)))
            if batch is None:
                self._feeds.popleft()
                continue
            self._feeds.rotate(-1)  # round robin: a small invocation is not stuck behind a big one
            return batch
        return None

    def _room(self, worker: _Worker) -> int:
        """How many more tasks `worker` may be sent now; 0 if none.

        An idle worker gets a batch. A busy one gets batches ahead of time only when its targets
        are quick (so nothing waits long behind them): one, or `_AHEAD` where its pipe is large
        enough, so that it keeps working while the manager waits for the GIL (a caller thread
        consuming results holds it for up to the interpreter's switch interval, 5 ms).
        """
        if not worker.ready or worker.gone or worker.held is not None:
            return 0
        room, waiting = MAX_BATCH, worker.waiting()
        if self._limits.max_tasks_per_worker is not None:
            room = self._limits.max_tasks_per_worker - worker.tasks_run - waiting
        if worker.inflight:
            owner = worker.inflight[-1].owner
            pace = owner.pace
            ahead = _AHEAD if worker.process.pipe_bytes >= _AHEAD * 2 * _PREFETCH_BYTES else 1
            if pace.duration is None or pace.duration >= BATCH_SECONDS \
                    or waiting > ahead * self._batch_size(owner):
                return 0
        return max(0, room)

    def _dispatch(self) -> None:
        if self._broken is not None:
            self._fail_everything()
            return
        sent = True
        while sent:
            sent = False
            for worker in sorted(self._workers, key=_Worker.waiting):
                room = self._room(worker)
                if not room:
                    continue
                batch = self._next_batch(room)
                if batch is None:
                    return
                self._send(worker, batch)
                sent = True

    def _send(self, worker: _Worker, batch: Batch) -> None:
        """Send `batch` to `worker`: held back if the write could block, split if too large.
        Should this fail (a bug), what was not sent is requeued, for the failure to fail it."""
        try:
            while True:
                try:
                    requests = _pickled_requests(batch.requests)
                except BaseException as exc:
                    if len(batch) > 1:  # find the culprit: each is pickled on its own
                        self._requeued.extendleft(reversed(batch.singles()))
                        return
                    self._fail(batch, _unpicklable_request(f"{type(exc).__name__}: {exc}"))
                    return
                batch.owner.pace.request_bytes = len(requests) / len(batch)
                if len(requests) <= MAX_BATCH_BYTES or len(batch) == 1:
                    break
                half = len(batch) // 2  # keep one message's memory bounded
                self._requeued.appendleft(batch.part(half))
                batch = batch.part(0, half)
            owner = batch.owner
            batch.first_id, self._next_task_id = \
                self._next_task_id, self._next_task_id + len(batch)
            message = pickle.dumps((owner.prefix, owner.timeout is not None, batch.functions,
                                    batch.first_id, batch.positions, batch.targets,
                                    batch.indices, requests), protocol=pickle.HIGHEST_PROTOCOL)
            if worker.inflight and len(message) > _PREFETCH_BYTES:
                worker.held = (batch, message)  # a write that could block waits for an idle one
                return
            self._send_message(worker, batch, message)
        except BaseException:
            held = worker.held is not None and worker.held[0] is batch
            if not held and batch not in worker.inflight:
                self._requeued.appendleft(batch)
            raise

    def _unsent(self, worker: _Worker, *, running_too: bool = False) -> list[Batch]:
        """Take back what `worker` was given and has not begun (and what it runs, if asked)."""
        parts = []
        for position, batch in enumerate(worker.inflight):
            start = batch.done + (1 if position == 0 and not running_too else 0)
            if start < len(batch):
                parts.append(batch.part(start))
        worker.inflight.clear()
        if worker.held is not None:
            parts.append(worker.held[0])
            worker.held = None
        return parts

    def _send_message(self, worker: _Worker, batch: Batch, message: bytes) -> None:
        worker.held = None
        try:
            worker.tasks.send_bytes(message)
        except OSError:
            worker.gone = True  # its sentinel reaps it
            self._requeued.appendleft(batch)  # it never got there
            return
        idle = not worker.inflight
        worker.inflight.append(batch)
        if idle:
            self._started(worker, time.time())

    def _fail_everything(self) -> None:
        """Nothing can run: every waiting task fails now rather than wait forever."""
        self._take_commands()  # feeds sent before the manager stopped accepting them
        for worker in self._workers:
            self._requeued.extend(self._unsent(worker, running_too=True))
        while batch := self._next_batch(MAX_BATCH, paced=False):
            self._fail(batch, self._unrunnable)

    def _unrunnable(self, target: str) -> TargetError:
        error, reason = self._broken or (EngineBrokenError, "it is shut down")
        return error(target, reason)

    def _fail(self, batch: Batch, error: Callable[[str], TargetError]) -> None:
        """Every task of `batch` fails, with the error `error(target)`."""
        self._deliver_later(batch.owner, [
            record(batch.owner, index, target, Outcome.failure(error(target)), batch.attempt)
            for index, target in zip(batch.indices, batch.targets, strict=True)])

    def _deliver_later(self, owner: Owner, records: Records) -> None:
        """Queue results for `_deliver_taken`: whoever holds the lock records them once it has
        let go of it, so that a caller woken by them finds the pool free."""
        self._taken.append((owner, records))

    def _deliver_taken(self) -> None:
        """Record the queued results; any thread, not under the lock (each pop is atomic)."""
        while self._taken:
            owner, records = self._taken.popleft()
            try:
                self._deliver(owner, records)
            except BaseException:
                names = sorted({record[1] for record in records})
                logger.critical("engine failed to record results of %s", names, exc_info=True)


def _frozen(indices: Sequence[int]) -> Sequence[int]:
    """A range as it is (it holds no objects), anything else as a tuple."""
    return indices if isinstance(indices, (range, tuple)) else tuple(indices)


def _unpicklable_request(why: str) -> Callable[[str], TargetError]:
    return lambda target: SerializationError(target, "request", why)


def _pickled_requests(requests: Sequence[Any]) -> bytes:
    """Plain pickle when it will do (quick); cloudpickle for what only it can: lambdas, local
    functions, and what pickle would name by reference in `__main__`, which a worker lacks."""
    try:
        blob = pickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in blob:
            return blob
    except Exception:
        pass
    return cast(bytes, cloudpickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL))


def _failure(body: bytes, started: float, finished: float, pid: int | None) -> Outcome:
    """A target's own exception, unpickled in the caller (as text if it won't load here)."""
    text = ""
    try:
        blob, text = pickle.loads(body)
        value = pickle.loads(blob)
    except BaseException as exc:
        value = RemoteError("unknown", f"unpickling in the caller failed: "
                                       f"{type(exc).__name__}: {exc}", text)
    return Outcome(False, value, text, started, finished, pid)


def _kill_tree(pid: int | None) -> None:
    """SIGKILL a worker and every process it started, so no grandchild outlives it."""
    if pid is None:
        return
    import psutil  # imported when first needed: it is slow to import

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
