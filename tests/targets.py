"""Targets and callbacks for the tests. Workers import this module, so it imports little."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from engine import current_context


def echo(request: Any) -> Any:
    return request


def double(x: int) -> int:
    return x * 2


def getpid(_: Any = None) -> int:
    return os.getpid()


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def interval(seconds: float) -> tuple[float, float]:
    """When the target ran, by the worker's clock."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def fail(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    os._exit(code)


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)


def segfault(_: Any = None) -> None:
    ctypes.string_at(0)  # a real invalid read: the kernel sends SIGSEGV


def context(_: Any = None) -> Any:
    return current_context()


def unpicklable_response(_: Any = None) -> Any:
    return threading.Lock()


class HoldsLockError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(message: str) -> None:
    raise HoldsLockError(message)


class CustomInitError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def raise_custom(_: Any = None) -> None:
    raise CustomInitError(7, "custom")


def raise_chained(_: Any = None) -> None:
    try:
        raise KeyError("inner")
    except KeyError as exc:
        error = RuntimeError("outer")
        error.add_note("a note")
        raise error from exc


def raise_base(kind: str) -> None:
    raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]


def spawn_grandchild(pid_file: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(60)


def outcome(kind: str) -> str:
    """One of the outcomes the property tests mix: return, raise, exit, kill, hang."""
    if kind == "raise":
        raise ValueError(kind)
    if kind == "exit":
        os._exit(5)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(60)
    return kind


def crash_once(marker: str) -> str:
    """Kill its worker the first time (leaving `marker` behind), then succeed."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return "second time lucky"


def hold_memory(megabytes: int) -> int:
    """Allocate and keep `megabytes` for the worker's lifetime, then return its pid."""
    _held.append(bytearray(megabytes * 1_000_000))
    return os.getpid()


def grow_memory(megabytes: int) -> None:
    """Grow by `megabytes` every 50 ms, for ever."""
    while True:
        _held.append(bytearray(megabytes * 1_000_000))
        time.sleep(0.05)


_held: list[bytearray] = []


def raise_group(_: Any = None) -> None:
    raise ExceptionGroup("several", [ValueError("one"), KeyError("two")])


def read_setting(name: str) -> str | None:
    return os.environ.get(name)


def length(data: bytes) -> int:
    return len(data)


SHARED_LOCK = threading.Lock()  # held by a caller's thread in a test


def take_shared_lock(_: Any = None) -> bool:
    """A forked copy of a caller whose thread held the lock would find it held for ever."""
    acquired = SHARED_LOCK.acquire(timeout=2)
    if acquired:
        SHARED_LOCK.release()
    return acquired


def log_run(job: tuple[Any, ...]) -> int:
    """Append `index` and the worker's pid to the file at `path` (one line a run), then crash
    the worker or hang if this index is `special`: `how` is "exit", "kill" or "hang". More
    items are ballast."""
    path, index, special, how = job[:4]
    with open(path, "a") as log:
        log.write(f"{index} {os.getpid()}\n")
    if index == special:
        if how == "exit":
            os._exit(7)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    return index


def _refuse_to_load(message: str) -> None:
    raise ValueError(message)


class LoadsNowhere:
    """Pickles fine, but fails to unpickle: in a worker, that fails its target."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _refuse_to_load, ("this request cannot be unpickled",)


def large(kind_and_size: tuple[str, int]) -> Any:
    """A large response: "bytes", "bytearray", "nested" (a dict of bytes) or "str"."""
    kind, size = kind_and_size
    data = bytes(range(256)) * (size // 256)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "nested":
        return {"parts": [data[: size // 2], data[size // 2:]], "size": size}
    if kind == "str":  # a builtin scalar: a journal entry's value itself, when it fits there
        return data.decode("latin-1")
    if kind == "numpy":  # out-of-band buffers (pickle protocol 5)
        import numpy

        return {"array": numpy.arange(size // 8, dtype=numpy.float64).reshape(2, -1),
                "small": numpy.ones(3)}
    return data


def filled(value_and_size: tuple[float, int]) -> Any:
    """A numpy array of `size` bytes, every item `value`."""
    import numpy

    value, size = value_and_size
    return numpy.full(size // 8, value)


def outcome_with_ballast(job: tuple[str, bytes]) -> str:
    """`outcome`, with a request made bigger by ballast that it ignores."""
    return outcome(job[0])


class Box:
    """A response that can be referenced weakly: whether anything still holds it shows."""

    def __init__(self, value: Any) -> None:
        self.value = value


def box(value: Any) -> Box:
    return Box(value)


class Touchy:
    """A callable target whose `==` raises: the engine must not need to compare targets."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("do not compare me")

    __hash__ = object.__hash__

    def __call__(self, request: int) -> int:
        return self.factor * request
