"""The loop of a worker process: receive targets, run them one at a time, send each outcome back.

Every spawned worker imports this module, so it imports little. It owns two pipes, both created
by the target pool: it reads task batches from one and writes one message per outcome to the
other. Messages are plain pickles of tuples; the function, request and response inside them are
separate cloudpickle blobs, so that one that fails to (un)pickle fails only its own target.

    pool -> worker   b""                                         stop
                     pickle([(task_id, fn_blob, req_blob, ctx)])  run these, in order
    worker -> pool   pickle((READY, pid))                         once, when ready to serve
                     pickle((START_FAILED, traceback))            instead, then it exits
                     pickle((task_id, ok, body_blob, tb, started, finished))   per target
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from tblib import pickling_support

from ._context import CallContext, Channel, _current
from ._exceptions import RemoteError, SerializationError

READY = -1  #: the task id of the worker's first message, which carries its pid
START_FAILED = -2  #: the task id of its first message if its initializer raised
_FUNCTION_CACHE_SIZE = 256
_PARENT_CHECK_INTERVAL = 0.5


def serve(tasks: Connection, outcomes: Connection, parent_pid: int,
          initializer: bytes | None = None) -> None:
    """Run task batches from `tasks` until told to stop or the pool goes away."""
    # Ctrl-C in a terminal reaches the whole process group; the caller decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True,
                     name="engine-orphan-watch").start()
    functions: dict[bytes, Callable[[Any], Any]] = {}
    if initializer is not None:
        try:
            fn, args = pickle.loads(initializer)
            fn(*args)
        except BaseException as exc:
            outcomes.send_bytes(pickle.dumps((START_FAILED, "".join(
                traceback.format_exception(exc)))))
            os._exit(3)
    outcomes.send_bytes(pickle.dumps((READY, os.getpid())))
    while True:
        try:
            message = tasks.recv_bytes()
        except (EOFError, OSError):
            return  # the pool closed our pipe or died
        if not message:
            return
        for task_id, fn_blob, req_blob, ctx in pickle.loads(message):
            outcomes.send_bytes(_run(task_id, fn_blob, req_blob, ctx, functions))


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit soon after the caller dies, even while a target is still running."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_CHECK_INTERVAL)
    os._exit(1)


def _run(task_id: int, fn_blob: bytes, req_blob: bytes, ctx: tuple[Any, ...],
         functions: dict[bytes, Callable[[Any], Any]]) -> bytes:
    context = CallContext(Channel(ctx[0]), *ctx[1:])
    target = context.target or "?"
    started = time.time()
    try:
        fn = functions.get(fn_blob)
        if fn is None:
            if len(functions) >= _FUNCTION_CACHE_SIZE:
                functions.clear()
            fn = functions[fn_blob] = _load(fn_blob, target, "function")
        request = _load(req_blob, target, "request")
        token = _current.set(context)
        try:
            response = fn(request)
        finally:
            _current.reset(token)
    except BaseException as exc:
        return _failure(task_id, _without_own_frame(exc), started)
    finished = time.time()
    try:
        body = cloudpickle.dumps(response, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        error = SerializationError(target, "response", f"{type(exc).__name__}: {exc}")
        return _failure(task_id, error, started)
    return pickle.dumps((task_id, True, body, None, started, finished),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _load(blob: bytes, target: str, what: str) -> Any:
    try:
        return pickle.loads(blob)
    except BaseException as exc:
        raise SerializationError(target, what, f"unpickling in the worker failed: "
                                               f"{type(exc).__name__}: {exc}") from None


def _without_own_frame(exc: BaseException) -> BaseException:
    """Drop this module's frame, so the traceback starts in the target's own code."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is _run.__code__ and tb.tb_next is not None:
        exc.__traceback__ = tb.tb_next
    return exc


def _failure(task_id: int, exc: BaseException, started: float) -> bytes:
    text = "".join(traceback.format_exception(exc))
    body = _dump_exception(exc, text)
    return pickle.dumps((task_id, False, body, text, started, time.time()),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _dump_exception(exc: BaseException, text: str) -> bytes:
    """The exception with its traceback and chain (tblib); its facts as text if it won't travel."""
    try:
        pickling_support.install(exc)
        blob: bytes = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # custom __init__ signatures fail only here; find out now
        return blob
    except BaseException:
        fallback = RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}", _str(exc), text)
        return pickle.dumps(fallback, protocol=pickle.HIGHEST_PROTOCOL)


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<str() of the {type(exc).__name__} failed>"
