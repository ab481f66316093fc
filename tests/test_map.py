"""`Engine.map`: one target over many requests, its responses in order, as
`concurrent.futures.Executor.map` gives them, with the engine's guarantees per target."""

from __future__ import annotations

import gc
import os
import signal
import time
import traceback
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_callbacks import Recorder
from test_properties import EXPECTED

from engine import (
    Engine,
    TargetTimeoutError,
    UnknownNameError,
    WorkerCrashedError,
)


def test_responses_come_in_input_order_from_a_list_a_range_and_an_iterator(
        engine: Engine) -> None:
    assert list(engine.map(targets.double, [5, 1, 4])) == [10, 2, 8]
    assert list(engine.map(targets.double, range(3000))) == [2 * i for i in range(3000)]
    assert list(engine.map("targets:double", (i for i in range(50)))) == \
        [2 * i for i in range(50)]
    assert list(engine.map(targets.double, [])) == []


class NoSlices(list[int]):
    """A list whose slices are not lists of its items: the engine must not take them."""

    def __getitem__(self, index: object) -> object:  # type: ignore[override]
        if isinstance(index, slice):
            raise RuntimeError("no slices")
        return super().__getitem__(index)  # type: ignore[index]


def test_any_sized_input_gives_its_items_in_its_own_order(engine: Engine) -> None:
    """A sized input is taken in slices where slicing is known to give its items (a list, a
    tuple, a range), else read once, as iterating it gives them."""
    assert list(engine.map(targets.double, (3, 1, 2) * 500)) == [6, 2, 4] * 500
    assert sorted(engine.map(targets.double, {4, 5, 6})) == [8, 10, 12]
    assert list(engine.map(targets.double, {"a": 7, "b": 8}.values())) == [14, 16]
    assert list(engine.map(targets.double, NoSlices(range(1500)))) == \
        [2 * i for i in range(1500)]


def test_a_failure_raises_its_own_exception_in_its_turn(engine: Engine) -> None:
    got = []
    responses = engine.map(targets.outcome, ["return", "return", "raise", "return"])
    with pytest.raises(ValueError, match="raise") as caught:
        for response in responses:
            got.append(response)
    assert got == ["return", "return"]
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert any(frame.name == "outcome" for frame in frames), "the worker's frames are lost"
    assert next(responses, "ended") == "ended"


def test_a_crash_or_a_timeout_raises_the_reason_in_its_turn(engine: Engine) -> None:
    with pytest.raises(WorkerCrashedError):
        list(engine.map(targets.kill_self, [signal.SIGKILL]))
    responses = engine.map(targets.outcome, ["return", "hang"], timeout=0.5)
    assert next(responses) == "return"
    with pytest.raises(TargetTimeoutError):
        next(responses)
    assert list(engine.map(targets.double, range(10))) == [2 * i for i in range(10)]


def test_retries_run_a_crashed_target_again(engine: Engine, tmp_path: Path) -> None:
    markers = [str(tmp_path / "first"), str(tmp_path / "second")]
    assert list(engine.map(targets.crash_once, markers, retries=1)) == \
        ["second time lucky"] * 2


def test_a_bad_target_fails_at_the_call_before_anything_runs(engine: Engine) -> None:
    with pytest.raises(UnknownNameError):
        engine.map("no.such.service", [1, 2])


def test_callbacks_run_once_per_target(engine: Engine) -> None:
    recorder = Recorder()
    assert list(engine.map(targets.double, range(40), callbacks=[recorder], cid="m")) == \
        [2 * i for i in range(40)]
    engine.wait("m", timeout=30)
    assert sorted(p["index"] for p in recorder.payloads) == list(range(40))
    assert {p["response"] for p in recorder.payloads} == {2 * i for i in range(40)}


def test_leaving_early_cancels_what_was_not_sent(engine: Engine) -> None:
    recorder = Recorder()
    responses = engine.map(targets.sleep, [0.05] * 200, callbacks=[recorder], cid="early")
    assert next(responses) == 0.05
    responses.close()
    assert engine.wait("early", timeout=30) == []  # the results were the iterator's
    assert sorted(p["index"] for p in recorder.payloads) == list(range(200))
    cancelled = [p for p in recorder.payloads if not p["ok"]]
    assert cancelled, "every target ran although the caller stopped iterating"
    assert all("TargetCancelledError" in p["exception"] for p in cancelled)


def test_leaving_a_large_input_early_gives_every_target_one_result(engine: Engine) -> None:
    recorder = Recorder()
    responses = engine.map(targets.sleep, [0.01] * 100_000, callbacks=[recorder], cid="large")
    assert next(responses) == 0.01
    responses.close()
    engine.wait("large", timeout=120)
    assert sorted(p["index"] for p in recorder.payloads) == list(range(100_000))
    cancelled = [p for p in recorder.payloads if not p["ok"]]
    assert len(cancelled) > 99_000
    assert all("before it started" in p["exception"] for p in cancelled)


def test_the_responses_are_the_iterators_alone(engine: Engine) -> None:
    responses = list(engine.map(targets.box, range(300), cid="kept"))
    assert [box.value for box in responses] == list(range(300))
    first = weakref.ref(responses[0])
    del responses
    gc.collect()
    assert first() is None, "the engine still holds a response its iterator handed out"
    assert engine.wait("kept", timeout=30) == []
    with pytest.raises(ValueError, match="keeps no results"):
        engine.as_completed("kept")


class Counted:
    """An input that counts how far it was pulled."""

    def __init__(self, count: int) -> None:
        self.pulled, self._count = 0, count

    def __iter__(self) -> Iterator[int]:
        for item in range(self._count):
            self.pulled += 1
            yield item


def test_a_slow_reader_holds_the_input_back(engine: Engine) -> None:
    requests = Counted(100_000)
    responses = engine.map(targets.double, requests)
    assert next(responses) == 0
    time.sleep(1.0)  # the workers would run all 100,000 in a fraction of that
    assert requests.pulled < 30_000, f"{requests.pulled} pulled while the reader read one"
    assert list(responses) == [2 * i for i in range(1, 100_000)]


def test_an_unread_map_neither_hangs_wait_nor_shutdown() -> None:
    eng = Engine(workers=2)
    try:
        responses = eng.map(targets.double, Counted(50_000), cid="unread")
        assert next(responses) == 0
        assert eng.wait("unread", timeout=60) == []  # it waits without the reader
    finally:
        eng.shutdown(wait=True, timeout=60)
    assert list(responses) == [2 * i for i in range(1, 50_000)]  # kept for their reader


def _resident() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak RSS reset")
def test_memory_holds_what_was_not_yet_taken_not_the_whole_map(engine: Engine) -> None:
    size, count = 100_000, 4_000  # 400 MB of responses in all
    list(engine.map(targets.large, [("bytes", size)] * 10))  # warm up
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak
    before, _ = _resident()
    taken = 0
    for response in engine.map(targets.large, [("bytes", size)] * count):
        taken += len(response)
    grown = _resident()[1] - before
    assert taken >= size * count * 0.99
    assert grown < 150e6, f"the caller grew by {grown / 1e6:.0f} MB for a 400 MB map"


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(sorted(EXPECTED)), max_size=8))
def test_map_gives_each_response_until_the_first_failure_which_it_raises(
        engine: Engine, kinds: list[str]) -> None:
    got = []
    raised = None
    try:
        for response in engine.map(targets.outcome, kinds, timeout=0.5):
            got.append(response)
    except Exception as exc:
        raised = exc
    failing = [k for k, kind in enumerate(kinds) if EXPECTED[kind] is not None]
    stop = failing[0] if failing else len(kinds)
    assert got == kinds[:stop]
    if failing:
        assert isinstance(raised, EXPECTED[kinds[stop]])
    else:
        assert raised is None


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=st.lists(st.integers(-10**6, 10**6), max_size=600), lazy=st.booleans())
def test_map_is_the_builtin_map_run_in_workers(engine: Engine, requests: list[int],
                                                lazy: bool) -> None:
    given_requests = iter(requests) if lazy else requests
    assert list(engine.map(targets.double, given_requests)) == [2 * r for r in requests]
