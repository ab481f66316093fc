"""Side-by-side figures for the engine and its peers, as ratios measured in one process run.

    python benchmarks/bench.py [--repeat 3] [--only dispatch,crash] [--peers loky,pebble]
                               [--tiny] [--json out.json] [--plot out.png]

Each workload runs in a fresh process of its own, where every contender (the engine and each
installed peer) is measured `--repeat` times, the repetitions interleaved; a figure is the
median of its repetitions, compared with the best peer's. Peers that are not installed are
skipped with a note (``pip install ".[bench]"`` installs pebble, mpire, dask distributed, numpy
and matplotlib). Benchmarks are not tests: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import workloads  # noqa: E402  (importable by the workers, by reference)
from contenders import BY_KEY, CONTENDERS, Contender, Done, EngineContender  # noqa: E402

Value = float | str  #: a measured figure, or why there is none ("hangs", "error", ...)
Measure = Callable[[], dict[str, Value]]
HIGHER, LOWER = "higher", "lower"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Sizes and time limits of every workload; `--tiny` shrinks them for the smoke test."""

    dispatch: int = 20_000  #: no-op targets per dispatch run
    round_trips: int = 500
    slow_targets: int = 40  #: targets with a 50 ms callback each
    crash_sleep: float = 0.5  #: how long each of the 10 innocent targets sleeps
    crash_wait: float = 10.0  #: how long the crash's results and a replacement are waited for
    hang: float = 10.0  #: how long the timed-out target would sleep
    limit: float = 0.5  #: its time limit
    kill_wait: float = 2.0  #: how long its worker is given to disappear after the report
    burn: int = 3_000_000  #: sum(i*i for i in range(burn)) per CPU target
    payload: int = 50_000_000  #: bytes per large payload
    idle: float = 0.5  #: how long a fresh pool idles before its memory is read
    memory: int = 100_000  #: lazily produced 1 kB targets per memory run
    guard: float = 600.0  #: no measurement runs longer: its processes are killed
    workload_timeout: float = 3600.0  #: no workload process runs longer: it is killed

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(dispatch=200, round_trips=20, slow_targets=8, crash_sleep=0.05,
                   crash_wait=1.5, hang=0.6, limit=0.2, kill_wait=0.5, burn=20_000,
                   payload=1_000_000, idle=0.1, memory=500, guard=60, workload_timeout=120)


@dataclasses.dataclass(frozen=True)
class Figure:
    title: str
    unit: str
    better: str | None  #: HIGHER, LOWER, or None where a ratio means nothing (yes/no)


FIGURES = {
    "dispatch": Figure("dispatch, no callback", "targets/s", HIGHER),
    "dispatch_cb": Figure("dispatch, one no-op callback each", "targets/s", HIGHER),
    "round_trip": Figure("sequential round trip", "µs", LOWER),
    "recorded": Figure("slow callbacks: every result recorded", "s", LOWER),
    "callbacks": Figure("slow callbacks: every callback finished", "s", LOWER),
    "kept": Figure("crash: innocent results kept", "of 10", HIGHER),
    "crash_report": Figure("crash: from the death to its report", "s", LOWER),
    "replaced": Figure("crash: from the death until a new worker runs a target", "s", LOWER),
    "timeout_report": Figure("timeout: from the limit to the report", "s", LOWER),
    "timeout_killed": Figure("timeout: its worker process is gone", "yes/no", None),
    "timeout_serves": Figure("timeout: the pool serves again, after the report", "ms", LOWER),
    "serial": Figure("CPU: serial, in the caller", "s", None),
    "one_worker": Figure("CPU: 1 worker", "s", LOWER),
    "two_workers": Figure("CPU: 2 workers", "s", LOWER),
    "speedup": Figure("CPU: speed-up of 2 workers over serial", "x", HIGHER),
    **{f"{kind}_{what}": Figure(f"payload, {kind}: {title}", unit, LOWER)
       for kind in ("bytes", "numpy")
       for what, title, unit in (("rt", "round trip", "ms"),
                                 ("caller", "caller's peak extra memory", "x payload"),
                                 ("worker", "worker's peak extra memory", "x payload"))},
    "import": Figure("start-up: import", "ms", LOWER),
    "first": Figure("start-up: create the pool, get the first result", "ms", LOWER),
    "rss": Figure("start-up: RSS of caller + idle workers", "MB", LOWER),
    "stream": Figure("memory: caller's growth", "MB", LOWER),
}


class BenchError(Exception):
    """A measurement that could not be made; its message becomes a note."""


NOTES: list[str] = []


def note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)


# -- processes and memory ---------------------------------------------------------------------


def descendants() -> list[psutil.Process]:
    """Our live descendant processes, except the resource trackers that multiprocessing and
    loky start once per caller (they exit with it, and are shared by every pool)."""
    return [p for p in psutil.Process().children(recursive=True)
            if alive(p) and "resource_tracker" not in command_line(p)]


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def kill_after(processes: list[psutil.Process], grace: float) -> list[psutil.Process]:
    """Give `processes` `grace` seconds to exit, then kill the rest; those killed."""
    _, left = psutil.wait_procs(processes, timeout=grace)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    return left


def kill_leftovers(grace: float = 1.0) -> int:
    """Kill what is still alive `grace` seconds after a pool was closed; how many."""
    return len(kill_after(descendants(), grace))


def kill_group(pgid: int, grace: float = 2.0) -> int:
    """Kill what is left of process group `pgid` (a child started with start_new_session),
    `grace` seconds on; how many, not counting resource trackers still on their way out."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and alive(process):
                members.append(process)
        except OSError:
            pass
    trackers = {p.pid for p in members if "resource_tracker" in command_line(p)}
    return sum(p.pid not in trackers for p in kill_after(members, grace))


def worker_pids() -> set[int]:
    return {process.pid for process in descendants()}


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no {field} in /proc/{pid}/status")


def reset_peaks(pids: Iterable[int]) -> dict[int, int]:
    """Reset the kernel's peak-RSS mark (VmHWM) of each process; their RSS now, in bytes."""
    base = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            base[pid] = status_kb(pid, "VmRSS")
        except OSError as exc:
            raise BenchError(f"cannot reset the peak RSS of {pid}: {exc}") from exc
    return base


def peak_growth(base: dict[int, int]) -> dict[int, int]:
    """How far above its RSS at `reset_peaks` each process went, in bytes. The kernel counts
    RSS per thread in batches, so a process with threads reads a few 100 kB off either way:
    a growth below zero is noise, and counts as zero."""
    return {pid: max(0, status_kb(pid, "VmHWM") - rss) for pid, rss in base.items()}


# -- shared steps of the workloads ------------------------------------------------------------


def all_ok(results: list[Done], total: int, what: str) -> list[Done]:
    failed = [d for d in results if not d.ok]
    if len(results) < total or failed:
        reason = f": {failed[0].value!r}" if failed else ""
        raise BenchError(f"{what}: {len(results) - len(failed)} of {total} results{reason}")
    return results


def timed_run(c: Contender, calls: list[Any], s: Sizes,
              callback: Callable[[Any], Any] | None = None) -> float:
    """Seconds until every call has its result (and every callback finished)."""
    start = time.perf_counter()
    run = c.run(calls, callback)
    all_ok(run.results(s.guard), len(calls), c.label)
    if not run.callbacks_done(s.guard):
        raise BenchError(f"{c.label}: callbacks not finished after {s.guard} s")
    return time.perf_counter() - start


@contextlib.contextmanager
def started(cls: type[Contender], workers: int = 2,
            target: Callable[[float], Any] = workloads.sleep_pid) -> Iterator[Contender]:
    """A contender whose workers are all up (their start-up is not measured), closed after,
    measured from a collected heap."""
    with cls(workers) as contender:
        contender.warm(target)
        gc.collect()
        yield contender


def read_lines(path: str) -> list[list[float]]:
    """What a target wrote to `path`: one line of numbers per attempt."""
    try:
        with open(path) as f:
            return [[float(x) for x in line.split()] for line in f if line.strip()]
    except FileNotFoundError:
        return []


def note_failure(label: str, what: str, result: Done) -> None:
    note(f"{label}: the {what} is reported as {type(result.value).__name__}")


# -- the workloads: one small function per workload, generic over the contenders -------------


def dispatch_one_by_one(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    calls = [(workloads.noop, i) for i in range(s.dispatch)]
    with started(cls) as c:
        plain = s.dispatch / timed_run(c, calls, s)
        gc.collect()
        return {"dispatch": plain,
                "dispatch_cb": s.dispatch / timed_run(c, calls, s, callback=workloads.noop)}


def dispatch_map(cls: type[Contender], s: Sizes, chunksize: int,
                 way: str = "map") -> dict[str, Value]:
    with started(cls) as c:
        start = time.perf_counter()
        count = sum(1 for _ in getattr(c, way)(workloads.noop, range(s.dispatch), chunksize))
        if count != s.dispatch:
            raise BenchError(f"{c.label}.map: {count} of {s.dispatch} results")
        return {"dispatch": s.dispatch / (time.perf_counter() - start)}


def round_trip(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    with started(cls) as c:
        elapsed = sum(timed_run(c, [(workloads.noop, i)], s) for i in range(s.round_trips))
        return {"round_trip": elapsed / s.round_trips * 1e6}


def slow_callbacks(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    with started(cls) as c:
        start = time.perf_counter()
        run = c.run([(workloads.noop, i) for i in range(s.slow_targets)], workloads.sleep_50ms)
        all_ok(run.results(s.guard), s.slow_targets, c.label)
        recorded = time.perf_counter() - start
        if not run.callbacks_done(s.guard):
            raise BenchError(f"{c.label}: callbacks not finished after {s.guard} s")
        return {"recorded": recorded, "callbacks": time.perf_counter() - start}


def crash(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    """10 innocent sleeps and one target that SIGKILLs its worker, submitted together."""
    with tempfile.TemporaryDirectory() as tmp, started(cls) as c:
        deaths = os.path.join(tmp, "deaths")
        before = worker_pids()
        run = c.run([(workloads.crash, deaths)] + [(workloads.sleep_pid, s.crash_sleep)] * 10)
        done = {d.index: d for d in run.results(s.crash_wait)}
        attempts = read_lines(deaths)
        if not attempts:
            raise BenchError(f"{c.label}: the crashing target never ran")
        death = attempts[0][0]
        if len(attempts) > 1:
            note(f"{c.label}: the crashing target ran {len(attempts)} times (retried)")
        if 0 in done:
            note_failure(c.label, "crash", done[0])
        innocents = [d for i, d in done.items() if i and d.ok]
        fresh = [d.value[1] for d in innocents if d.value[0] not in before]
        return {"kept": len(innocents),
                "crash_report": done[0].seen - death if 0 in done else "hangs",
                "replaced": min(fresh) - death if fresh else replacement(c, before, death, s)}


def replacement(c: Contender, before: set[int], death: float, s: Sizes) -> Value:
    """When no innocent target ran on a new worker: probe until one does (or give up)."""
    deadline = time.time() + s.crash_wait
    while time.time() < deadline:
        done = c.run([(workloads.sleep_pid, 0.1)] * c.workers).results(
            max(0.0, deadline - time.time()))
        served = [d for d in done if d.ok]
        if not served:
            if done:
                note_failure(c.label, "next target after the crash", done[0])
            return "broken"
        fresh = [d.value[1] for d in served if d.value[0] not in before]
        if fresh:
            return min(fresh) - death
    return "not replaced"


def timeout(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    """A target sleeping `hang` seconds, with a time limit where the peer has one."""
    with tempfile.TemporaryDirectory() as tmp, started(cls) as c:
        path = os.path.join(tmp, "hang")
        limit = s.limit if c.native_limit else None
        done = c.run([(workloads.hang, (s.hang, path))], limit=limit).results(
            s.limit + (s.crash_wait if limit else 0))
        reported = time.time()
        probe = c.run([(workloads.noop, 0)]).results(s.crash_wait)
        serves = (probe[0].seen - reported) * 1e3 if probe and probe[0].ok else "broken"
        lines = read_lines(path)
        if not lines:
            raise BenchError(f"{c.label}: the sleeping target never started")
        pid, began = int(lines[0][0]), lines[0][1]
        if done:
            note_failure(c.label, "timeout", done[0])
        report: Value = "no limit" if limit is None else (
            done[0].seen - began - s.limit if done else "not reported")
        return {"timeout_report": report, "timeout_killed": float(gone(pid, within=s.kill_wait)),
                "timeout_serves": serves}


def gone(pid: int, within: float) -> bool:
    try:
        psutil.Process(pid).wait(within)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def cpu_scaling(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    calls = [(workloads.burn, s.burn)] * 8
    start = time.perf_counter()
    for fn, arg in calls:
        fn(arg)
    serial = time.perf_counter() - start
    with started(cls, workers=1) as c:
        one = timed_run(c, calls, s)
    with started(cls, workers=2) as c:
        two = timed_run(c, calls, s)
    return {"serial": serial, "one_worker": one, "two_workers": two, "speedup": serial / two}


def payload(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    """A target returning `payload` bytes: round trip and peak memory above the RSS before."""
    kinds = ["bytes"] + (["numpy"] if importlib.util.find_spec("numpy") else [])
    if "numpy" in kinds:
        import numpy  # noqa: F401  (the caller unpickles arrays: imported before the clock)
    else:
        note("numpy is not installed: no numpy payload figures")
    figures: dict[str, Value] = {}
    with started(cls, target=workloads.import_numpy if "numpy" in kinds
                 else workloads.sleep_pid) as c:
        for kind in kinds:
            workers = worker_pids()
            base = reset_peaks([os.getpid(), *workers])
            start = time.perf_counter()
            done = c.run([(workloads.payload, (kind, s.payload))]).results(s.guard)
            figures[f"{kind}_rt"] = (time.perf_counter() - start) * 1e3
            all_ok(done, 1, c.label)
            if kind == "numpy":  # read every page: an array mapped from shared memory (the
                done[0].value.sum()  # engine's) enters the caller's RSS only once it is read
            growth = peak_growth(base)
            del done
            figures[f"{kind}_caller"] = growth.pop(os.getpid()) / s.payload
            figures[f"{kind}_worker"] = max(growth.values()) / s.payload
    return figures


def startup(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    """In a fresh interpreter (benchmarks/startup.py), so that nothing is imported yet."""
    command = [sys.executable, os.path.join(HERE, "startup.py"), cls.key, str(s.idle)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=s.guard)
    except subprocess.TimeoutExpired:
        kill_group(process.pid, grace=0)
        process.communicate()
        raise BenchError(f"{cls.label}: start-up not done after {s.guard} s") from None
    finally:
        if kill_group(process.pid):
            note(f"{cls.label}: start-up left processes behind (killed)")
    if process.returncode != 0:
        raise BenchError(f"{cls.label}: start-up failed: {err.strip().splitlines()[-1:]}")
    return json.loads(out)


def stream_engine(keep_results: bool, s: Sizes) -> dict[str, Value]:
    """`memory` lazily produced 1 kB targets, one callback each, pulled as workers free up."""
    with started(EngineContender) as c:
        assert isinstance(c, EngineContender)
        base = reset_peaks([os.getpid()])
        cid = c.engine.invoke(((workloads.noop, b"x" * 1000) for _ in range(s.memory)),
                              callbacks=[workloads.noop], keep_results=keep_results)
        c.engine.wait(cid, timeout=s.guard)
        return {"stream": peak_growth(base)[os.getpid()] / 1e6}


def stream_peer(cls: type[Contender], s: Sizes) -> dict[str, Value]:
    """The same through the peer's `map` (chunksize 1), results iterated and dropped."""
    with started(cls) as c:
        base = reset_peaks([os.getpid()])
        count = sum(1 for _ in c.map(workloads.noop, (b"x" * 1000 for _ in range(s.memory)), 1))
        if count != s.memory:
            raise BenchError(f"{c.label}.map: {count} of {s.memory} results")
        return {"stream": peak_growth(base)[os.getpid()] / 1e6}


# -- the registry ------------------------------------------------------------------------------

Entry = tuple[str, Measure]


def each(measure: Callable[[type[Contender], Sizes], dict[str, Value]]
         ) -> Callable[[Sizes, list[type[Contender]]], list[Entry]]:
    """One entry per contender, named after it."""
    return lambda s, chosen: [(cls.label, functools.partial(measure, cls, s)) for cls in chosen]


def dispatch_entries(s: Sizes, chosen: list[type[Contender]]) -> list[Entry]:
    entries = []
    for cls in chosen:
        name = "engine" if cls is EngineContender else f"{cls.label}.{cls.submit_name}"
        entries.append((name, functools.partial(dispatch_one_by_one, cls, s)))
        if cls is EngineContender:
            entries.append(("engine.map", functools.partial(dispatch_map, cls, s, 0)))
            entries.append(("engine, wait", functools.partial(dispatch_map, cls, s, 0,
                                                              "wait_map")))
            continue
        for chunksize in (1, 100) if cls.chunked_map else (1,):
            suffix = f"(chunksize={chunksize})" if cls.chunked_map else ""
            entries.append((f"{cls.label}.map{suffix}",
                            functools.partial(dispatch_map, cls, s, chunksize)))
    return entries


def stream_entries(s: Sizes, chosen: list[type[Contender]]) -> list[Entry]:
    return [("engine", functools.partial(stream_engine, True, s)),
            ("engine, keep_results=False", functools.partial(stream_engine, False, s)),
            ("engine.map", functools.partial(stream_peer, EngineContender, s)),
            *[(f"{cls.label}.map", functools.partial(stream_peer, cls, s))
              for cls in chosen if cls is not EngineContender]]


@dataclasses.dataclass(frozen=True)
class Workload:
    title: Callable[[Sizes], str]
    figures: tuple[str, ...]
    entries: Callable[[Sizes, list[type[Contender]]], list[Entry]]
    fresh_heap: bool = False  #: one process per repetition: an earlier one's heap hides growth


WORKLOADS = {
    "dispatch": Workload(lambda s: f"{s.dispatch:,} no-op targets submitted together",
                         ("dispatch", "dispatch_cb"), dispatch_entries),
    "round-trip": Workload(lambda s: f"{s.round_trips:,} no-op targets, one after another",
                           ("round_trip",), each(round_trip)),
    "slow-callbacks": Workload(lambda s: f"{s.slow_targets} no-op targets, a 50 ms callback "
                               "each", ("recorded", "callbacks"), each(slow_callbacks)),
    "crash": Workload(lambda s: f"10 targets sleeping {s.crash_sleep} s and one that SIGKILLs "
                      f"its worker; results waited for {s.crash_wait:g} s",
                      ("kept", "crash_report", "replaced"), each(crash)),
    "timeout": Workload(lambda s: f"a target sleeping {s.hang:g} s, limit {s.limit} s",
                        ("timeout_report", "timeout_killed", "timeout_serves"), each(timeout)),
    "cpu": Workload(lambda s: f"8 targets of sum(i*i for i in range({s.burn:,}))",
                    ("serial", "one_worker", "two_workers", "speedup"), each(cpu_scaling)),
    "payload": Workload(lambda s: f"a target returning {s.payload / 1e6:g} MB",
                        tuple(f"{k}_{w}" for k in ("bytes", "numpy")
                              for w in ("rt", "caller", "worker")), each(payload)),
    "startup": Workload(lambda s: "a fresh interpreter creates the pool and gets a result",
                        ("import", "first", "rss"), each(startup)),
    "memory": Workload(lambda s: f"{s.memory:,} lazily produced 1 kB targets",
                       ("stream",), stream_entries, fresh_heap=True),
}


# -- one workload, in its own process ----------------------------------------------------------


def measure_all(name: str, s: Sizes, repeat: int, chosen: list[type[Contender]],
                out: str) -> None:
    """Every entry of workload `name`, `repeat` times, interleaved; raw figures to `out`."""
    workload = WORKLOADS[name]
    entries = workload.entries(s, chosen)
    raw: dict[str, dict[str, list[Value]]] = {label: {} for label, _ in entries}
    for _ in range(repeat):
        for label, measure in entries:
            for key, value in guarded(label, measure, workload.figures, s.guard).items():
                raw[label].setdefault(key, []).append(value)
            with open(out, "w") as f:  # after each measurement: a killed run keeps the rest
                json.dump({"raw": raw, "notes": NOTES}, f)


def guarded(label: str, measure: Measure, figures: tuple[str, ...],
            guard: float) -> dict[str, Value]:
    """Run `measure`; past `guard` seconds its processes are killed (its waits then fail).
    Afterwards nothing it started is left."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        kill_leftovers(grace=0)

    watchdog = threading.Timer(guard, expire)
    watchdog.start()
    try:
        return measure()
    except Exception as exc:
        note(f"{label}: {exc}" if isinstance(exc, BenchError)
             else f"{label}: {type(exc).__name__}: {exc}")
        return dict.fromkeys(figures, "timed out" if fired.is_set() else "error")
    finally:
        watchdog.cancel()
        left = kill_leftovers()
        if left:
            note(f"{label}: {left} process(es) still alive after the pool was closed, killed")


# -- the whole run: one process per workload, then the tables -----------------------------------


def run_workload(name: str, s: Sizes, repeat: int,
                 chosen: list[type[Contender]]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "raw.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", name,
                   "--sizes", json.dumps(dataclasses.asdict(s)), "--repeat", str(repeat),
                   "--peers", ",".join(cls.key for cls in chosen), "--child-out", out]
        log = os.path.join(tmp, "stderr")
        start = time.monotonic()
        with open(log, "w") as err:
            process = subprocess.Popen(command, stdout=err, stderr=err, start_new_session=True,
                                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                           [HERE, os.environ.get("PYTHONPATH", "")])})
            try:
                process.wait(s.workload_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        data = {"raw": {}, "notes": []}
        if os.path.exists(out):
            with open(out) as f:
                data = json.load(f)
        data["seconds"] = round(time.monotonic() - start, 1)
        with open(log) as f:
            stderr = f.read().strip().splitlines()
        if stderr:  # the peers' and the engine's logs: the JSON keeps the end
            data["stderr"] = stderr[-200:]
        if process.returncode:
            data["notes"].append(f"the workload process ended with {process.returncode} "
                                 f"(killed after {s.workload_timeout:g} s if -9): {stderr[-3:]}")
        left = kill_group(process.pid)
        if left:
            data["notes"].append(f"{left} process(es) outlived the workload process, killed")
        return data


def run_repetitions_apart(name: str, s: Sizes, repeat: int,
                          chosen: list[type[Contender]]) -> dict[str, Any]:
    """`run_workload`, one process per repetition, merged as if one process had run them all."""
    runs = [run_workload(name, s, 1, chosen) for _ in range(repeat)]
    merged: dict[str, Any] = {"raw": {}, "notes": [],
                              "seconds": round(sum(run["seconds"] for run in runs), 1)}
    for run in runs:
        for label, figures in run["raw"].items():
            for key, values in figures.items():
                merged["raw"].setdefault(label, {}).setdefault(key, []).extend(values)
        merged["notes"] = list(dict.fromkeys(merged["notes"] + run["notes"]))
        if "stderr" in run:
            merged["stderr"] = run["stderr"]
    return merged


def median(values: list[Value]) -> Value:
    numbers = [v for v in values if isinstance(v, float | int)]
    if numbers:
        return statistics.median(numbers)
    return max(set(values), key=values.count) if values else "n/a"


def fmt(value: Value, unit: str) -> str:
    if isinstance(value, str):
        return value
    if unit == "yes/no":
        return "yes" if value >= 0.5 else "no"
    if unit in ("targets/s", "µs", "of 10"):
        return f"{value:,.0f}"
    return f"{value:,.1f}" if unit in ("ms", "MB") and value >= 10 else f"{value:,.3g}"


def best_peer(medians: dict[str, dict[str, Value]], key: str) -> tuple[str, float] | None:
    better = FIGURES[key].better
    peers = [(v, label) for label, figures in medians.items() if not label.startswith("engine")
             for k, v in figures.items() if k == key and isinstance(v, float | int)]
    if not peers or better is None:
        return None
    value, label = max(peers) if better == HIGHER else min(peers)
    return label, value


def ratio(value: Value, best: tuple[str, float] | None) -> float | None:
    if best is None or isinstance(value, str) or not best[1]:
        return None
    return value / best[1]


def report(name: str, s: Sizes, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Print one workload's medians and ratios; its rows for the summary table."""
    workload = WORKLOADS[name]
    medians = {label: {k: median(v) for k, v in figures.items()}
               for label, figures in data["raw"].items()}
    data["medians"] = medians
    print(f"\n== {name}: {workload.title(s)} ({data['seconds']:.0f} s) ==")
    rows = []
    for key in workload.figures:
        figure = FIGURES[key]
        contenders = [(label, f[key]) for label, f in medians.items() if key in f]
        if not contenders:
            continue
        better = f", {figure.better} is better" if figure.better else ""
        print(f"{figure.title} ({figure.unit}{better})")
        best = best_peer(medians, key)
        for label, value in contenders:
            r = ratio(value, best)
            shown = f"{r:8.3g} x best peer" if r is not None else ""
            print(f"  {label:<44} {fmt(value, figure.unit):>12} {shown}")
            if label.startswith("engine"):
                rows.append({"workload": name, "figure": key, "engine": label, "value": value,
                             "best_peer": best, "ratio": r})
    for text in data["notes"]:
        print(f"  note: {text}")
    return rows


def summary(rows: list[dict[str, Any]]) -> None:
    print("\n| figure | engine | best peer | engine / best peer |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        figure = FIGURES[row["figure"]]
        title = figure.title + ("" if row["engine"] == "engine" else f" ({row['engine']})")
        better = f", {figure.better} is better" if figure.better else ""
        best = row["best_peer"]
        peer = f"{fmt(best[1], figure.unit)} (`{best[0]}`)" if best else "-"
        r = f"{row['ratio']:.3g}" if row["ratio"] is not None else "-"
        print(f"| {title} ({figure.unit}{better}) | {fmt(row['value'], figure.unit)} | "
              f"{peer} | {r} |")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nno plot written to {path}: matplotlib is not installed "
              "(pip install \".[bench]\")")
        return
    rows = [row for row in rows if row["ratio"] and row["ratio"] > 0]
    if not rows:
        print(f"\nno plot written to {path}: no ratio to draw")
        return
    labels, ratios, colours = [], [], []
    for row in rows:
        figure = FIGURES[row["figure"]]
        suffix = "" if row["engine"] == "engine" else f" [{row['engine']}]"
        labels.append(f"{figure.title}{suffix} ({figure.better} is better)")
        ratios.append(row["ratio"])
        wins = (row["ratio"] > 1) == (figure.better == HIGHER)
        tie = 0.99 <= row["ratio"] <= 1.01
        colours.append("tab:gray" if tie else "tab:green" if wins else "tab:red")
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r - 1 for r in ratios], left=1, color=colours)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min([*ratios, 1]) / 4, max([*ratios, 1]) * 4)  # room for the labels
    ax.axvline(1, color="black", linewidth=0.8)
    for y, r in enumerate(ratios):
        ax.annotate(f"{r:.3g}", (r, y), fontsize=7, va="center",
                    xytext=(3 if r >= 1 else -3, 0), textcoords="offset points",
                    ha="left" if r >= 1 else "right")
    ax.set_xlabel("engine / best peer (log scale; green: the engine is better)")
    ax.set_title("engine against the best peer of each figure (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": sys.version.split()[0], "platform": platform.platform()}


def choose(names: str | None) -> tuple[list[type[Contender]], list[str]]:
    """The engine plus the chosen peers that are installed; a note for each one skipped."""
    wanted = [cls for cls in CONTENDERS if names is None or cls.key in names.split(",")
              or cls is EngineContender]
    unknown = set((names or "").split(",")) - set(BY_KEY) - {""}
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}; choose from {', '.join(BY_KEY)}")
    skipped = [f"{cls.label}: not installed, skipped (pip install \".[bench]\")"
               for cls in wanted if not cls.available()]
    return [cls for cls in wanted if cls.available()], skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure")
    parser.add_argument("--only", help=f"workloads, comma-separated: {','.join(WORKLOADS)}")
    parser.add_argument("--peers", help="peers, comma-separated (the engine always runs): "
                        f"{','.join(k for k in BY_KEY if k != 'engine')}")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--dispatch", type=int, help="targets per dispatch run")
    parser.add_argument("--round-trips", type=int, help="sequential round trips")
    parser.add_argument("--memory", type=int, help="targets per memory run")
    parser.add_argument("--json", help="write the raw figures and medians here")
    parser.add_argument("--plot", help="draw the ratios into this PNG (matplotlib)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()

    chosen, skipped = choose(args.peers)
    if args.child:
        measure_all(args.child, Sizes(**json.loads(args.sizes)), args.repeat, chosen,
                    args.child_out)
        return
    sizes = Sizes.tiny() if args.tiny else Sizes()
    sizes = dataclasses.replace(sizes, **{k: v for k, v in (
        ("dispatch", args.dispatch), ("round_trips", args.round_trips),
        ("memory", args.memory)) if v is not None})
    names = list(WORKLOADS) if args.only is None else args.only.split(",")
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
            "sizes": dataclasses.asdict(sizes), "repeat": args.repeat,
            "contenders": [cls.label for cls in chosen], "skipped": skipped}
    print(f"{info['date']}, {info['machine']['cpu']}, {info['machine']['nproc']} CPUs, "
          f"Python {info['machine']['python']}; 2 workers unless said; medians of "
          f"{args.repeat}")
    for text in skipped:
        print(f"note: {text}")
    results, rows = {}, []
    for name in names:
        run = run_repetitions_apart if WORKLOADS[name].fresh_heap else run_workload
        data = run(name, sizes, args.repeat, chosen)
        rows += report(name, sizes, data)
        results[name] = {"title": WORKLOADS[name].title(sizes), **data}
    summary(rows)
    if args.json:
        figures = {k: dataclasses.asdict(FIGURES[k]) for w in names for k in WORKLOADS[w].figures}
        with open(args.json, "w") as f:
            json.dump({**info, "figures": figures, "workloads": results, "summary": rows}, f,
                      indent=2)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
