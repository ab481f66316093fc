"""Where the CPU goes while 20,000 no-op targets run, by role: the caller's thread, the other
threads of the caller's process (the pool's), and the worker processes.

    python benchmarks/cpu_split.py [--rounds 15] [--dispatch 20000]

Such a run is bound by the caller's process, whose threads take turns on the GIL: its wall time
follows their CPU together. The engine's `invoke` + `wait` and `Engine.map` are set against
the peers' `map(chunksize=100)`, each pool started once and warm, the rounds alternating;
medians. Linux only (a worker's CPU is read from ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402  (importable by the workers, by reference)
from contenders import BY_KEY, Contender, EngineContender  # noqa: E402

ROLES = ("wall", "caller's thread", "other threads", "workers")


def cpu_seconds(pid: int) -> float:
    """CPU seconds that another process, `pid`, has spent (all its threads). Exact only while
    it sleeps: a running thread's figure is brought up to date at the scheduler's next tick."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                total += int(f.read().split()[0])
    return total / 1e9


def measured(map_: Callable[..., Iterable[Any]], chunksize: int, count: int,
             workers: list[int]) -> tuple[float, ...]:
    """(wall, caller's thread, other threads, workers), in milliseconds, of `count` no-ops
    mapped with `map_`, their results iterated."""
    gc.collect()
    before = (time.thread_time(), time.process_time(), sum(map(cpu_seconds, workers)))
    start = time.perf_counter()
    if sum(1 for _ in map_(workloads.noop, range(count), chunksize)) != count:
        raise RuntimeError("results are missing")
    wall = (time.perf_counter() - start) * 1e3
    mine = time.thread_time(), time.process_time()
    time.sleep(0.01)  # every worker asleep again: its figure is up to date
    after = (*mine, sum(map(cpu_seconds, workers)))
    thread, process, pool = ((a - b) * 1e3 for a, b in zip(after, before, strict=True))
    return wall, thread, process - thread, pool


@contextlib.contextmanager
def warm(cls: type[Contender]) -> Iterator[tuple[Contender, list[int]]]:
    """A started contender and the processes it started (its workers)."""
    before = {child.pid for child in psutil.Process().children()}
    with cls(2) as contender:
        contender.warm()
        yield contender, [c.pid for c in psutil.Process().children() if c.pid not in before]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dispatch", type=int, default=20_000)
    args = parser.parse_args()
    n = args.dispatch
    ways: dict[str, tuple[type[Contender], str, int]] = {
        "engine, invoke + wait": (EngineContender, "wait_map", 0),
        "engine.map": (EngineContender, "map", 0),
        **{f"{BY_KEY[key].label}.map(chunksize=100)": (BY_KEY[key], "map", 100)
           for key in ("PPE", "loky") if BY_KEY[key].available()},
    }
    figures: dict[str, list[tuple[float, ...]]] = {way: [] for way in ways}
    with contextlib.ExitStack() as stack:
        pools = {cls: stack.enter_context(warm(cls)) for cls, _, _ in ways.values()}
        for _ in range(args.rounds):
            for way, (cls, call, chunksize) in ways.items():
                contender, workers = pools[cls]
                figures[way].append(measured(getattr(contender, call), chunksize, n, workers))
    print(f"{n:,} no-op targets, 2 workers, medians of {args.rounds} rounds (ms)")
    print(f"{'':40}" + "".join(f"{role:>17}" for role in (*ROLES, "all CPU")))
    for way, rows in figures.items():
        medians = [statistics.median(row[k] for row in rows) for k in range(len(ROLES))]
        total = statistics.median(sum(row[1:]) for row in rows)
        print(f"{way:40}" + "".join(f"{value:17.1f}" for value in (*medians, total)))


if __name__ == "__main__":
    main()
