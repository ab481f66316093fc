"""Retries, worker recycling and memory limits, under real crashes and real memory growth."""

from __future__ import annotations

import collections
import gc
import logging
import os
import random
import signal
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import pytest
import targets
from conftest import wait_gone
from test_callbacks import Recorder

from engine import (
    Engine,
    MemoryLimitError,
    TargetTimeoutError,
    WorkerCrashedError,
    WorkerStartError,
)
from engine._engine import parse_bytes


def test_a_crashed_target_is_retried_and_the_payload_counts_the_attempts(tmp_path: Path) -> None:
    calls = Recorder()
    with Engine(workers=1, retries=2) as eng:
        (result,) = eng.wait(eng.invoke([(targets.crash_once, str(tmp_path / "m"))],
                                        callbacks=[calls]), timeout=60)
        assert eng.stats().retries == 1
    assert result.ok and result.response == "second time lucky" and result.attempts == 2
    assert len(calls.payloads) == 1 and calls.payloads[0]["attempts"] == 2


def test_a_target_that_always_crashes_fails_after_retries_plus_one_attempts() -> None:
    with Engine(workers=2) as eng:
        cid = eng.invoke([(targets.exit_with, 3), (targets.double, 2)], retries=2)
        crashed, fine = eng.wait(cid, timeout=60)
        assert eng.stats().worker_deaths == 3
    assert isinstance(crashed.exception, WorkerCrashedError) and crashed.attempts == 3
    assert "EXIT(3)" in str(crashed.exception)
    assert fine.ok and fine.attempts == 1


def test_timeouts_are_retried_too() -> None:
    with Engine(workers=1) as eng:
        (result,) = eng.wait(eng.invoke([(targets.sleep, 30)], timeout=0.3, retries=1),
                             timeout=60)
    assert isinstance(result.exception, TargetTimeoutError) and result.attempts == 2


def test_raised_exceptions_are_retried_only_when_asked() -> None:
    with Engine(workers=1) as eng:
        (plain,) = eng.wait(eng.invoke([(targets.fail, "x")], retries=2), timeout=30)
        (asked,) = eng.wait(eng.invoke([(targets.fail, "x")], retries=2,
                                       retry_on=(ValueError,)), timeout=30)
    assert plain.attempts == 1 and asked.attempts == 3
    assert type(asked.exception) is ValueError


def test_payloads_carry_attempts_only_when_retries_are_on(engine: Engine) -> None:
    calls = Recorder()
    engine.wait(engine.invoke({targets.double: 1}, callbacks=[calls]), timeout=30)
    assert "attempts" not in calls.payloads[0]


@pytest.mark.parametrize("bad", [{"retries": -1}, {"retries": 1.5}, {"retry_on": ValueError},
                                 {"retry_on": ("x",)}])
def test_bad_retry_settings_raise(engine: Engine, bad: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        engine.invoke({targets.double: 1}, **bad)


def test_a_worker_is_replaced_after_max_tasks_per_worker() -> None:
    with Engine(workers=1, max_tasks_per_worker=2) as eng:
        results = eng.wait(eng.invoke([(targets.getpid, None)] * 6), timeout=60)
        pids = [r.response for r in results]
        deadline = time.monotonic() + 10  # the last recycling follows the last result
        while eng.stats().workers_recycled < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats().workers_recycled == 3
    assert len(set(pids)) == 3 and all(pids.count(pid) == 2 for pid in pids)
    assert not wait_gone(set(pids))


def test_a_worker_over_its_memory_limit_is_recycled_after_its_target() -> None:
    # The memory is taken before the targets run (a slow allocation inside a target would
    # look like a target that keeps growing), so each worker is over the limit after its target.
    with Engine(workers=1, max_memory_per_worker="150MB", initializer=targets.hold_memory,
                initargs=(200,)) as eng:
        first, second = eng.wait(eng.invoke([(targets.getpid, None)] * 2), timeout=60)
        stats = eng.stats()
    assert first.ok and second.ok, (first.exception, second.exception)
    assert stats.workers_recycled >= 1 and first.response != second.response, stats


def test_a_target_growing_past_the_memory_limit_is_killed_with_a_clear_error() -> None:
    with Engine(workers=2, max_memory_per_worker=200 * 2**20) as eng:
        grower, fine = eng.wait(eng.invoke([(targets.grow_memory, 20), (targets.sleep, 0.5)]),
                                timeout=60)
        assert grower.pid not in eng.stats().worker_pids
    error = grower.exception
    assert isinstance(error, MemoryLimitError) and isinstance(error, MemoryError)
    assert "ran out of its memory limit" in str(error) and error.rss > error.limit == 200 * 2**20
    assert fine.ok
    assert not wait_gone([grower.pid])


@pytest.mark.parametrize("size, expected", [("512MB", 512_000_000), ("1.5GiB", 1_610_612_736),
                                            ("100 kb", 100_000), (4096, 4096)])
def test_memory_sizes_parse(size: int | str, expected: int) -> None:
    assert parse_bytes(size) == expected


@pytest.mark.parametrize("size", ["lots", "-1MB", 0, "12 parsecs", True])
def test_bad_memory_sizes_raise(size: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(size)  # type: ignore[arg-type]


def test_exception_groups_survive_the_trip(engine: Engine) -> None:
    (result,) = engine.wait(engine.invoke([(targets.raise_group, None)]), timeout=30)
    group = result.exception
    assert isinstance(group, ExceptionGroup) and group.message == "several"
    assert [type(e) for e in group.exceptions] == [ValueError, KeyError]


SOAK_SIZE = int(os.environ.get("ENGINE_SOAK", "120"))
OUTCOMES = ["return", "return", "return", "raise", "exit", "kill", "hang", "unpicklable",
            "numpy", "bytes", "nested"]  # the last three: large responses, in the spill file
LARGE = 512 * 1024
FOLLOWED = 6 * 1024 * 1024  #: "nested": a pickle the caller reads while it is written


def soak_size(kind: str) -> int:
    return FOLLOWED if kind == "nested" else LARGE


def soak_call(kind: str) -> tuple[Any, Any]:
    if kind == "unpicklable":
        return targets.unpicklable_response, None
    if kind in ("numpy", "bytes", "nested"):
        return targets.large, (kind, soak_size(kind))
    return targets.outcome, kind


@pytest.mark.parametrize("seed", [1, 2])
def test_soak_random_outcomes_while_a_thread_kills_random_workers(seed: int) -> None:
    """ENGINE_SOAK=5000 makes this a long run."""
    rng = random.Random(seed)
    kinds = rng.choices(OUTCOMES, k=SOAK_SIZE)
    work = [soak_call(kind) for kind in kinds]
    on_target, on_final = Recorder(), Recorder()
    stop = threading.Event()
    with Engine(workers=2, timeout=0.5) as eng:

        def kill_random_workers() -> None:
            while not stop.wait(0.3):
                pids = eng.stats().worker_pids
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        killer = threading.Thread(target=kill_random_workers)
        killer.start()
        try:
            cid = eng.fanout(work, on_target=[on_target], on_final=[on_final], retries=1)
            results = eng.wait(cid, timeout=240)
        finally:
            stop.set()
            killer.join()
        after = eng.wait(eng.invoke([(targets.double, i) for i in range(4)]), timeout=60)
        pids = set(eng.stats().worker_pids)
    assert isinstance(results, list) and len(results) == SOAK_SIZE
    assert [r.index for r in results] == list(range(SOAK_SIZE))
    for kind, result in zip(kinds, results, strict=True):  # a large response arrives whole
        if kind in ("bytes", "nested") and result.ok:
            assert result.response == targets.large((kind, soak_size(kind)))
        if kind == "numpy" and result.ok:
            assert (result.response["array"] == targets.large(("numpy", LARGE))["array"]).all()
    assert sorted(p["index"] for p in on_target.payloads) == list(range(SOAK_SIZE))
    assert len(on_final.payloads) == 1 and len(on_final.payloads[0]["data"]) == SOAK_SIZE
    assert all(r.ok for r in after)
    assert not wait_gone(pids)
    assert psutil.Process().children() == [] or all(
        "resource_tracker" in " ".join(c.cmdline()) for c in psutil.Process().children())




def test_an_initializer_runs_in_every_worker_before_it_serves() -> None:
    def configure(name: str, value: str) -> None:
        os.environ[name] = value

    with Engine(workers=2, initializer=configure, initargs=("ENGINE_TEST_SETTING", "on")) as eng:
        results = eng.wait(eng.invoke([(targets.read_setting, "ENGINE_TEST_SETTING")] * 4),
                           timeout=60)
    assert [r.response for r in results] == ["on"] * 4


def test_workers_that_cannot_start_are_reported_once_and_fail_their_targets(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise ImportError("No module named 'native_extension'")

    with caplog.at_level(logging.ERROR, logger="engine"):
        with Engine(workers=2, initializer=broken) as eng:
            results = eng.wait(eng.invoke([(targets.double, i) for i in range(4)]), timeout=60)
            time.sleep(0.5)  # a second worker started with the third may still fail
            failures = eng.stats().worker_start_failures
            time.sleep(1.0)
            assert eng.stats().worker_start_failures == failures, "it kept respawning"
            later = eng.wait(eng.invoke({targets.double: 1}), timeout=30)[targets.double]
    assert all(isinstance(r.exception, WorkerStartError) for r in [*results, later])
    assert "native_extension" in str(results[0].exception)
    assert 3 <= failures <= 4
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_a_lazy_iterator_is_pulled_as_workers_free_up_not_all_at_once() -> None:
    # 20,000 requests of 50 kB: 1 GB if the engine held them; it holds the ones in flight.
    count, size = 20_000, 50_000
    pulled = 0

    def requests():
        nonlocal pulled
        for _ in range(count):
            pulled += 1
            yield targets.length, os.urandom(16) * (size // 16)

    caller = psutil.Process()
    with Engine(workers=2) as eng:
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)
        before = caller.memory_info().rss
        cid = eng.invoke(requests())
        peak, in_flight = 0, []
        for result in eng.as_completed(cid, timeout=240):
            if result.index % 500 == 0:
                peak = max(peak, caller.memory_info().rss - before)
                in_flight.append(pulled - result.index)
        results = eng.wait(cid, timeout=60)
    assert len(results) == count and all(r.ok and r.response == size for r in results)
    # Pulled ahead: the batches in flight (about 1 MB of requests each), plus however far this
    # loop lags behind the results; never the whole input.
    assert max(in_flight) < 2_000, max(in_flight)
    assert peak < 200_000_000, f"the caller grew by {peak:,} bytes"


def test_without_kept_results_memory_stays_flat_and_callbacks_get_everything() -> None:
    count = 20_000
    seen = collections.Counter()
    lock = threading.Lock()

    def tally(payload: dict) -> None:
        with lock:
            seen[payload["ok"]] += 1

    # Memory the caller's Python objects hold (tracemalloc: exact, unlike resident memory,
    # which the allocator's reuse of freed pages blurs).
    tracemalloc.start()
    with Engine(workers=2) as eng:
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)
        growth = {}
        for keep in (True, False):
            before = tracemalloc.get_traced_memory()[0]
            cid = eng.invoke(((targets.echo, b"x" * 1000) for _ in range(count)),
                             callbacks=[tally], keep_results=keep)
            kept = eng.wait(cid, timeout=240)
            growth[keep] = tracemalloc.get_traced_memory()[0] - before
            assert len(kept) == (count if keep else 0)
            if not keep:
                with pytest.raises(ValueError, match="keeps no results"):
                    eng.as_completed(cid)
                del kept
    tracemalloc.stop()
    assert seen == {True: 2 * count}
    # 20,000 kept results of 1 kB responses take over 20 MB; not keeping them takes nothing.
    assert growth[False] < 2_000_000 and growth[True] > 20_000_000, growth


def test_kept_results_add_nothing_for_the_garbage_collector_to_walk() -> None:
    # A long-running caller keeps the results of its last `history` invocations: were each
    # result an object the collector tracks, every full collection would walk all of them
    # (that cost dispatch half its speed).
    with Engine(workers=2) as eng:
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)
        gc.collect()
        before = len(gc.get_objects())
        cid = eng.invoke([(targets.echo, index) for index in range(20_000)])
        assert len(eng.wait(cid, timeout=120)) == 20_000  # the Results made here are dropped
        gc.collect()
        assert len(gc.get_objects()) - before < 1_000
        assert [result.response for result in eng.wait(cid)] == list(range(20_000))
