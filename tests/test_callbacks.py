"""Callbacks: once per target, on their own pool, isolated from each other; fan-in once."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import targets

from engine import Engine


class Recorder:
    """A thread-safe callback that keeps every payload it is given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.payloads: list[dict] = []
        self.delay = delay
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, payload: dict) -> None:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
            self.payloads.append(payload)


def test_each_callback_runs_exactly_once_per_target_whatever_the_outcome(engine: Engine) -> None:
    first, second = Recorder(), Recorder()
    work = [(targets.double, 1), (targets.fail, "x"), (targets.exit_with, 2), (targets.double, 1)]
    cid = engine.invoke(work, callbacks=[first, second])
    results = engine.wait(cid, timeout=60)
    assert [r.ok for r in results] == [True, False, False, True]
    for recorder in (first, second):
        assert sorted(p["index"] for p in recorder.payloads) == [0, 1, 2, 3]
        by_index = {p["index"]: p for p in recorder.payloads}
        assert by_index[2]["ok"] is False and "EXIT(2)" in by_index[2]["exception"]


def test_slow_callbacks_never_delay_the_recording_of_results() -> None:
    slow = Recorder(delay=0.05)
    with Engine(workers=2, callback_workers=1) as eng:
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)  # workers are up
        cid = eng.invoke([(targets.echo, i) for i in range(40)], callbacks=[slow])
        recorded = list(eng.as_completed(cid, timeout=30))
        finished_when_recorded = len(slow.payloads)
        eng.wait(cid, timeout=30)
    assert len(recorded) == 40
    # One callback thread needs 40 x 50 ms = 2 s for the callbacks; results came long before.
    assert finished_when_recorded < 20, finished_when_recorded
    assert len(slow.payloads) == 40


def test_callbacks_run_concurrently_on_the_callback_pool(engine: Engine) -> None:
    """A backlog starts threads up to the limit (4 here), each new one starting the next."""
    slow = Recorder(delay=0.2)
    engine.wait(engine.invoke([(targets.echo, i) for i in range(8)], callbacks=[slow]),
                timeout=30)
    assert slow.most_at_once == 4


def test_a_burst_while_threads_sleep_still_grows_the_pool_to_its_limit() -> None:
    from engine._callbacks import CallbackPool

    pool = CallbackPool(4)
    done = threading.Semaphore(0)
    pool.submit([(Recorder(), "quick", {}, ("channel", "cid"), done.release)])
    assert done.acquire(timeout=10)
    time.sleep(0.1)  # its one thread sleeps now
    slow = Recorder(delay=0.2)
    pool.submit([(slow, "slow", {}, ("channel", "cid"), done.release)] * 8)
    assert all(done.acquire(timeout=10) for _ in range(8))
    assert pool.shutdown(timeout=10) == []
    assert slow.most_at_once == 4


def test_when_no_more_threads_start_the_running_ones_serve_the_backlog(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from engine._callbacks import CallbackPool

    start = threading.Thread.start
    started = []

    def start_one(thread: threading.Thread) -> None:
        if started:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_one)
    pool = CallbackPool(4)
    done = threading.Semaphore(0)
    slow = Recorder(delay=0.01)
    pool.submit([(slow, "slow", {}, ("channel", "cid"), done.release)] * 8)
    assert all(done.acquire(timeout=10) for _ in range(8))
    assert pool.shutdown(timeout=10) == [] and len(slow.payloads) == 8
    assert caplog.text.count("could not start a callback thread") == 1


def test_callbacks_that_wait_for_other_invocations_do_not_deadlock_the_pool() -> None:
    """Every callback thread waits for an invocation whose own callbacks need a thread: while
    they wait, the pool may run more threads; afterwards it shrinks back to its limit."""
    inner = Recorder(delay=0.05)
    with Engine(workers=2, callback_workers=2) as eng:

        def chain(payload: dict) -> None:
            results = eng.wait(eng.invoke([(targets.echo, payload["index"])], callbacks=[inner]),
                               timeout=20)
            assert results[0].response == payload["index"]

        outer = Recorder()
        cid = eng.invoke([(targets.echo, i) for i in range(4)], callbacks=[chain, outer])
        eng.wait(cid, timeout=30)
        assert eng.stats().callbacks_failed == 0
        assert len(inner.payloads) == 4 and len(outer.payloads) == 4
        quick = Recorder(delay=0.1)
        eng.wait(eng.invoke([(targets.echo, i) for i in range(8)], callbacks=[quick]),
                 timeout=30)
        assert quick.most_at_once == 2


def test_a_callback_waiting_for_its_own_invocation_is_refused(engine: Engine) -> None:
    seen: list[BaseException] = []

    def wait_for_self(payload: dict) -> None:
        try:
            engine.wait(payload["cid"], timeout=5)
        except BaseException as exc:
            seen.append(exc)

    engine.wait(engine.fanout([(targets.echo, 1)], on_target=[wait_for_self],
                              on_final=[wait_for_self]), timeout=30)
    assert len(seen) == 2
    assert all(isinstance(exc, RuntimeError) and "wait for itself" in str(exc) for exc in seen)


def test_a_raising_callback_is_logged_counted_and_harms_nothing(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    good = Recorder()

    def bad(payload: dict) -> None:
        raise RuntimeError(f"callback failed for {payload['index']}")

    with caplog.at_level(logging.ERROR, logger="engine"):
        cid = engine.invoke([(targets.double, i) for i in range(5)], callbacks=[bad, good])
        results = engine.wait(cid, timeout=30)
    assert all(r.ok for r in results)
    assert len(good.payloads) == 5
    stats = engine.stats()
    assert stats.callbacks_failed == 5 and stats.callbacks_succeeded == 5
    assert stats.callback_backlog == 0
    logged = [r for r in caplog.records if "raised" in r.getMessage()]
    assert len(logged) == 5 and all(r.exc_info for r in logged)
    assert "callback failed for" in caplog.text


def test_fanout_runs_on_final_once_after_every_target_with_the_fan_in_payload(
        engine: Engine) -> None:
    on_target, on_final = Recorder(), Recorder()
    results_when_final: list[int] = []

    def final(payload: dict) -> None:
        results_when_final.append(len(on_target_results()))
        on_final(payload)

    def on_target_results() -> list:
        return list(engine.as_completed(cid, timeout=0))  # every result is in when on-final runs

    cid = engine.fanout([(targets.sleep, 0.2), (targets.fail, "x"), (targets.exit_with, 1)],
                        on_target=[on_target], on_final=[final], source="fan")
    engine.wait(cid, timeout=60)
    assert len(on_final.payloads) == 1 and results_when_final == [3]
    payload = on_final.payloads[0]
    assert set(payload) == {"phase", "source", "cid", "req_ts_utc", "on_target", "on_final",
                            "data"}
    assert payload["phase"] == "on-final" and payload["cid"] == cid
    assert payload["source"] == "fan" and isinstance(payload["req_ts_utc"], str)
    assert payload["on_target"] == [f"{__name__}:{Recorder.__qualname__}"]
    assert payload["on_final"] == [f"{__name__}:{final.__qualname__}"]
    data = payload["data"]
    assert sorted(p["index"] for p in data) == [0, 1, 2]
    assert [p["ok"] for p in sorted(data, key=lambda p: p["index"])] == [True, False, False]
    completion = [result.index for result in engine.as_completed(cid)]
    assert [p["index"] for p in data] == completion
    assert len(on_target.payloads) == 3


def test_fanout_of_nothing_runs_on_final_at_once_with_empty_data(engine: Engine) -> None:
    on_final = Recorder()
    cid = engine.fanout({}, on_final=[on_final])
    assert engine.wait(cid, timeout=10) == {}
    assert len(on_final.payloads) == 1 and on_final.payloads[0]["data"] == []


def test_callbacks_by_registered_name_and_import_path(engine: Engine) -> None:
    recorder = Recorder()
    engine.register("my.callback2", recorder)
    cid = engine.invoke({targets.double: 2}, callbacks=["my.callback2", "targets:echo"])
    engine.wait(cid, timeout=30)
    assert [p["response"] for p in recorder.payloads] == [4]
    assert engine.stats().callbacks_succeeded == 2


def test_callbacks_can_run_in_a_process_pool(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "calls"
    out.mkdir()

    def write(payload: dict) -> None:  # a closure: it travels with cloudpickle
        import os
        (out / f"{payload['index']}.json").write_text(json.dumps([os.getpid(), payload["ok"]]))

    spawn = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as executor:
        with Engine(workers=2, callback_executor=executor) as eng:
            eng.wait(eng.invoke([(targets.double, i) for i in range(3)], callbacks=[write]),
                     timeout=60)
            assert eng.stats().callbacks_succeeded == 3
    calls = [json.loads(p.read_text()) for p in sorted(out.iterdir())]
    assert len(calls) == 3 and all(ok for _, ok in calls)
    import os
    assert {pid for pid, _ in calls} != {os.getpid()}


def test_callbacks_see_their_own_copy_of_the_payload(engine: Engine) -> None:
    seen: collections.Counter[str] = collections.Counter()

    def mutate(payload: dict) -> None:
        payload["target"] = "changed"

    def check(payload: dict) -> None:
        seen[payload["target"]] += 1

    engine.wait(engine.invoke([(targets.double, 1)] * 5, callbacks=[mutate, check]), timeout=30)
    assert seen == {"targets:double": 5}


def test_the_callback_backlog_and_lag_are_visible_in_the_stats() -> None:
    gate = threading.Event()

    def held(_: dict) -> None:
        gate.wait(30)

    with Engine(workers=2, callback_workers=1) as eng:
        cid = eng.invoke([(targets.echo, i) for i in range(20)], callbacks=[held])
        for _ in eng.as_completed(cid, timeout=30):
            pass
        time.sleep(0.5)  # every result is in; the one callback thread is held by the first
        backlog = eng.stats().callback_backlog
        gate.set()
        eng.wait(cid, timeout=30)
        stats = eng.stats()
    assert backlog == 20  # one running, 19 waiting for the thread
    assert stats.callback_backlog == 0 and stats.callbacks_succeeded == 20
    assert stats.callback_max_lag >= 0.5  # the last ones waited for the held one


def test_a_stream_whose_callbacks_lag_is_pulled_no_further_than_the_work_in_flight() -> None:
    # Each waiting callback holds its payload: were targets pulled regardless, memory would
    # grow with the stream, not with the work in flight.
    from engine._invocation import CALLBACK_BACKLOG
    from engine._pool import MAX_BATCH

    count, gate, pulled = 30_000, threading.Event(), [0]
    calls = collections.Counter[int]()

    def stream():
        for index in range(count):
            pulled[0] += 1
            yield targets.echo, index

    def held(payload: dict) -> None:
        gate.wait(60)
        calls[payload["response"]] += 1

    with Engine(workers=2, callback_workers=2) as eng:
        cid = eng.invoke(stream(), callbacks=[held], keep_results=False)
        before, deadline = -1, time.monotonic() + 30
        while pulled[0] != before and time.monotonic() < deadline:  # until it stops pulling
            before = pulled[0]
            time.sleep(0.5)
        stalled_at = pulled[0]
        gate.set()
        eng.wait(cid, timeout=120)
    # the backlog and the batch recorded last, plus what was on its way to each worker: the
    # running batch, three ahead and one held back
    assert stalled_at <= CALLBACK_BACKLOG + (1 + 2 * 5) * MAX_BATCH < count, stalled_at
    assert calls == collections.Counter(range(count))
