"""The engine's face: register services, invoke targets, wait for or stream their results."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import logging
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sized
from itertools import repeat
from operator import itemgetter
from types import TracebackType
from typing import Any, TypeVar, cast, overload

import cloudpickle

from ._callbacks import CallbackPool
from ._context import Channel, current_context
from ._exceptions import DuplicateCidError, EngineClosedError, TargetCancelledError
from ._invocation import Columns, Invocation, NamedCallback, Phase
from ._names import Registry
from ._pool import Limits, Owner, TargetPool
from ._result import Records, Result

logger = logging.getLogger("engine")

F = TypeVar("F", bound=Callable[..., Any])
Targets = Mapping[Any, Any] | Iterable[tuple[Any, Any]]
Callbacks = Iterable[Any] | Callable[..., Any] | str | None


class EngineState(enum.Enum):
    """An engine's lifecycle; it only moves forward."""

    OPEN = "open"  #: accepting invocations
    CLOSING = "closing"  #: shutdown began: no new invocations; accepted work still finishes
    CLOSED = "closed"  #: workers and callback threads are gone


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of what the engine has done; the backlog shows callbacks lagging behind."""

    state: EngineState
    worker_pids: tuple[int, ...]
    workers_started: int
    worker_deaths: int  #: workers lost while running a target: crashes, timeouts, cancellations
    workers_recycled: int  #: healthy workers replaced: max_tasks_per_worker, memory limit
    worker_start_failures: int
    retries: int  #: attempts run again
    invocations_active: int
    callbacks_submitted: int
    callbacks_succeeded: int
    callbacks_failed: int
    callback_backlog: int  #: callbacks queued or running now
    callback_max_lag: float  #: the longest any callback waited for a thread, seconds


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Engine:
    """Runs targets in parallel worker processes and calls back for each of them.

    ``Engine(workers=None, callback_workers=None, timeout=None)``: `workers` processes (default:
    the usable CPUs), up to `callback_workers` callback threads (default: CPUs + 4, at most 32)
    or any `callback_executor`, and a default per-target time limit in seconds. A worker is
    replaced after `max_tasks_per_worker` targets, or once its resident memory passes
    `max_memory_per_worker` (bytes or ``"512MB"``; a target growing past it is killed).
    `retries` runs a target again after a crash or a timeout, and after the exceptions in
    `retry_on`. `initializer(*initargs)` runs in each worker before it serves; if it fails in
    three workers in a row, every target fails with `WorkerStartError` saying why.
    """

    def __init__(self, workers: int | None = None, callback_workers: int | None = None,
                 timeout: float | None = None, *, source: str | None = None,
                 callback_executor: concurrent.futures.Executor | None = None,
                 max_tasks_per_worker: int | None = None,
                 max_memory_per_worker: int | str | None = None,
                 retries: int = 0, retry_on: tuple[type[BaseException], ...] = (),
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 history: int = 1024) -> None:
        workers = _default_workers() if workers is None else workers
        _check_count("workers", workers, minimum=1)
        if max_tasks_per_worker is not None:
            _check_count("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        _check_count("history", history, minimum=0)
        _check_timeout(timeout)
        _check_retries(retries, retry_on)
        self._default_timeout = timeout
        self._default_retries = (retries, retry_on)
        self._default_source = source
        self._history = history
        self._registry = Registry()
        self._lock = threading.Lock()
        self._active: dict[str, Invocation] = {}
        self._finished: collections.OrderedDict[str, Invocation] = collections.OrderedDict()
        self._state = EngineState.OPEN
        self._closer: threading.Thread | None = None
        if callback_workers is None:
            callback_workers = min(32, _default_workers() + 4)
        self._callbacks = CallbackPool(callback_workers, callback_executor)
        memory = None if max_memory_per_worker is None else parse_bytes(max_memory_per_worker)
        init = None if initializer is None else cloudpickle.dumps((initializer, tuple(initargs)))
        self._pool = TargetPool(workers, self._deliver,
                                Limits(max_tasks_per_worker, memory, initializer=init))
        _live_engines.add(self)

    # -- services --------------------------------------------------------------------------------

    @overload
    def register(self, name: str) -> Callable[[F], F]: ...
    @overload
    def register(self, name: str, fn: F) -> F: ...

    def register(self, name: str, fn: F | None = None) -> F | Callable[[F], F]:
        """Register `fn` as a named target or callback; without `fn`, a decorator."""
        if fn is None:
            def decorate(fn: F) -> F:
                self._registry.register(name, fn)
                return fn
            return decorate
        self._registry.register(name, fn)
        return fn

    # -- invocations -----------------------------------------------------------------------------

    def invoke(self, targets: Targets, callbacks: Callbacks = None, cid: str | None = None,
               source: str | None = None, timeout: float | None = None,
               retries: int | None = None,
               retry_on: tuple[type[BaseException], ...] | None = None,
               keep_results: bool = True) -> str:
        """Run every target in parallel; call each callback once per target; return the CID.

        `targets` is ``{target: request}``, or ``(target, request)`` pairs to run one target
        many times (an iterator is pulled lazily, as workers free up). A target is a callable,
        a registered name or ``"package.module:function"``. `timeout` limits each target's run;
        it, `retries` and `retry_on` default to the engine's. With ``keep_results=False`` the
        results go to the callbacks only, so that memory does not grow with the invocation:
        `wait` then returns an empty mapping or list, and `as_completed` raises.
        """
        return self._start(targets, Channel.PARALLEL_EXEC_CALL, callbacks, None, cid,
                           source, timeout, retries, retry_on, keep_results).cid

    def fanout(self, targets: Targets, on_target: Callbacks = None, on_final: Callbacks = None,
               cid: str | None = None, source: str | None = None,
               timeout: float | None = None, retries: int | None = None,
               retry_on: tuple[type[BaseException], ...] | None = None,
               keep_results: bool = True) -> str:
        """`invoke`, plus `on_final` callbacks run once, after every target has its result."""
        return self._start(targets, Channel.FANOUT_CALL, on_target, on_final, cid, source,
                           timeout, retries, retry_on, keep_results).cid

    def map(self, target: Any, requests: Iterable[Any], callbacks: Callbacks = None, *,
            cid: str | None = None, source: str | None = None, timeout: float | None = None,
            retries: int | None = None,
            retry_on: tuple[type[BaseException], ...] | None = None) -> Iterator[Any]:
        """Run `target` once per request; the responses in order, as
        `concurrent.futures.Executor.map` gives them: a target that failed raises its exception
        in its turn (its own, or the `engine.TargetError` that says why it has none).

        One invocation, started at once, as ``invoke([(target, r) for r in requests], ...)``
        would be, without the pairs or a `Result` per target: the quickest way to run many
        small targets. `timeout` limits each target's run, as in `invoke` (not the iteration).
        Leaving the iteration early (a `break`, or a target's exception) cancels the targets not
        yet sent to a worker. The results are the iterator's alone, as with
        ``keep_results=False`` (``wait(cid)`` only waits), and no more targets are sent while
        it is `STREAM_BACKLOG` results behind: memory stays bounded however slow its reader.
        """
        invocation = self._start(_Each(target, requests), Channel.PARALLEL_EXEC_CALL, callbacks,
                                 None, cid, source, timeout, retries, retry_on, False)
        return invocation.responses()

    def wait(self, cid: str, timeout: float | None = None) -> dict[Any, Result] | list[Result]:
        """Block until every target of `cid` has its result and every callback has finished.

        Returns ``{target: Result}`` for a mapping, else one Result per pair, in order.
        Raises `TimeoutError` if that takes longer than `timeout` seconds.
        """
        invocation = self._lookup(cid)
        if not self._callbacks.owns_current_thread():
            return invocation.collect(timeout)
        context = current_context()
        if context is not None and context.cid == cid:
            raise RuntimeError(f"a callback of invocation {cid!r} cannot wait for it: it would "
                               f"wait for itself")
        with self._callbacks.waiting():
            return invocation.collect(timeout)

    def as_completed(self, cid: str, timeout: float | None = None) -> Iterator[Result]:
        """Yield the results of `cid` as they are recorded, without waiting for callbacks."""
        invocation = self._lookup(cid)
        if not invocation.keep_results:
            raise ValueError(f"invocation {cid!r} keeps no results to stream "
                             f"(keep_results=False, or a map): its callbacks get them")
        return invocation.stream(timeout)

    def cancel(self, cid: str) -> bool:
        """Cancel `cid`: queued targets never start, running ones are killed; each gets a
        `TargetCancelledError` result and its callbacks still run. False if nothing was left."""
        invocation = self._lookup(cid)
        if invocation.phase is not Phase.RUNNING:
            return False
        invocation.cancel()
        self._pool.kill_running(invocation, _cancelled_while_running)
        return True

    def stats(self) -> EngineStats:
        pool, callbacks = self._pool.stats, self._callbacks.stats
        with self._lock:
            active = len(self._active)
        return EngineStats(self._state, self._pool.pids, pool.workers_started, pool.worker_deaths,
                           pool.workers_recycled, pool.start_failures, pool.retries, active,
                           callbacks.submitted, callbacks.succeeded, callbacks.failed,
                           callbacks.backlog, callbacks.max_lag)

    # -- lifecycle -------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel: bool = False,
                 timeout: float | None = None) -> None:
        """Stop accepting invocations, finish the accepted ones, then stop every process.

        With `wait`, block until every running target finished, every pending callback ran and
        no worker is left. `cancel` cancels what is queued or running first. After `timeout`
        seconds the rest is cancelled and callbacks still running are abandoned (and logged).
        """
        if wait and self._callbacks.owns_current_thread():
            raise RuntimeError("a callback cannot shutdown(wait=True) the engine that runs it: "
                               "it would wait for itself; use shutdown(wait=False)")
        here = False
        with self._lock:
            if self._state is EngineState.OPEN:
                self._state = EngineState.CLOSING
                self._closer = threading.Thread(target=self._close, args=(timeout,),
                                                name="engine-shutdown", daemon=True)
                try:
                    self._closer.start()
                except RuntimeError:  # no thread may start (exit on CPython 3.12): close here
                    self._closer, here = None, True
            active = list(self._active)
            closer = self._closer
        if cancel:
            for cid in active:
                self.cancel(cid)
        if here:
            self._close(timeout)
        if wait and closer is not None and closer is not threading.current_thread():
            closer.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Ctrl-C or SystemExit: stop now rather than finish every queued target first.
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        self.shutdown(wait=True, cancel=interrupted)

    def __repr__(self) -> str:
        return f"<engine.Engine {self._state.value} workers={len(self._pool.pids)}>"

    # -- internals -------------------------------------------------------------------------------

    def _start(self, targets: Targets | _Each, channel: Channel, on_target: Callbacks,
               on_final: Callbacks, cid: str | None, source: str | None,
               timeout: float | None, retries: int | None,
               retry_on: tuple[type[BaseException], ...] | None,
               keep_results: bool) -> Invocation:
        if self._state is not EngineState.OPEN:
            raise EngineClosedError("the engine is shut down; it accepts no invocations")
        if cid is not None and (not isinstance(cid, str) or not cid):
            raise TypeError(f"cid must be a non-empty str, not {cid!r}")
        _check_timeout(timeout)
        retries = self._default_retries[0] if retries is None else retries
        retry_on = self._default_retries[1] if retry_on is None else retry_on
        _check_retries(retries, retry_on)
        callbacks_on_target = self._resolve_callbacks(on_target)
        callbacks_on_final = self._resolve_callbacks(on_final)
        items, total, keys, checked = _feed(targets)
        invocation = Invocation(
            cid=cid or uuid.uuid4().hex,
            source=source or self._default_source or _caller_module(),
            channel=channel, items=items, keys=keys, registry=self._registry,
            timeout=self._default_timeout if timeout is None else timeout,
            retries=retries, retry_on=retry_on, keep_results=keep_results,
            on_target=callbacks_on_target, on_final=callbacks_on_final,
            callbacks=self._callbacks, retire=self._retire, pool=self._pool,
            streamed=isinstance(targets, _Each))
        for target in checked:  # bad input fails here, before anything starts
            invocation.resolve(target)
        with self._lock:
            if self._state is not EngineState.OPEN:
                raise EngineClosedError("the engine is shut down; it accepts no invocations")
            if invocation.cid in self._active:
                raise DuplicateCidError(invocation.cid)
            self._active[invocation.cid] = invocation
        if total == 0:
            invocation.next_tasks(1)  # sees the end of the input: fan-in runs at once
        else:
            self._pool.add_feed(invocation, here=total is not None)
        return invocation

    def _resolve_callbacks(self, callbacks: Callbacks) -> list[NamedCallback]:
        if callbacks is None:
            return []
        if isinstance(callbacks, str) or callable(callbacks):
            callbacks = [callbacks]
        return [self._registry.resolve(callback, "callback") for callback in callbacks]

    def _deliver(self, owner: Owner, records: Records) -> None:
        cast(Invocation, owner).record_all(records)

    def _retire(self, invocation: Invocation) -> None:
        with self._lock:
            if self._active.get(invocation.cid) is invocation:
                del self._active[invocation.cid]
            self._finished[invocation.cid] = invocation
            self._finished.move_to_end(invocation.cid)
            while len(self._finished) > self._history:
                self._finished.popitem(last=False)

    def _lookup(self, cid: str) -> Invocation:
        with self._lock:
            invocation = self._active.get(cid) or self._finished.get(cid)
        if invocation is None:
            raise KeyError(f"no invocation with CID {cid!r} (finished ones are kept for the last "
                           f"{self._history} invocations)")
        return invocation

    def _close(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for invocation in self._snapshot():
            invocation.release()  # a map whose iterator is not read finishes all the same
        for invocation in self._snapshot():
            if not invocation.wait_done(_remaining(deadline)):
                break
        # (a finished invocation may not be retired yet: its last thread is about to)
        leftover = [inv for inv in self._snapshot() if inv.phase is not Phase.DONE]
        if leftover:
            logger.warning("engine shutdown timed out; cancelling %d invocations: %s",
                           len(leftover),
                           "; ".join(f"{inv.cid} ({inv.progress()})" for inv in leftover))
            for invocation in leftover:
                invocation.cancel()
                self._pool.kill_running(invocation, _cancelled_while_running)
        self._pool.close()
        self._pool.join()
        abandoned = self._callbacks.shutdown(_remaining(deadline))
        if abandoned:
            logger.warning("engine shutdown abandoned callbacks still running: %s",
                           ", ".join(abandoned))
        with self._lock:
            self._state = EngineState.CLOSED
        _live_engines.discard(self)

    def _snapshot(self) -> list[Invocation]:
        with self._lock:
            return list(self._active.values())


@dataclasses.dataclass(frozen=True, slots=True)
class _Each:
    """`map`'s input: one target over many requests, with no pair built for each."""

    target: Any
    requests: Iterable[Any]


def _feed(targets: Targets | _Each) -> tuple[Columns | Iterator[Any], int | None,
                                             list[Any] | None, Iterable[Any]]:
    """(the input as columns, or as an iterator of pairs if it is lazy; its size or None; the
    mapping's keys or None; the targets to check before anything starts) for what `invoke` or
    `map` was given."""
    if isinstance(targets, _Each):
        requests = targets.requests
        if not isinstance(requests, Sized):
            return zip(repeat(targets.target), requests), None, None, (targets.target,)
        if not (isinstance(requests, (list, tuple, range))
                and type(requests) in (list, tuple, range)):  # (a subclass may slice otherwise)
            requests = list(requests)
        return Columns(None, targets.target, requests), len(requests), None, (targets.target,)
    items, total, keys = _normalize(targets)
    if total is None:
        return iter(items), None, keys, ()
    column = keys if keys is not None else list(map(itemgetter(0), items))
    return Columns(column, None, list(map(itemgetter(1), items))), total, keys, _distinct(column)


def _normalize(targets: Targets) -> tuple[Iterable[Any], int | None, list[Any] | None]:
    """(items, total or None if lazy, mapping keys or None) for what `invoke` was given."""
    if isinstance(targets, Mapping):
        items = list(targets.items())
        return items, len(items), list(map(itemgetter(0), items))
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TypeError("targets must be a mapping {target: request} or an iterable of "
                        f"(target, request) pairs, not {type(targets).__name__}")
    if isinstance(targets, Collection):
        items = list(targets)
        if not (all(issubclass(kind, tuple) for kind in set(map(type, items)))
                and set(map(len, items)) <= {2}):  # checked quickly: in C, not item by item
            for position, item in enumerate(items):
                if not isinstance(item, tuple) or len(item) != 2:
                    raise TypeError(f"targets[{position}] must be a (target, request) pair, "
                                    f"not {item!r}")
        return items, len(items), None
    return targets, None, None


def _distinct(targets: list[Any]) -> Iterable[Any]:
    """Each target once, if they are hashable (functions are); else all of them."""
    try:
        return dict.fromkeys(targets)
    except TypeError:
        return targets


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, not {value!r}")


def _check_retries(retries: int, retry_on: tuple[type[BaseException], ...]) -> None:
    _check_count("retries", retries, minimum=0)
    if not isinstance(retry_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
        raise TypeError(f"retry_on must be a tuple of exception classes, not {retry_on!r}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(size: int | str) -> int:
    """``"512MB"`` -> 512_000_000, ``"1.5GiB"`` -> 1_610_612_736; an int is bytes already."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
        if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"a memory size must be a positive number of bytes or a string such as "
                     f"'512MB' or '2GiB', not {size!r}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")


def _cancelled_while_running(target: str) -> TargetCancelledError:
    return TargetCancelledError(target, running=True)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _caller_module() -> str:
    """The default `source`: the module that called invoke/fanout."""
    frame = sys._getframe(3)
    return str(frame.f_globals.get("__name__", "engine"))


# Engines not shut down by their owner are shut down before the interpreter joins its threads:
# pending results and callbacks are not lost, and no worker outlives the script.
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _shutdown_at_exit() -> None:
    interrupted = isinstance(getattr(sys, "last_value", None), (KeyboardInterrupt, SystemExit))
    for engine in list(_live_engines):
        engine.shutdown(wait=True, cancel=interrupted)


threading._register_atexit(_shutdown_at_exit)  # type: ignore[attr-defined]


for _public in (Engine, EngineState, EngineStats):  # reprs and pickles say engine.X
    _public.__module__ = "engine"
