"""Side-by-side figures for the engine and its peers, as ratios measured in one process run.

    python benchmarks/bench.py [--repeat 3] [--json out.json]

Each figure is the median of `--repeat` runs. Peers that are not installed are skipped
(``pip install ".[bench]"`` installs pebble, mpire and dask distributed; only the standard
library and loky are compared here so far). Benchmarks are not tests: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import loky
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402  (importable by the workers, by reference)

from engine import Engine  # noqa: E402

WORKERS = 2


def median_of(repeat: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeat))


def dispatch_engine(n: int, callbacks: bool) -> Callable[[], float]:
    def measure() -> float:
        with Engine(workers=WORKERS) as eng:
            eng.wait(eng.invoke([(workloads.noop, 0)] * WORKERS), timeout=60)
            noop_callbacks = [workloads.noop] if callbacks else None
            start = time.perf_counter()
            eng.wait(eng.invoke([(workloads.noop, i) for i in range(n)], callbacks=noop_callbacks))
            return n / (time.perf_counter() - start)
    return measure


def dispatch_executor(make: Callable[[], concurrent.futures.Executor], n: int,
                      chunksize: int | None) -> Callable[[], float]:
    def measure() -> float:
        with make() as executor:
            list(executor.map(workloads.noop, range(WORKERS)))  # workers are up
            start = time.perf_counter()
            if chunksize is None:
                futures = [executor.submit(workloads.noop, i) for i in range(n)]
                for future in futures:
                    future.result()
            else:
                list(executor.map(workloads.noop, range(n), chunksize=chunksize))
            return n / (time.perf_counter() - start)
    return measure


def dispatch_mp_pool(n: int, chunksize: int | None) -> Callable[[], float]:
    def measure() -> float:
        with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
            pool.map(workloads.noop, range(WORKERS))
            start = time.perf_counter()
            if chunksize is None:
                for result in [pool.apply_async(workloads.noop, (i,)) for i in range(n)]:
                    result.get()
            else:
                pool.map(workloads.noop, range(n), chunksize=chunksize)
            return n / (time.perf_counter() - start)
    return measure


def round_trip_engine(n: int) -> Callable[[], float]:
    def measure() -> float:
        with Engine(workers=WORKERS) as eng:
            eng.wait(eng.invoke([(workloads.noop, 0)] * WORKERS), timeout=60)
            start = time.perf_counter()
            for i in range(n):
                eng.wait(eng.invoke([(workloads.noop, i)]))
            return (time.perf_counter() - start) / n * 1e6
    return measure


def round_trip_executor(make: Callable[[], concurrent.futures.Executor],
                        n: int) -> Callable[[], float]:
    def measure() -> float:
        with make() as executor:
            list(executor.map(workloads.noop, range(WORKERS)))
            start = time.perf_counter()
            for i in range(n):
                executor.submit(workloads.noop, i).result()
            return (time.perf_counter() - start) / n * 1e6
    return measure


def slow_callbacks_engine() -> Callable[[], float]:
    """Seconds until the 40th result is recorded, each target having a 50 ms callback."""
    def measure() -> float:
        with Engine(workers=WORKERS) as eng:
            eng.wait(eng.invoke([(workloads.noop, 0)] * WORKERS), timeout=60)
            start = time.perf_counter()
            cid = eng.invoke([(workloads.noop, i) for i in range(40)],
                             callbacks=[workloads.sleep_50ms])
            for _ in eng.as_completed(cid):
                pass
            return time.perf_counter() - start
    return measure


def slow_callbacks_executor(make: Callable[[], concurrent.futures.Executor]) -> Callable[[], float]:
    """The same with done-callbacks, which run on the executor's own result-handling thread."""
    def measure() -> float:
        with make() as executor:
            list(executor.map(workloads.noop, range(WORKERS)))
            recorded = threading.Semaphore(0)
            start = time.perf_counter()
            for i in range(40):
                future = executor.submit(workloads.noop, i)
                future.add_done_callback(lambda f: (workloads.sleep_50ms(f), recorded.release()))
            for _ in range(40):
                recorded.acquire()
            return time.perf_counter() - start
    return measure


class PeakMemory:
    """The caller's resident memory growth, sampled every 10 ms while the block runs."""

    def __enter__(self) -> PeakMemory:
        self._process = psutil.Process()
        self._base = self._process.memory_info().rss
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_engine(n: int, keep_results: bool) -> Callable[[], float]:
    """MB the caller grows by while `n` lazily produced 1 kB targets run, one callback each."""
    def measure() -> float:
        with Engine(workers=WORKERS) as eng:
            eng.wait(eng.invoke([(workloads.noop, 0)] * WORKERS), timeout=60)
            with PeakMemory() as memory:
                cid = eng.invoke(((workloads.noop, b"x" * 1000) for _ in range(n)),
                                 callbacks=[workloads.noop], keep_results=keep_results)
                eng.wait(cid)
            return memory.peak / 1e6
    return measure


def memory_executor(make: Callable[[], concurrent.futures.Executor],
                    n: int) -> Callable[[], float]:
    def measure() -> float:
        with make() as executor:
            list(executor.map(workloads.noop, range(WORKERS)))
            with PeakMemory() as memory:
                for _ in executor.map(workloads.noop, (b"x" * 1000 for _ in range(n))):
                    pass
            return memory.peak / 1e6
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dispatch", type=int, default=5000, help="targets in the dispatch runs")
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--memory", type=int, default=100_000,
                        help="targets in the memory runs (pulled lazily from a generator)")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()

    ppe = lambda: concurrent.futures.ProcessPoolExecutor(  # noqa: E731
        WORKERS, mp_context=multiprocessing.get_context("spawn"))
    lky = lambda: loky.ProcessPoolExecutor(WORKERS)  # noqa: E731
    n, rt = args.dispatch, args.round_trips
    figures: dict[str, dict[str, Callable[[], float]]] = {
        "dispatch, targets/s (higher is better)": {
            "engine": dispatch_engine(n, callbacks=False),
            "engine, 1 callback each": dispatch_engine(n, callbacks=True),
            "ProcessPoolExecutor.submit": dispatch_executor(ppe, n, None),
            "ProcessPoolExecutor.map(chunksize=100)": dispatch_executor(ppe, n, 100),
            "loky.submit": dispatch_executor(lky, n, None),
            "multiprocessing.Pool.apply_async": dispatch_mp_pool(n, None),
            "multiprocessing.Pool.map(chunksize=100)": dispatch_mp_pool(n, 100),
        },
        "round trip, µs (lower is better)": {
            "engine": round_trip_engine(rt),
            "ProcessPoolExecutor": round_trip_executor(ppe, rt),
            "loky": round_trip_executor(lky, rt),
        },
        "40 results with 50 ms callbacks, s (lower is better)": {
            "engine": slow_callbacks_engine(),
            "ProcessPoolExecutor": slow_callbacks_executor(ppe),
            "loky": slow_callbacks_executor(lky),
        },
        f"caller memory growth, {args.memory:,} lazily produced 1 kB targets, MB "
        "(lower is better)": {
            "engine": memory_engine(args.memory, keep_results=True),
            "engine, keep_results=False": memory_engine(args.memory, keep_results=False),
            "ProcessPoolExecutor.map": memory_executor(ppe, args.memory),
            "loky.map": memory_executor(lky, args.memory),
        },
    }
    raw: dict[str, dict[str, float]] = {}
    for title, contenders in figures.items():
        higher_is_better = "higher" in title
        results = {name: median_of(args.repeat, measure) for name, measure in contenders.items()}
        raw[title] = results
        peers = {k: v for k, v in results.items() if not k.startswith("engine")}
        best = max(peers.values()) if higher_is_better else min(peers.values())
        print(f"\n{title}")
        for name, value in results.items():
            ratio = f"{value / best:6.2f}" if best else "   n/a"
            print(f"  {name:<42} {value:>12,.3f}   {ratio} x best peer")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                       "python": sys.version.split()[0], "figures": raw}, f, indent=2)


if __name__ == "__main__":
    main()
