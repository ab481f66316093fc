"""Start-up of one contender in a fresh interpreter: ``python startup.py KEY [IDLE]`` prints
JSON.

Measured here, in order: importing the contender's library as a user does (ms; for the engine,
``from engine import Engine``, which imports what the package defers), creating its pool of 2
workers and getting the first result of a no-op target (ms), then the resident memory (RSS) of
this process plus every process it started, once every worker has served and the pool has been
idle for IDLE seconds (default 0.5) (MB). psutil is imported only after the clock stopped, by every
contender alike.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402
from contenders import BY_KEY  # noqa: E402


def main(key: str, idle: float) -> None:
    cls = BY_KEY[key]
    start = time.perf_counter()
    module = importlib.import_module(cls.module)
    if cls.entry:
        getattr(module, cls.entry)  # `from engine import Engine`: what a user's import costs
    imported = time.perf_counter()
    with cls(2) as contender:
        done = contender.run([(workloads.noop, 0)]).results(60)
        first = time.perf_counter()
        if not (done and done[0].ok):
            raise SystemExit(f"{cls.label}: no first result: {done}")
        contender.warm()
        time.sleep(idle)
        import psutil

        me = psutil.Process()
        rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
    print(json.dumps({"import": (imported - start) * 1e3, "first": (first - imported) * 1e3,
                      "rss": rss / 1e6}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
