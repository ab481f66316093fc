"""One invocation: its targets as a feed for the pool, its results, its callbacks' accounting."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import operator
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cloudpickle

from ._callbacks import Callback, CallbackPool
from ._context import CallContext, Channel
from ._exceptions import SerializationError, TargetCancelledError
from ._names import Registry
from ._pool import Batch, Pace, TargetPool
from ._result import (
    Outcome,
    Record,
    Records,
    Responses,
    Result,
    as_results,
    record,
    utc_timestamp,
)

logger = logging.getLogger("engine")
_NOTHING = object()
_BY_INDEX = operator.itemgetter(2)  # a Result's index
#: On-target callbacks of one invocation waiting or running, past which no more of its targets
#: are sent (`keep_results=False`): memory then holds the work in flight, not every payload of
#: a stream whose callbacks lag.
CALLBACK_BACKLOG = 2048
#: Results of a map that its iterator has not yet handed out, past which no more of its targets
#: are sent: a consumer slower than the workers holds a bounded backlog, not the whole input.
STREAM_BACKLOG = 8192
_CANCEL_CHUNK = 4096  #: targets cancelled before they were pulled, recorded together

NamedCallback = tuple[str, Callback]


@dataclasses.dataclass(frozen=True, slots=True)
class Columns:
    """An input whose size is known, kept as a column of targets and one of requests: a batch
    is a slice of each, with no object made per target. `targets` is None where `target` runs
    every request (`Engine.map`)."""

    targets: Sequence[Any] | None
    target: Any
    requests: Sequence[Any]

    def pair(self, index: int) -> tuple[Any, Any]:
        target = self.target if self.targets is None else self.targets[index]
        return target, self.requests[index]


_CHANNELS = {  # call channel -> (on-target channel, on-final channel)
    Channel.PARALLEL_EXEC_CALL: (Channel.PARALLEL_EXEC_ON_TARGET, None),
    Channel.FANOUT_CALL: (Channel.FANOUT_ON_TARGET, Channel.FANOUT_ON_FINAL),
}


def pickled_function(fn: Callable[..., Any]) -> bytes:
    """`fn` pickled for a worker. A function pickled by reference (module and name) is pickled
    once; any other (a lambda, a closure, one of `__main__`) is pickled by value at each
    invocation, so that it travels with the globals and closure it has then."""
    try:
        return _BY_REFERENCE[fn]
    except (KeyError, TypeError):
        pass
    blob: bytes = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        if blob == pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL):
            _BY_REFERENCE[fn] = blob
    except Exception:
        pass  # no reference to it: cloudpickle pickled it by value
    return blob


_BY_REFERENCE: weakref.WeakKeyDictionary[Callable[..., Any], bytes] = \
    weakref.WeakKeyDictionary()


class Phase(enum.Enum):
    """An invocation's lifecycle; it only moves forward."""

    RUNNING = "running"  #: some targets have no result yet
    CALLBACKS = "callbacks"  #: every target has its result; callbacks are still running
    DONE = "done"  #: every result recorded and every callback finished


class Invocation:
    """The state of one `invoke`/`fanout` call, shared by the caller, the manager and callbacks.

    Lock order: `_feed_lock` (pulling targets), then `_cond` (results); never the reverse.
    """

    def __init__(self, *, cid: str, source: str, channel: Channel,
                 items: Columns | Iterator[Any], keys: Sequence[Any] | None, registry: Registry,
                 timeout: float | None, retries: int, retry_on: tuple[type[BaseException], ...],
                 keep_results: bool,
                 on_target: list[NamedCallback], on_final: list[NamedCallback],
                 callbacks: CallbackPool, retire: Callable[[Invocation], None],
                 pool: TargetPool, streamed: bool = False) -> None:
        self.cid, self.source, self.channel = cid, source, channel
        self.prefix = (channel.value, cid, source)
        self.req_ts = time.time()
        self.timeout = timeout
        self.retries, self.retry_on = retries, retry_on
        self.pace = Pace()
        self.on_target, self.on_final = on_target, on_final
        #: the input, pulled only as workers free up: columns, or an iterator of pairs (lazy)
        self._items = items
        self._keys = keys  # the mapping's keys, for wait(); None for pairs
        self._registry = registry
        self._resolved: dict[Any, tuple[str, bytes | SerializationError]] = {}
        self._callbacks, self._retire, self._pool = callbacks, retire, pool
        self._feed_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pulled = 0
        #: None until a lazy iterator is exhausted
        self.total = len(items.requests) if isinstance(items, Columns) else None
        self.keep_results = keep_results
        #: its results go to one iterator (`responses`, for `Engine.map`), which takes them
        self.streamed = streamed
        self._paced = streamed  # its feed waits for the iterator (see `release`)
        self._untaken = 0  # results of the stream recorded and not yet handed out
        # Results in completion order, one `Responses` or tuple of records per delivery; none
        # unless keep_results or streamed. Tuples of plain values drop out of the garbage
        # collector's view, so a million kept results cost its full collections a few visits.
        self._chunks: list[Responses | tuple[Record, ...]] = []
        self._recorded = bytearray()  # 1 at each index that has its result: 1 byte a target
        self._count = 0
        self._data: list[tuple[dict[str, Any], ...]] = []  # fan-in payloads, likewise
        self._pending_callbacks = 0
        self._wakers: list[_Waker] = []  # threads waiting for news in `poll`, not on `_cond`
        self.phase = Phase.RUNNING
        self.cancelled = False

    # -- the feed the target pool pulls from (manager thread) ----------------------------------

    def next_tasks(self, limit: int) -> Batch | None:
        """Up to `limit` next targets as a batch; None once the input is exhausted or cancelled.

        A target that fails before it runs (it will not pickle, or a lazily given one is no
        target) is recorded here, and the input is read on.
        """
        with self._feed_lock:
            while not self.cancelled:
                if isinstance(self._items, Columns):
                    start, total = self._pulled, len(self._items.requests)
                    self._pulled = stop = min(start + limit, total)
                    batch = self._sliced_batch(self._items, start, stop)
                    exhausted = stop == total
                    if exhausted:  # all pulled: a finished invocation holds none of its input
                        self._items = iter(())
                    if start == stop:
                        self._set_total(total)  # an empty input: its end is news
                else:
                    pulled = self._pull_many(limit)
                    batch = self._batch(pulled)
                    exhausted = len(pulled) < limit
                if batch is not None or exhausted:
                    return batch
        return None

    @property
    def exhausted(self) -> bool:
        """Every target was pulled: their number is known, and reached."""
        return self._pulled == self.total

    def _sliced_batch(self, columns: Columns, start: int, stop: int) -> Batch | None:
        """The batch of targets `start` to `stop` of `columns`: one target for all, mostly."""
        if start == stop:
            return None
        count, requests = stop - start, columns.requests[start:stop]
        first = columns.target
        if columns.targets is not None:
            targets = columns.targets[start:stop]
            first = targets[0]
            try:  # (in C: no Python code a target, unless a target's own `==` runs)
                mixed = targets.count(first) < count
            except Exception:  # that `==` failed: the targets are taken one by one
                mixed = True
            if mixed:
                return self._batch(list(zip(range(start, stop), targets, requests, strict=True)))
        name, blob = self.resolve(first)
        if isinstance(blob, BaseException):
            self.record_all([record(self, index, name, Outcome.failure(blob))
                             for index in range(start, stop)])
            return None
        return Batch(self, range(start, stop), [name] * count, [blob], [0] * count, requests)

    def _batch(self, pulled: list[tuple[int, Any, Any]]) -> Batch | None:
        """The batch of (index, target, request) triples; the targets that fail are recorded."""
        indices, names, positions, requests = [], [], [], []
        functions: dict[bytes, int] = {}
        last: Any = _NOTHING  # consecutive targets are mostly the same: resolve once
        for index, target, request in pulled:
            if target is not last:
                fn_blob: bytes | BaseException
                try:
                    name, fn_blob = self.resolve(target)
                except Exception as exc:  # a lazily given bad target fails on its own
                    name, fn_blob = self._name(target), exc
                last = target
            if isinstance(fn_blob, BaseException):
                self.record(index, name, Outcome.failure(fn_blob))
                continue
            indices.append(index)
            names.append(name)
            positions.append(functions.setdefault(fn_blob, len(functions)))
            requests.append(request)
        if not indices:
            return None
        return Batch(self, indices, names, list(functions), positions, requests)

    def _pull_many(self, limit: int) -> list[tuple[int, Any, Any]]:
        """Up to `limit` next items of a lazy input; fewer only once it is exhausted."""
        pulled: list[tuple[int, Any, Any]] = []
        while len(pulled) < limit and (item := self._pull()) is not None:
            pulled.append(item)
        return pulled

    def _pull(self) -> tuple[int, Any, Any] | None:
        """The next (index, target, request), or None once the input is exhausted."""
        if isinstance(self._items, Columns):
            index = self._pulled
            if index == self.total:
                return None
            self._pulled = index + 1
            return index, *self._items.pair(index)
        while True:
            index = self._pulled
            try:
                item = next(self._items)
            except StopIteration:
                self._set_total(index)
                return None
            except Exception as exc:  # the caller's iterator broke: that ends the input
                self._pulled += 1
                self.record(index, "<targets iterator>", Outcome.failure(exc))
                self._set_total(index + 1)
                return None
            self._pulled = index + 1
            if isinstance(item, tuple) and len(item) == 2:
                return index, *item
            error = TypeError(f"targets[{index}] must be a (target, request) pair, not {item!r}")
            self.record(index, repr(item), Outcome.failure(error))

    def resolve(self, target: Any) -> tuple[str, bytes | SerializationError]:
        """The target's name and pickled function, or why it won't pickle (which fails only
        its own targets). Raises for a name or type that is no target at all."""
        try:
            return self._resolved[target]
        except (KeyError, TypeError):  # TypeError: an unhashable target is resolved every time
            pass
        name, fn = self._registry.resolve(target, "target")
        blob: bytes | SerializationError
        try:
            blob = pickled_function(fn)
        except Exception as exc:
            blob = SerializationError(name, "function", f"{type(exc).__name__}: {exc}")
        try:
            self._resolved[target] = (name, blob)
        except TypeError:
            pass
        return name, blob

    def _name(self, target: Any) -> str:
        try:
            return self.resolve(target)[0]
        except BaseException:
            return target if isinstance(target, str) else repr(target)

    def cancel(self) -> None:
        """Fail every target not yet pulled; the engine kills the running ones. They are
        recorded in bulk, each target name's traceback text made once (100,000 in 0.36 s, where
        one by one took 1.34)."""
        with self._feed_lock:
            self.cancelled = True
            records: list[Record] = []
            texts: dict[str, str | None] = {}
            moment = time.time()
            while (pulled := self._pull()) is not None:
                index, target, _ = pulled
                name = self._name(target)
                error = TargetCancelledError(name, running=False)
                if name not in texts:
                    texts[name] = Outcome.failure(error).traceback
                records.append(record(self, index, name,
                                      Outcome(False, error, texts[name], None, moment, None)))
                if len(records) == _CANCEL_CHUNK:
                    self.record_all(records)
                    records = []
            if records:
                self.record_all(records)

    # -- results and callbacks (any thread) ------------------------------------------------------

    def record(self, index: int, target: str, outcome: Outcome, attempts: int = 1) -> None:
        """Record a target's only result and queue its callbacks; never waits on them."""
        self.record_all([record(self, index, target, outcome, attempts)])

    def record_all(self, records: Records) -> None:
        """Record the results of a batch under one lock, and queue their callbacks."""
        results: list[Result] = []
        payloads: list[dict[str, Any]] = []
        if self.on_target or self.on_final:
            with_attempts = self.retries > 0
            results = as_results(records)
            payloads = [result.payload(self.source, with_attempts) for result in results]
        with self._cond:
            keep = self._mark_recorded(records)
            if keep is not None:  # (a bug: logged) only what goes with the fresh records
                records = list(itertools.compress(records, keep))
                results = list(itertools.compress(results, keep))
                payloads = list(itertools.compress(payloads, keep))
            self._count += len(records)
            if self.keep_results or self.streamed:
                self._chunks.append(records if isinstance(records, Responses) else tuple(records))
            if self.streamed:
                self._untaken += len(records)
            if self.on_final:
                self._data.append(tuple(payloads))
            self._pending_callbacks += len(self.on_target) * len(records)
            all_done = self._all_targets_done()
            if not all_done:
                self._notify()
        if self.on_target:
            channel = _CHANNELS[self.channel][0].value
            shared = len(self.on_target) + bool(self.on_final) > 1  # each gets its own copy
            self._callbacks.submit([
                (fn, name, dict(payload) if shared else payload,
                 (channel, self.cid, self.source, result.target, result.index),
                 self._callback_done)
                for result, payload in zip(results, payloads, strict=True)
                for name, fn in self.on_target])
        if all_done:
            self._finish_targets()
            with self._cond:  # the last results, told once their bookkeeping is done
                self._notify()

    def _mark_recorded(self, records: Records) -> list[bool] | None:
        """Under `_cond`: mark each record's target as having its result. None if every one is
        fresh, else which are: a second result for a target is a bug of the engine (logged, then
        dropped). A run of consecutive indices, as a list's batch is, is checked in C."""
        indices: Sequence[int] = records.indices if isinstance(records, Responses) \
            else list(map(_BY_INDEX, records))
        if not indices:
            return None
        recorded, first, count = self._recorded, indices[0], len(indices)
        if len(recorded) < first + count:
            recorded.extend(bytes(max(first + count - len(recorded), len(recorded))))
        run = range(first, first + count)
        if indices[-1] == run[-1] and recorded.find(1, first, first + count) < 0 \
                and (indices == run if isinstance(indices, range) else list(indices) == list(run)):
            recorded[first:first + count] = b"\1" * count
            return None
        keep = []
        for index in indices:
            if index >= len(recorded):
                recorded.extend(bytes(max(index + 1 - len(recorded), len(recorded))))
            elif recorded[index]:
                logger.error("engine got a second result for target %d of cid %s; ignored",
                             index, self.cid)
                keep.append(False)
                continue
            recorded[index] = 1
            keep.append(True)
        return None if all(keep) else keep

    def _set_total(self, total: int) -> None:
        with self._cond:
            self.total = total
            all_done = self._all_targets_done()
        if all_done:
            self._finish_targets()
            with self._cond:
                self._notify()

    def _all_targets_done(self) -> bool:
        """Under `_cond`: True exactly once, when the last result is in and the total known."""
        if self.phase is Phase.RUNNING and self.total is not None \
                and self._count == self.total:
            self.phase = Phase.CALLBACKS
            self._pending_callbacks += len(self.on_final)
            return True
        return False

    def _finish_targets(self) -> None:
        on_final = _CHANNELS[self.channel][1]
        if on_final is not None and self.on_final:
            context = CallContext(on_final, self.cid, self.source, None, None)
            payload = {
                "phase": "on-final",
                "source": self.source,
                "cid": self.cid,
                "req_ts_utc": utc_timestamp(self.req_ts),
                "on_target": [name for name, _ in self.on_target],
                "on_final": [name for name, _ in self.on_final],
            }
            data = list(itertools.chain.from_iterable(self._data))
            self._callbacks.submit([(fn, name, {**payload, "data": data.copy()}, context,
                                     self._callback_done) for name, fn in self.on_final])
        self._callback_done(0)

    @property
    def lagging(self) -> bool:
        """Whether its on-target callbacks are so far behind that the pool should pull no more
        targets: each waiting callback holds a payload, a response included. Only a stream that
        keeps no results is held back (one that keeps them grows with its input anyway), so no
        caller streaming its results with `as_completed` from a callback is ever held up. A
        map is held back likewise while its iterator is far behind (`STREAM_BACKLOG`)."""
        return (not self.keep_results and self._pending_callbacks > CALLBACK_BACKLOG) or \
            (self._paced and self._untaken > STREAM_BACKLOG)

    def release(self) -> None:
        """Let a map's feed run whatever its iterator does: at shutdown, or when a thread
        waits for it, which must not wait for a consumer that may never come. Once only; a
        feed that never waited for an iterator is left alone."""
        if self._paced:
            self._paced = False
            self._pool.resume()

    def _handed(self, count: int) -> None:
        """The iterator handed out `count` more results; the feed goes on once it caught up."""
        with self._cond:
            before = self._untaken
            self._untaken -= count
        if before > STREAM_BACKLOG >= self._untaken:
            self._pool.resume()

    def _notify(self) -> None:
        """Under `_cond`: wake every thread waiting for news of this invocation."""
        self._cond.notify_all()
        for waker in self._wakers:
            waker.set()

    def _callback_done(self, count: int = 1) -> None:
        with self._cond:
            before = self._pending_callbacks
            self._pending_callbacks -= count
            caught_up = before > CALLBACK_BACKLOG >= self._pending_callbacks
            done = self.phase is Phase.CALLBACKS and not self._pending_callbacks
            if done:
                self.phase = Phase.DONE
                self._notify()
        if caught_up:
            self._pool.resume()
        if done:
            self._retire(self)

    # -- what the caller waits for ---------------------------------------------------------------

    def wait_done(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.phase is Phase.DONE, timeout)

    def progress(self) -> str:
        with self._cond:
            return self._progress()

    def _progress(self) -> str:
        total = "?" if self.total is None else self.total
        return (f"{self._count} of {total} results, {self._pending_callbacks} callbacks "
                f"pending, {self.phase.value}")

    def collect(self, timeout: float | None) -> dict[Any, Result] | list[Result]:
        """Once every result is in and every callback finished: ``{target: Result}`` for a
        mapping, else one Result per pair in the order given. Results are made while the
        targets still run, not all at once after the last one."""
        self.release()  # (a map's results are its iterator's: this only waits)
        made: list[Result] = []
        for chunk in self._landing(timeout, lambda: self.phase is Phase.DONE):
            made += as_results(chunk)
        made.sort(key=_BY_INDEX)
        if self._keys is not None:
            return dict(zip(self._keys, made, strict=True)) if self.keep_results else {}
        return made

    def responses(self) -> Iterator[Any]:
        """Each target's response in input order, once it and every one before it are in; a
        failure raises its exception in its turn. Leaving early cancels the targets not yet
        sent to a worker. A batch's responses are handed on as they came (no `Result`), and
        the invocation keeps none of them: memory holds those not yet handed out, which stop
        the feed past `STREAM_BACKLOG` (a requeued or retried target still runs meanwhile)."""
        ahead: dict[int, Responses | Record] = {}  # landed before their turn, by first index
        position = 0
        try:
            for chunk in self._landing(None, lambda: self.phase is not Phase.RUNNING, take=True):
                if isinstance(chunk, Responses) and isinstance(chunk.indices, range):
                    ahead[chunk.indices.start] = chunk
                else:
                    ahead.update(zip(map(_BY_INDEX, chunk), chunk, strict=True))
                while position in ahead:
                    landed = ahead.pop(position)
                    if isinstance(landed, Responses):
                        yield from landed.values
                        self._handed(len(landed))
                        position += len(landed)
                    elif landed[3]:
                        yield landed[4]
                        self._handed(1)
                        position += 1
                    else:
                        raise landed[5]
        finally:
            with self._cond:  # what lands from now on has no taker
                self.streamed, self._chunks = False, []
            self.release()
            if self.phase is Phase.RUNNING:
                self.cancel()

    def stream(self, timeout: float | None) -> Iterator[Result]:
        for chunk in self._landing(timeout, lambda: self.phase is not Phase.RUNNING):
            yield from as_results(chunk)

    def _landing(self, timeout: float | None, over: Callable[[], bool], *,
                 take: bool = False) -> Iterator[Responses | tuple[Record, ...]]:
        """Each chunk of results as it lands, until `over()` holds (under `_cond`) and every
        chunk was given; `TimeoutError` once `timeout` seconds have passed. The chunks kept for
        `wait` are read; a stream's are taken (`take`), so that the invocation holds them no
        more; an invocation that keeps neither gives none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        position = 0
        while True:
            with self._cond:
                while position >= len(chunks := self._chunks if self.keep_results or take else ()):
                    if over():
                        return
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"invocation {self.cid!r} not done after {timeout} s: "
                                           f"{self._progress()}")
                    self._wait(remaining)
                landed = chunks[position:]  # all that is in: one lock for them
                if take:
                    self._chunks = []
                else:
                    position += len(landed)
            yield from landed

    def _wait(self, timeout: float | None) -> None:
        """Under `_cond`: wait for news. If the pool lends this thread the pipes of the workers
        running this invocation's last tasks, it waits on them and receives their outcomes
        itself (its result then needs no other thread); on the condition otherwise."""
        waker = _Waker.of_this_thread()  # (first: once lent, nothing may fail before the poll)
        loan = self._pool.lend(self)
        if loan is None:
            self._cond.wait(timeout)
            return
        self._wakers.append(waker)  # any other news wakes it
        self._cond.release()
        ready: list[int] = []
        try:
            ready = loan.wait(waker.fd, timeout)
        finally:
            try:
                self._pool.give_back(loan, ready)
            finally:
                self._cond.acquire()
                self._wakers.remove(waker)
                if waker.fd in ready:
                    waker.clear()


class _Waker:
    """A pipe that wakes a thread waiting in `poll`, which a condition variable cannot; one per
    thread, made when it first waits so, closed when the thread ends."""

    _local = threading.local()

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self.fd, self._write = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write, False)

    @classmethod
    def of_this_thread(cls) -> _Waker:
        waker: _Waker | None = getattr(cls._local, "waker", None)
        if waker is None:
            waker = cls._local.waker = cls()
        return waker

    def set(self) -> None:
        if threading.get_ident() == self._thread:
            return  # its own thread is not waiting: it is the one telling the news
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # full: it is set anyway

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def __del__(self) -> None:
        os.close(self.fd)
        os.close(self._write)
