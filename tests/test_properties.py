"""The invariant, over random mixes of outcomes: every target yields exactly one result, and each
callback is called exactly once per target (and on-final once), whatever happened to it."""

from __future__ import annotations

import time

import pytest
import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_callbacks import Recorder

from engine import Engine, TargetCancelledError, TargetTimeoutError, WorkerCrashedError

EXPECTED = {  # outcome -> the exception its result must carry
    "return": None,
    "raise": ValueError,
    "exit": WorkerCrashedError,
    "kill": WorkerCrashedError,
    "hang": TargetTimeoutError,
}


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(EXPECTED)), max_size=8),
       fan=st.booleans(), lazy=st.booleans(),
       cancel_after=st.none() | st.floats(min_value=0.0, max_value=0.4))
def test_every_target_yields_one_result_and_each_callback_runs_once(
        engine: Engine, kinds: list[str], fan: bool, lazy: bool,
        cancel_after: float | None) -> None:
    first, second, final = Recorder(), Recorder(), Recorder()
    work = [(targets.outcome, kind) for kind in kinds]
    given_targets = iter(work) if lazy else work
    if fan:
        cid = engine.fanout(given_targets, on_target=[first, second], on_final=[final],
                            timeout=0.5)
    else:
        cid = engine.invoke(given_targets, callbacks=[first, second], timeout=0.5)
    if cancel_after is not None:
        time.sleep(cancel_after)
        engine.cancel(cid)
    results = engine.wait(cid, timeout=120)

    assert isinstance(results, list) and len(results) == len(kinds)
    for index, (kind, result) in enumerate(zip(kinds, results, strict=True)):
        assert result.index == index and result.cid == cid
        if cancel_after is not None and isinstance(result.exception, TargetCancelledError):
            continue  # cancelled before or while it ran: also exactly one result
        expected = EXPECTED[kind]
        assert result.ok is (expected is None), (kind, result.exception)
        if expected is not None:
            assert isinstance(result.exception, expected), (kind, result.exception)
    for recorder in (first, second):
        assert sorted(p["index"] for p in recorder.payloads) == list(range(len(kinds)))
    if fan:
        assert len(final.payloads) == 1
        assert sorted(p["index"] for p in final.payloads[0]["data"]) == list(range(len(kinds)))
    else:
        assert final.payloads == []


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size=st.integers(min_value=50, max_value=1500),
       faults=st.lists(st.tuples(st.floats(min_value=0.0, max_value=1.0),
                                 st.sampled_from(["raise", "exit", "kill"])), max_size=4),
       ballast=st.sampled_from([0, 2_000, 40_000]), lazy=st.booleans(), keep=st.booleans())
def test_batches_give_one_result_per_target_whatever_dies_in_them(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, size: int,
        faults: list[tuple[float, str]], ballast: int, lazy: bool, keep: bool) -> None:
    """Many quick targets (so they travel in batches, some held back for busy workers when the
    requests are big), a few of which raise or kill their worker: each target has exactly one
    result, the faulty ones fail as they should, every other one succeeds, each callback once.
    Without `keep`, results go to the callbacks only, and a backlog limit of 8 callbacks holds
    the stream back whenever they lag (a long stream held back for real: test_callbacks)."""
    monkeypatch.setattr("engine._invocation.CALLBACK_BACKLOG", 8)
    kinds = ["return"] * size
    for where, kind in faults:
        kinds[int(where * (size - 1))] = kind
    padding = b"p" * ballast
    work = [(targets.outcome_with_ballast, (kind, padding)) for kind in kinds]
    recorder = Recorder()
    cid = engine.invoke(iter(work) if lazy else work, callbacks=[recorder], keep_results=keep)
    results = engine.wait(cid, timeout=120)
    payloads = sorted(recorder.payloads, key=lambda payload: payload["index"])
    assert [p["index"] for p in payloads] == list(range(size))
    assert [p["ok"] for p in payloads] == [EXPECTED[kind] is None for kind in kinds]
    if not keep:
        assert results == []
        return
    assert [r.index for r in results] == list(range(size))
    for kind, result in zip(kinds, results, strict=True):
        expected = EXPECTED[kind]
        if expected is None:
            assert result.ok and result.response == kind, result.exception
        else:
            assert isinstance(result.exception, expected), (kind, result.exception)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.lists(st.sampled_from(["return", "raise", "exit", "kill"]),
                                         min_size=1, max_size=3),
                                st.sampled_from(["wait", "stream", "leave"])),
                      min_size=1, max_size=12))
def test_small_invocations_waited_for_or_not_each_yield_one_result(
        engine: Engine, steps: list[tuple[list[str], str]]) -> None:
    """Quick invocations of a target or a few, one after another, with no time limit: the
    worker an invocation's last batch goes to is kept for its caller, who may wait for it at
    once, stream it, or leave it (then the worker wakes the manager), and workers die in
    between. Every result still comes exactly once, to the waiter and to each callback."""
    invoked = []
    for kinds, then in steps:
        recorder = Recorder()
        cid = engine.invoke([(targets.outcome, kind) for kind in kinds], callbacks=[recorder])
        if then == "wait":
            engine.wait(cid, timeout=60)
        elif then == "stream":
            assert len(list(engine.as_completed(cid, timeout=60))) == len(kinds)
        invoked.append((cid, kinds, recorder))
    for cid, kinds, recorder in invoked:
        results = engine.wait(cid, timeout=60)
        assert [r.index for r in results] == list(range(len(kinds)))
        for kind, result in zip(kinds, results, strict=True):
            expected = EXPECTED[kind]
            assert result.ok is (expected is None), (kind, result.exception)
            if expected is not None:
                assert isinstance(result.exception, expected), (kind, result.exception)
        assert sorted(p["index"] for p in recorder.payloads) == list(range(len(kinds)))
