"""``python -m engine``: a demonstration on the default local pool.

CPU-heavy targets run in parallel worker processes; an on-target callback reports each one as it
lands; a target that segfaults, one that raises and one that runs past its time limit fail alone;
an on-final callback sums everything up once all targets are done.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import threading
import time
from typing import Any

from engine import Engine, current_context

_print_lock = threading.Lock()


def count_primes(bounds: tuple[int, int]) -> int:
    """Primes in [low, high), by trial division: pure Python, all CPU."""
    low, high = bounds
    return sum(1 for n in range(max(low, 2), high)
               if all(n % d for d in range(2, int(n ** 0.5) + 1)))


def segfault(_: Any) -> None:
    ctypes.string_at(0)  # a real invalid memory read: the worker dies with SIGSEGV


def reject(request: Any) -> None:
    raise ValueError(f"cannot handle {request!r}")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def report(payload: dict[str, Any]) -> None:
    context = current_context()
    outcome = f"{payload['response']} primes" if payload["ok"] else \
        payload["exception"].strip().splitlines()[-1]
    with _print_lock:
        print(f"  [{context.channel if context else '?'}] #{payload['index']:<2} "
              f"{payload['target']:<18} {'ok  ' if payload['ok'] else 'FAIL'} {outcome}")


def summarize(payload: dict[str, Any]) -> None:
    data = payload["data"]
    good = [p for p in data if p["ok"]]
    with _print_lock:
        print(f"  [{current_context().channel}] {len(data)} targets: {len(good)} ok, "  # type: ignore[union-attr]
              f"{len(data) - len(good)} failed; {sum(p['response'] for p in good)} primes "
              f"in all; callbacks {payload['on_target']} and {payload['on_final']}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="worker processes (CPUs)")
    parser.add_argument("--chunks", type=int, default=8, help="CPU-heavy targets to run")
    parser.add_argument("--size", type=int, default=100_000, help="numbers per chunk")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="  log: %(message)s")

    workers = args.workers or len(os.sched_getaffinity(0))
    with Engine(workers=workers) as eng:
        eng.register("primes.count", count_primes)
        work: list[tuple[Any, Any]] = [("primes.count", (i * args.size, (i + 1) * args.size))
                                       for i in range(args.chunks)]
        work += [(segfault, None), (reject, "bad record"), (sleep, 60)]
        print(f"engine demo: {len(work)} targets on {workers} worker processes, each reported "
              f"as it lands")
        cid = eng.fanout(work, on_target=[report], on_final=[summarize], source="demo",
                         timeout=5)
        results = eng.wait(cid)

    assert isinstance(results, list)
    cpu = [r for r in results[:args.chunks] if r.ok]
    busy = sum(r.duration or 0.0 for r in cpu)
    span = max(r.resp_ts for r in cpu) - min(r.started or r.resp_ts for r in cpu)
    crash = results[args.chunks]
    print(f"\n{len(results)} results for cid {cid}:")
    for result in results:
        text = f"{result.response} primes" if result.ok else type(result.exception).__name__
        print(f"  #{result.index:<2} {result.target:<18} pid {result.pid}  "
              f"{result.duration or 0.0:6.2f} s  {text}")
    print(f"\nThe segfault killed worker {crash.pid} and failed only its own target; the worker "
          f"was replaced.\nThe CPU-heavy targets did {busy:.2f} s of work in {span:.2f} s: "
          f"{busy / span:.2f} workers busy at once.")


if __name__ == "__main__":
    main()
