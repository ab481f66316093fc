"""A caller waiting for the last targets of its invocation receives their outcomes itself.

While it waits, the pool lends it the outcome pipes of the workers running them (the manager
stops watching those): a result then reaches its caller without waking the manager thread. The
worker that a caller's thread sent an invocation's last batch is kept for it from then on, so
that a quick target's result waits for its caller rather than wake the manager; if nobody reads
it, the worker wakes the manager. Whatever else happens meanwhile (other invocations, deaths,
cancellations, a second waiter, no waiter at all) must still reach everyone, and nothing may
hang.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest
import targets

from engine import Engine, TargetCancelledError, WorkerCrashedError
from engine._pool import Loan, TargetPool


def test_a_waiting_caller_receives_its_own_results(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    receivers: list[str] = []
    receive = TargetPool._receive

    def noting_receive(pool: TargetPool, worker: Any) -> bool:
        receivers.append(threading.current_thread().name)
        return receive(pool, worker)

    engine.wait(engine.invoke([(targets.echo, 0)] * 4), timeout=30)  # every worker serving
    monkeypatch.setattr(TargetPool, "_receive", noting_receive)
    # Targets of 50 ms: the caller surely waits before they finish. (A quicker one may finish
    # before its caller waits: the manager, woken first, then receives it as it always did.)
    for _ in range(5):
        assert engine.wait(engine.invoke([(targets.sleep, 0.05)]), timeout=30)[0].ok
    (streamed,) = engine.as_completed(engine.invoke([(targets.sleep, 0.05)]), timeout=30)
    assert streamed.ok
    # (the manager may still take one now and then: it was busy when the caller looked)
    assert receivers.count(threading.current_thread().name) >= 4, receivers


def test_a_quick_target_waits_for_its_caller_not_the_manager(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A no-op finishes long before its caller is back from `invoke`: the worker is kept for
    the caller, so the manager does not take its result over (it did, mostly, before)."""
    receivers: list[str] = []
    receive = TargetPool._receive

    def noting_receive(pool: TargetPool, worker: Any) -> bool:
        receivers.append(threading.current_thread().name)
        return receive(pool, worker)

    engine.wait(engine.invoke([(targets.echo, 0)] * 4), timeout=30)
    monkeypatch.setattr(TargetPool, "_receive", noting_receive)
    for i in range(20):
        cid = engine.invoke([(targets.echo, i)])
        time.sleep(0.0002)  # it has finished by now: a watching manager would have woken
        assert engine.wait(cid, timeout=30)[0].response == i
    assert receivers.count(threading.current_thread().name) >= 15, receivers


def test_a_result_nobody_waits_for_is_received_all_the_same(engine: Engine) -> None:
    """Its worker was kept for a caller that never comes: the worker wakes the manager. Only
    the callback shows the result; nothing else happens in the engine meanwhile."""
    engine.wait(engine.invoke([(targets.echo, 0)] * 4), timeout=30)
    for i in range(5):
        called = threading.Event()
        engine.invoke([(targets.echo, i)], callbacks=lambda payload, c=called: c.set())
        assert called.wait(10), "the result of an invocation nobody waited for was not received"


def test_an_idle_worker_stops_watching_and_sleeps(engine: Engine) -> None:
    """After quick invocations one after another a worker watches for the next without
    sleeping, briefly: idle, it must use no CPU."""
    for i in range(200):
        engine.wait(engine.invoke([(targets.echo, i)]), timeout=30)
    workers = [psutil.Process(pid) for pid in engine.stats().worker_pids]
    time.sleep(0.2)
    before = [sum(w.cpu_times()[:2]) for w in workers]
    time.sleep(1.0)
    after = [sum(w.cpu_times()[:2]) for w in workers]
    used = [b - a for a, b in zip(before, after, strict=True)]
    assert max(used) < 0.05, f"idle workers used {used} s of CPU in 1 s"  # (0.01 s ticks)


def test_other_invocations_run_while_a_caller_waits(engine: Engine) -> None:
    slow = engine.invoke([(targets.sleep, 0.5)])
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.extend(engine.wait(slow, timeout=30)))
    waiter.start()
    time.sleep(0.1)  # it waits, the sleeping target's worker lent to it
    results = engine.wait(engine.invoke([(targets.double, i) for i in range(300)]), timeout=30)
    assert [r.response for r in results] == [2 * i for i in range(300)]
    waiter.join(30)
    assert not waiter.is_alive() and len(waited) == 1 and waited[0].ok


def test_a_worker_killed_while_its_caller_waits_fails_only_that_target(engine: Engine) -> None:
    engine.wait(engine.invoke([(targets.echo, 0)] * 4), timeout=30)
    pids = engine.stats().worker_pids
    cid = engine.invoke([(targets.sleep, 30)])
    killer = threading.Timer(0.3, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
    killer.start()
    start = time.monotonic()
    (result,) = engine.wait(cid, timeout=30)
    assert isinstance(result.exception, WorkerCrashedError)
    assert time.monotonic() - start < 10
    assert engine.wait(engine.invoke([(targets.double, 4)]), timeout=30)[0].response == 8


def test_a_cancel_from_another_thread_reaches_a_waiting_caller(engine: Engine) -> None:
    cid = engine.invoke([(targets.sleep, 30)] * 2)
    canceller = threading.Timer(0.3, engine.cancel, args=(cid,))
    canceller.start()
    start = time.monotonic()
    results = engine.wait(cid, timeout=30)
    assert all(isinstance(r.exception, TargetCancelledError) for r in results)
    assert time.monotonic() - start < 10


def test_two_threads_waiting_for_one_invocation_both_get_everything(engine: Engine) -> None:
    cid = engine.invoke([(targets.sleep, 0.3), (targets.sleep, 0.4)])
    streamed: list[Any] = []
    streamer = threading.Thread(
        target=lambda: streamed.extend(engine.as_completed(cid, timeout=30)))
    streamer.start()
    results = engine.wait(cid, timeout=30)
    streamer.join(30)
    assert [r.ok for r in results] == [True, True]
    assert sorted(r.index for r in streamed) == [0, 1]


def test_a_wait_that_times_out_hands_its_workers_back_to_the_manager(engine: Engine) -> None:
    cid = engine.invoke([(targets.sleep, 0.3)])
    with pytest.raises(TimeoutError):
        engine.wait(cid, timeout=0.05)
    # Nobody waits now: only the manager can receive the outcome and finish the invocation.
    deadline = time.monotonic() + 30
    while engine.stats().invocations_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().invocations_active == 0
    assert engine.wait(cid, timeout=0)[0].ok


def test_news_from_another_thread_wakes_a_caller_waiting_on_its_loan(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager (or a canceller) may deliver results of an invocation whose caller waits on
    a loan: each delivery wakes it. Here every loan lends nothing, so only that can."""
    monkeypatch.setattr(TargetPool, "lend", lambda pool, owner: Loan([], []))
    monkeypatch.setattr(TargetPool, "give_back", lambda pool, loan, ready: None)
    start = time.monotonic()
    (result,) = engine.wait(engine.invoke([(targets.sleep, 0.2)]), timeout=20)
    assert result.ok and time.monotonic() - start < 10
