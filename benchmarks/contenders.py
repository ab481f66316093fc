"""The engine and each peer behind one small adapter, so that every workload is written once.

A contender starts a pool of `workers` processes (`start`), runs a batch of ``(target,
request)`` calls submitted together with the peer's own fastest one-by-one call and native
per-target callback (`run`), maps a target over an iterable in chunks (`map`), and stops with
everything it started (`close`). Libraries are imported in `start`, so that a start-up
measurement counts them and a missing peer costs nothing.

Every pool starts fresh interpreters (spawn, loky's fork + exec, or the engine's own):
fork would start faster but is unsafe in a caller that runs threads.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import workloads

Call = tuple[Callable[..., Any], Any]


@dataclass(frozen=True)
class Done:
    """One target's outcome, as the caller's side recorded it."""

    index: int
    ok: bool
    value: Any  #: the response, or the exception
    seen: float  #: epoch seconds when the caller's side recorded it


class Tally:
    """A per-target callback that counts how many of its calls finished."""

    def __init__(self, fn: Callable[[Any], Any], total: int) -> None:
        self._fn, self._total, self._count = fn, total, 0
        self._lock = threading.Lock()
        self._all = threading.Event()
        if total == 0:
            self._all.set()

    @classmethod
    def of(cls, fn: Callable[[Any], Any] | None, total: int) -> Tally | None:
        return None if fn is None else cls(fn, total)

    def call(self, arg: Any) -> None:
        try:
            self._fn(arg)
        finally:
            with self._lock:
                self._count += 1
                if self._count >= self._total:
                    self._all.set()

    def wait(self, timeout: float) -> bool:
        return self._all.wait(timeout)


class Run:
    """A batch of calls submitted together: its results and the state of its callbacks."""

    def __init__(self, total: int, tally: Tally | None) -> None:
        self.total, self.tally = total, tally
        self.done: list[Done] = []

    def results(self, timeout: float) -> list[Done]:
        """The results recorded within `timeout` seconds (all of them, unless some are lost)."""
        raise NotImplementedError

    def callbacks_done(self, timeout: float) -> bool:
        return self.tally is None or self.tally.wait(timeout)


class PushRun(Run):
    """Results recorded by the peer's own per-target callback, before the user's callback."""

    def __init__(self, total: int, callback: Callable[[Any], Any] | None) -> None:
        super().__init__(total, Tally.of(callback, total))
        self._lock = threading.Lock()
        self._all = threading.Event()

    def record(self, index: int, ok: bool, value: Any, arg: Any) -> None:
        self._append(Done(index, ok, value, time.time()))
        if self.tally is not None:
            self.tally.call(arg)

    def refused(self, index: int, exc: BaseException) -> None:
        """The pool refused the call (a broken pool): its result is lost, no callback runs."""
        self._append(Done(index, False, exc, time.time()))

    def _append(self, done: Done) -> None:
        with self._lock:
            self.done.append(done)
            if len(self.done) >= self.total:
                self._all.set()

    def on_value(self, index: int) -> Callable[[Any], None]:
        return lambda value: self.record(index, True, value, value)

    def on_error(self, index: int) -> Callable[[BaseException], None]:
        return lambda exc: self.record(index, False, exc, exc)

    def on_future(self, index: int) -> Callable[[Any], None]:
        def done(future: Any) -> None:
            exc = _future_exception(future)
            self.record(index, exc is None, future.result() if exc is None else exc, future)
        return done

    def results(self, timeout: float) -> list[Done]:
        self._all.wait(timeout)
        with self._lock:
            return list(self.done)


class PullRun(Run):
    """Results pulled, in the caller's thread, from the peer's completion stream of
    ``(index, ok, response or exception)``; `results` is called once."""

    def __init__(self, total: int, tally: Tally | None,
                 stream: Callable[[float], Iterator[tuple[int, bool, Any]]]) -> None:
        super().__init__(total, tally)
        self._stream = stream

    def results(self, timeout: float) -> list[Done]:
        if len(self.done) < self.total:
            try:
                for index, ok, value in self._stream(timeout):
                    self.done.append(Done(index, ok, value, time.time()))
            except TimeoutError:
                pass
        return list(self.done)


def _future_exception(future: Any) -> BaseException | None:
    if future.cancelled():
        return TimeoutError("cancelled")
    return future.exception()


class Contender:
    key = ""  #: short name for --peers
    label = ""  #: name in the tables
    module = ""  #: what must be importable (and what start-up imports)
    entry = ""  #: the name a user takes from `module`, if importing it does more (start-up)
    submit_name = "submit"  #: the peer's one-by-one call, for the tables
    chunked_map = True  #: whether `map` takes a chunk size
    native_limit = False  #: whether a per-target time limit stops the target

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    def __enter__(self) -> Contender:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run(self, calls: list[Call], callback: Callable[[Any], Any] | None = None,
            limit: float | None = None) -> Run:
        """Submit every call, with `callback` once per target and a time `limit` per target
        where the peer has one (`native_limit`). A call the pool refuses is a lost result."""
        run = PushRun(len(calls), callback)
        for index, (fn, arg) in enumerate(calls):
            try:
                self.submit(run, index, fn, arg, limit)
            except Exception as exc:
                run.refused(index, exc)
        return run

    def submit(self, run: PushRun, index: int, fn: Callable[[Any], Any], arg: Any,
               limit: float | None) -> None:
        """Submit one call, its result recorded into `run` by the peer's native callback."""
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        raise NotImplementedError

    def warm(self, target: Callable[[float], Any] = workloads.sleep_pid,
             timeout: float = 120) -> None:
        """Every worker is up and has served (two short sleeps per worker)."""
        done = self.run([(target, 0.05)] * (2 * self.workers)).results(timeout)
        if len(done) < 2 * self.workers or not all(d.ok for d in done):
            raise RuntimeError(f"{self.label} did not start within {timeout} s: {done}")


class EngineContender(Contender):
    key = label = module = "engine"
    entry = "Engine"  # the package defers importing the engine itself to this name
    submit_name = "invoke"
    native_limit = True

    def start(self) -> None:
        from engine import Engine

        self.engine = Engine(workers=self.workers)

    def close(self) -> None:
        self.engine.shutdown(wait=True, cancel=True, timeout=10)

    def run(self, calls: list[Call], callback: Callable[[Any], Any] | None = None,
            limit: float | None = None) -> Run:
        """One invocation for the whole batch, as the engine is meant to be used."""
        tally = Tally.of(callback, len(calls))
        cid = self.engine.invoke(calls, callbacks=None if tally is None else [tally.call],
                                 timeout=limit)

        def stream(timeout: float) -> Iterator[tuple[int, bool, Any]]:
            for result in self.engine.as_completed(cid, timeout=timeout):
                yield result.index, result.ok, result.response if result.ok else result.exception
        return PullRun(len(calls), tally, stream)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        """`Engine.map`: the responses in order, as a peer's `map` gives them (the engine
        batches by itself, so there is no `chunksize`)."""
        return self.engine.map(fn, items)

    def wait_map(self, fn: Callable[[Any], Any], items: Iterable[Any],
                 chunksize: int) -> Iterable[Any]:
        """One invocation of pairs, its `Result`s taken with `wait`, then each one's response."""
        results = self.engine.wait(self.engine.invoke([(fn, item) for item in items]))
        return (result.result() for result in results)


class MpPool(Contender):
    key, label, module = "mp.Pool", "multiprocessing.Pool", "multiprocessing.pool"
    submit_name = "apply_async"

    def start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(self.workers)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def submit(self, run: PushRun, index: int, fn: Callable[[Any], Any], arg: Any,
               limit: float | None) -> None:
        self.pool.apply_async(fn, (arg,), callback=run.on_value(index),
                              error_callback=run.on_error(index))

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.imap(fn, items, chunksize)


class FuturesPeer(Contender):
    """A peer whose one-by-one call returns a `concurrent.futures.Future`."""

    pool: Any

    def submit(self, run: PushRun, index: int, fn: Callable[[Any], Any], arg: Any,
               limit: float | None) -> None:
        self.future(fn, arg, limit).add_done_callback(run.on_future(index))

    def future(self, fn: Callable[[Any], Any], arg: Any, limit: float | None) -> Any:
        return self.pool.submit(fn, arg)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.map(fn, items, chunksize=chunksize)


class Ppe(FuturesPeer):
    key, label, module = "PPE", "ProcessPoolExecutor", "concurrent.futures.process"

    def start(self) -> None:
        import concurrent.futures
        import multiprocessing

        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Loky(FuturesPeer):
    key = label = module = "loky"

    def start(self) -> None:
        import loky

        self.pool = loky.ProcessPoolExecutor(self.workers)

    def close(self) -> None:
        self.pool.shutdown(wait=False, kill_workers=True)


class Pebble(FuturesPeer):
    key = label = module = "pebble"
    submit_name = "schedule"
    native_limit = True

    def start(self) -> None:
        import multiprocessing

        import pebble

        self.pool = pebble.ProcessPool(self.workers, context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=10)

    def future(self, fn: Callable[[Any], Any], arg: Any, limit: float | None) -> Any:
        return self.pool.schedule(fn, (arg,), timeout=limit)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.map(fn, items, chunksize=chunksize).result()


class Mpire(Contender):
    key = label = module = "mpire"
    submit_name = "apply_async"
    native_limit = True  # task_timeout interrupts the target inside its worker

    def start(self) -> None:
        import mpire

        self.pool = mpire.WorkerPool(self.workers, start_method="spawn", keep_alive=True)

    def close(self) -> None:
        self.pool.terminate()

    def submit(self, run: PushRun, index: int, fn: Callable[[Any], Any], arg: Any,
               limit: float | None) -> None:
        self.pool.apply_async(fn, (arg,), callback=run.on_value(index),
                              error_callback=run.on_error(index), task_timeout=limit)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.imap(fn, items, chunk_size=chunksize)


class Dask(Contender):
    """A LocalCluster of `workers` processes of one thread each, its scheduler in the caller."""

    key, label, module = "dask", "dask distributed", "distributed"
    chunked_map = False  # client.map sends one task per item

    def start(self) -> None:
        import distributed

        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.cluster = distributed.LocalCluster(
            n_workers=self.workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.CRITICAL)
        self.client = distributed.Client(self.cluster)

    def close(self) -> None:
        self.client.close(timeout=10)
        self.cluster.close(timeout=10)

    def run(self, calls: list[Call], callback: Callable[[Any], Any] | None = None,
            limit: float | None = None) -> Run:
        """Results are pulled from `as_completed`: done-callbacks all run on one thread, where a
        slow callback would delay the recording of the next result."""
        import distributed

        futures = [self.client.submit(fn, arg, pure=False) for fn, arg in calls]
        index = {future.key: position for position, future in enumerate(futures)}

        def stream(timeout: float) -> Iterator[tuple[int, bool, Any]]:
            for future in distributed.as_completed(futures, timeout=timeout):
                exc = _future_exception(future)
                yield index[future.key], exc is None, future.result() if exc is None else exc

        tally = Tally.of(callback, len(calls))
        if tally is not None:
            for future in futures:
                future.add_done_callback(tally.call)
        return PullRun(len(calls), tally, stream)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        # client.map refuses iterators: the items are all materialised first
        return self.client.gather(self.client.map(fn, list(items), pure=False))


CONTENDERS: list[type[Contender]] = [EngineContender, MpPool, Ppe, Loky, Pebble, Mpire, Dask]
BY_KEY = {cls.key: cls for cls in CONTENDERS}
