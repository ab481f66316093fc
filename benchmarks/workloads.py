"""Targets for the benchmarks; workers import this module by reference, so it stays light
(numpy is imported only by the targets that need it)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def noop(x: Any) -> Any:
    return x


def sleep_50ms(_: Any) -> None:
    time.sleep(0.05)


def sleep_pid(seconds: float) -> tuple[int, float]:
    """Sleep, and say which worker ran it and when it started (epoch seconds)."""
    started = time.time()
    time.sleep(seconds)
    return os.getpid(), started


def import_numpy(seconds: float) -> tuple[int, float]:
    """`sleep_pid`, once numpy is imported: warms a worker up for the numpy payload."""
    import numpy  # noqa: F401

    return sleep_pid(seconds)


def crash(path: str) -> None:
    """Append the moment of death to `path`, then SIGKILL our own worker (as the OOM killer
    would). A pool that retries the target appends one line per attempt."""
    with open(path, "a") as f:
        f.write(f"{time.time()!r}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def hang(request: tuple[float, str]) -> None:
    """Write our pid and start time to `path`, then sleep `seconds` (past any sensible limit)."""
    seconds, path = request
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {time.time()!r}\n")
    time.sleep(seconds)


def burn(n: int) -> int:
    return sum(i * i for i in range(n))


def payload(request: tuple[str, int]) -> Any:
    """`size` bytes to send back: ``bytes`` or a numpy float64 array, every page written."""
    kind, size = request
    if kind == "numpy":
        import numpy

        return numpy.full(size // 8, 1.0)
    return b"x" * size
