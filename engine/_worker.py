"""The loop of a worker process: receive batches of targets, run them in order, report each.

Every worker process starts in `main` (see `engine._process`), so this module imports little:
cloudpickle and tblib only once needed. It owns two pipes and a journal, created by the pool:

    pool -> worker   b""                                      stop
                     pickle(Batch message, see `run_batch`)   run these, in order
    worker -> pool   CONTROL + pickle((READY, pid))           once, when ready to serve
                     CONTROL + pickle((START_FAILED, tb))     instead, then it exits
                     journal entries (`engine._journal`)      outcomes, in the order they ran
                     FOLLOW + pickle((offset, size))          a large part, being written
                     LARGE + pickle((task id, status, started, finished, raw, places))
                                                              a large response, in the spill
    pool -> acks     one byte                                  it was read: write the next
    worker -> nudge  one byte                                  what it sent is unread: look

Each outcome is committed to the journal as soon as it exists; the journal is sent when the batch
is done, when it is full, when the targets have a time limit (the pool then knows when the next
one started) and at least every `FLUSH_INTERVAL`. A worker that dies mid-batch therefore loses no
finished outcome: the pool reads its journal. A response of a builtin scalar type is an entry's
value itself; any other response and each exception is pickled on its own, into bytes that are
the entry's value, so one that fails to (un)pickle fails only its own target.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import sys
import threading
import time

from ._journal import Journal
from ._pipe import Pipe
from ._running import BatchCursor, current

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from ._exceptions import SerializationError

CONTROL = b"C"  #: the first byte of a READY or START_FAILED message
LARGE = b"L"  #: the first byte of the header of a response written to the spill file
LARGE_BYTES = 256 << 10  #: a response this big goes through the spill file, not the journal
FOLLOW = b"F"  #: the first byte of a message: the copied part of a large response is being written
FOLLOW_BYTES = 4 << 20  #: a copied part this large is announced before it is written
READY = -1
START_FAILED = -2
#: Entry statuses. OK: the value is the response; PICKLED: the value is its pickle; FAILED: the
#: value is the pickled failure; UNLOADED: its batch did not unpickle, it did not run.
FAILED, OK, UNLOADED, PICKLED = 0, 1, 2, 3
FLUSH_INTERVAL = 0.001  #: seconds a finished outcome may wait for the rest of its batch
#: Seconds an idle worker watches for its next batch before it sleeps, if the last one came as
#: soon: a sequence of quick invocations (or the next target of a slow one) then starts with no
#: wake-up, and the pool's write to it is quicker. A worker idle longer costs no CPU.
SPIN_SECONDS = 0.0002
#: Seconds a worker's outcomes may wait unread for the caller that sent its batch (the pool's
#: manager does not watch them meanwhile) before the worker wakes the manager to read them.
KEEP_SECONDS = 0.001
_FUNCTION_CACHE_SIZE = 256
_PARENT_CHECK_INTERVAL = 0.5
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def main(argv: list[str]) -> None:
    """The worker process: its pipes, files and caller are given as numbers in `argv`."""
    tasks_fd, outcomes_fd, journal_fd, journal_size, spill_fd, acks_fd, parent_pid, nudge = \
        map(int, argv)
    tasks, outcomes = Pipe(tasks_fd), Pipe(outcomes_fd)
    try:
        sys.path[:], initializer = pickle.loads(tasks.recv_bytes())
    except (EOFError, OSError):
        return  # the pool went away before we started
    reporter = _Reporter(outcomes, Journal(journal_fd, journal_size), spill_fd, acks_fd)
    serve(tasks, outcomes, reporter, parent_pid, initializer, nudge)


def serve(tasks: Pipe, outcomes: Pipe, reporter: _Reporter, parent_pid: int,
          initializer: bytes | None, nudge: int) -> None:
    """Run task batches from `tasks` until told to stop or the pool goes away.

    Idle, a worker watches for its next batch without sleeping for `SPIN_SECONDS` if the last
    one came as soon. If what it sent is still unread after `KEEP_SECONDS`, it writes to
    `nudge`, which wakes the pool's manager: the caller it was kept for did not come to wait
    for it (see `engine._pool.TargetPool._dispatch_here`)."""
    # Ctrl-C in a terminal reaches the whole process group; the caller decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="engine-orphan-watch").start()
    if initializer is not None:
        try:
            fn, args = pickle.loads(initializer)
            fn(*args)
        except BaseException as exc:
            import traceback

            text = "".join(traceback.format_exception(exc))
            outcomes.send_bytes(CONTROL + pickle.dumps((START_FAILED, text)))
            os._exit(3)
    outcomes.send_bytes(CONTROL + pickle.dumps((READY, os.getpid())))
    functions: dict[bytes, Callable[[Any], Any] | SerializationError] = {}
    idle_since, gap = time.monotonic(), 0.0  # when the last batch ended; how soon the next came
    while True:
        spin = SPIN_SECONDS if gap < SPIN_SECONDS else 0.0  # quick succession: likely again
        if not tasks.wait(KEEP_SECONDS, spin) and outcomes.unread():
            try:
                os.write(nudge, b"\0")
            except OSError:
                pass  # the manager is gone, or has a wake-up pending (the pipe is full)
        try:
            message = tasks.recv_bytes()
        except (EOFError, OSError):
            return  # the pool closed our pipe or died
        gap = time.monotonic() - idle_since
        if not message:
            return
        run_batch(pickle.loads(message), functions, reporter)
        idle_since = time.monotonic()


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit soon after the caller dies, even while a target is still running."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_INTERVAL)
    os._exit(1)


class _Reporter:
    """Commits outcomes to the journal and decides when to send them.

    A large response skips the journal: its pickle and out-of-band buffers (or a `bytes`
    response itself) are written to the spill file, a file in memory the pool shares, each part
    at a page boundary past the last response's, never over one. The pool copies the pickle out
    and maps the buffers (a numpy array is then made on the pages written here, with no copy),
    and acknowledges before the next response may be written. A large part to copy is announced
    before it is written, so the pool reads it as it lands; the response is announced once
    whole, so a worker that dies while writing it fails its target rather than deliver half.
    """

    def __init__(self, outcomes: Pipe, journal: Journal, spill: int, acks: int) -> None:
        self._outcomes, self.journal = outcomes, journal
        self._spill, self._acks, self._spilled = spill, acks, False
        self._spill_end = 0  #: where the last part written to the spill file ends

    def report(self, task_id: int, status: int, started: float, finished: float,
               value: Any) -> None:
        if self.journal.append(task_id, status, started, finished, value):
            return
        self.flush()
        if not self.journal.append(task_id, status, started, finished, value):
            if status == OK:  # a huge str: its pickle, read as any spilled response
                value = pickle.dumps(value, _PROTOCOL)
            self.spill(task_id, started, finished, False, [value], status)

    def spill(self, task_id: int, started: float, finished: float, raw: bool,
              parts: list[Any], status: int = OK) -> None:
        """Write a response's `parts` (bytes or buffers) to the spill file and announce their
        places, (offset, size) each."""
        self.flush()
        if self._spilled and not os.read(self._acks, 1):
            raise EOFError("the pool went away")
        places = []
        for part in parts:
            view = memoryview(part).cast("B")
            offset = -(-self._spill_end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
            places.append((offset, len(view)))
            self._spill_end = offset + len(view)
            if len(places) == 1 and len(view) >= FOLLOW_BYTES:  # read while it is written
                self._outcomes.send_bytes(FOLLOW + pickle.dumps((offset, len(view))))
            while view:
                written = os.pwrite(self._spill, view, offset)
                view, offset = view[written:], offset + written
        self._outcomes.send_bytes(LARGE + pickle.dumps((task_id, status, started, finished,
                                                        raw, places)))
        self._spilled = True

    def flush(self) -> None:
        pending = self.journal.pending()
        if pending is not None:
            self._outcomes.send_bytes(pending)
            self.journal.clear()


def run_batch(batch: tuple[Any, ...], functions: dict[bytes, Any], reporter: _Reporter) -> None:
    """Run one batch: ``(prefix, flush_each, fn_blobs, first_id, positions, names, indices,
    requests)``, columns of its tasks (see `engine._pool.Batch`).

    `prefix` is (channel, cid, source) of the invocation; task `k` is reported as
    ``first_id + k``; `requests` is one pickle of all the requests.
    """
    prefix, flush_each, fn_blobs, first_id, positions, names, indices, requests_blob = batch
    task_ids = range(first_id, first_id + len(names))
    try:
        requests = pickle.loads(requests_blob)
    except BaseException as exc:
        if len(names) > 1:  # the pool sends them again one by one, to find the culprit
            for task_id in task_ids:
                moment = time.time()
                reporter.report(task_id, UNLOADED, moment, moment, b"")
            reporter.flush()
            return
        error = _serialization_error(names[0], "request", f"unpickling in the worker failed: "
                                                          f"{type(exc).__name__}: {exc}")
        moment = time.time()
        reporter.report(first_id, FAILED, moment, moment, _failure(error))
        reporter.flush()
        return
    fns: list[Any] = [None] * len(fn_blobs)
    for position in set(positions):  # a part of a batch may not use all of its functions
        fns[position] = _function(fn_blobs[position], names[positions.index(position)], functions)
    cursor = BatchCursor(prefix, names, indices, first_id)
    token = current.set(cursor)
    try:
        _run_tasks(cursor, zip(task_ids, positions, requests, strict=True), fns, flush_each,
                   reporter)
    finally:
        current.reset(token)
    reporter.flush()


def _run_tasks(cursor: BatchCursor, tasks: Iterator[tuple[int, int, Any]], fns: list[Any],
               flush_each: bool, reporter: _Reporter) -> None:
    """Run (task id, function position, request) triples in order, and report each outcome."""
    now = time.time
    journal_append, last_flush = reporter.journal.append, now()
    for task_id, position, request in tasks:
        cursor.task_id = task_id
        started = now()
        try:
            response = fns[position](request)
        except BaseException as exc:
            finished = now()
            reporter.report(task_id, FAILED, started, finished, _failure(_own(exc)))
        else:
            finished = now()
            if type(response) in _PLAIN:
                if not journal_append(task_id, OK, started, finished, response):
                    reporter.report(task_id, OK, started, finished, response)
            else:
                try:
                    body = _dumps(response)
                except BaseException as exc:
                    error = _serialization_error(cursor.target, "response",
                                                 f"{type(exc).__name__}: {exc}")
                    reporter.report(task_id, FAILED, started, finished, _failure(error))
                else:
                    if isinstance(body, bytes):
                        reporter.report(task_id, PICKLED, started, finished, body)
                    else:
                        reporter.spill(task_id, started, finished, type(response) is bytes, body)
        if flush_each or finished - last_flush >= FLUSH_INTERVAL:
            reporter.flush()
            last_flush = finished


def _function(blob: bytes, name: str, functions: dict[bytes, Any]) -> Callable[[Any], Any]:
    """The unpickled function (cached), or one that raises why it would not unpickle."""
    fn = functions.get(blob)
    if fn is None:
        if len(functions) >= _FUNCTION_CACHE_SIZE:
            functions.clear()
        try:
            fn = pickle.loads(blob)
        except BaseException as exc:
            why = f"unpickling in the worker failed: {type(exc).__name__}: {exc}"
            fn = _raiser(_serialization_error(name, "function", why))
        functions[blob] = fn
    return fn


def _serialization_error(target: str, what: str, why: str) -> SerializationError:
    from ._exceptions import SerializationError  # when needed: a worker starts faster without

    return SerializationError(target, what, why)


def _raiser(error: BaseException) -> Callable[[Any], Any]:
    def fail(_: Any) -> Any:
        raise error

    return fail


def _dumps(value: Any) -> bytes | list[Any]:
    """The pickled response; for a large one, the parts to spill: the `bytes` response itself,
    or its pickle followed by its large buffers (protocol 5: numpy arrays, bytearrays).

    Plain pickle when it can (fast); cloudpickle for what only it can (lambdas, __main__).
    """
    if type(value) is bytes and len(value) >= LARGE_BYTES:
        return [value]
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < LARGE_BYTES:
            return True  # small: in the pickle
        buffers.append(buffer)
        return False

    try:
        body = pickle.dumps(value, _PROTOCOL, buffer_callback=out_of_band)
    except Exception:
        import cloudpickle

        buffers.clear()
        body = cloudpickle.dumps(value, protocol=_PROTOCOL, buffer_callback=out_of_band)
    return [body, *buffers] if buffers or len(body) >= LARGE_BYTES else body


#: Responses that are entries' values as they are: builtin scalars, which unpickle anywhere.
_PLAIN = {type(None), bool, int, float, complex, str}


def _own(exc: BaseException) -> BaseException:
    """Drop this module's frame, so the traceback starts in the target's own code."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is _run_tasks.__code__ and tb.tb_next is not None:
        exc.__traceback__ = tb.tb_next
    return exc


def _failure(exc: BaseException) -> bytes:
    """(exception blob, traceback text): the exception with its traceback and chain (tblib),
    or its facts as text if it won't travel."""
    import traceback

    import cloudpickle
    from tblib import pickling_support

    from ._exceptions import RemoteError

    text = "".join(traceback.format_exception(exc))
    try:
        pickling_support.install(exc)
        blob: bytes = cloudpickle.dumps(exc, protocol=_PROTOCOL)
        pickle.loads(blob)  # custom __init__ signatures fail only here; find out now
    except BaseException:
        fallback = RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", _str(exc), text)
        blob = pickle.dumps(fallback, protocol=_PROTOCOL)
    return pickle.dumps((blob, text), protocol=_PROTOCOL)


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<str() of the {type(exc).__name__} failed>"
