"""invoke/fanout/wait as a user calls them: where targets run, what comes back, what callbacks
see."""

from __future__ import annotations

import gc
import os
import re
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import targets
from conftest import run_script

from engine import CallContext, Channel, Engine, Result

PAYLOAD_KEYS = {"source", "target", "response", "req_ts_utc", "resp_ts_utc", "ok", "exception",
                "cid", "phase", "index"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?$")


def test_targets_run_in_worker_processes_in_parallel(engine: Engine) -> None:
    cid = engine.invoke([(targets.interval, 0.5), (targets.interval, 0.5)])
    first, second = engine.wait(cid, timeout=30)
    assert first.pid != second.pid
    assert os.getpid() not in {first.pid, second.pid}
    (start1, end1), (start2, end2) = first.response, second.response
    assert start1 < end2 and start2 < end1, "the two targets did not overlap in time"


def test_mapping_gives_results_by_target_and_user_cid_comes_back_unchanged(engine: Engine) -> None:
    engine.register("service1", targets.echo)
    seen: list[dict] = []
    cid = engine.invoke({"service1": {"hello": "from-parallel-exec1"},
                         "targets:double": 21},
                        callbacks=[seen.append], cid="1632-5754-5628-5197")
    assert cid == "1632-5754-5628-5197"
    results = engine.wait(cid, timeout=30)
    assert isinstance(results, dict) and set(results) == {"service1", "targets:double"}
    assert results["service1"].response == {"hello": "from-parallel-exec1"}
    assert results["targets:double"].response == 42
    assert all(r.ok and r.exception is None and r.cid == cid for r in results.values())
    assert sorted(p["target"] for p in seen) == ["service1", "targets:double"]
    assert {p["cid"] for p in seen} == {cid}


def test_fresh_cids_are_unique(engine: Engine) -> None:
    cids = [engine.invoke({}) for _ in range(50)]
    assert len(set(cids)) == 50


def test_pairs_run_one_target_many_times_and_keep_their_order(engine: Engine) -> None:
    cid = engine.invoke([(targets.double, i) for i in range(30)])
    results = engine.wait(cid, timeout=30)
    assert isinstance(results, list)
    assert [r.response for r in results] == [2 * i for i in range(30)]
    assert [r.index for r in results] == list(range(30))


def test_responses_of_every_kind_come_back_whole_and_of_their_type(engine: Engine) -> None:
    """Through real workers: scalars travel as journal entries of their own kind, anything else
    as its pickle; both must come back equal and of the same type."""
    values = [None, True, 0, -(2**31), 2**31, 2**100, 1.5, -0.0, float("inf"), 1e-310, 2 - 3j,
              "", "ascii", "é日本", "\udc80 lone surrogate", "x" * 100_000, b"", b"\x00\xff" * 99,
              bytearray(b"ba"), (1, "t"), [1.5, None], {"k": {"nested": [b"v"]}}, {1, 2},
              frozenset({"f"})]
    results = engine.wait(engine.invoke([(targets.echo, value) for value in values]), timeout=60)
    assert [r.response for r in results] == values
    assert [type(r.response) for r in results] == [type(value) for value in values]
    assert [str(r.response) for r in results if type(r.response) is float][:2] == ["1.5", "-0.0"]


def test_a_lazy_iterator_of_pairs_is_accepted(engine: Engine) -> None:
    cid = engine.invoke((targets.double, i) for i in range(10))
    assert [r.response for r in engine.wait(cid, timeout=30)] == [2 * i for i in range(10)]


def test_register_as_decorator_and_import_paths(engine: Engine) -> None:
    @engine.register("image.resize")
    def resize(size: int) -> int:
        return size // 2

    cid = engine.invoke([("image.resize", 10), ("targets:double", 4)])
    assert [r.response for r in engine.wait(cid, timeout=30)] == [5, 8]


def test_lambdas_and_closures_work_as_targets_and_callbacks(engine: Engine) -> None:
    factor = 3
    seen: list[int] = []
    cid = engine.invoke({lambda x: x * factor: 5}, callbacks=[lambda p: seen.append(p["response"])])
    (result,) = engine.wait(cid, timeout=30).values()
    assert result.response == 15 and seen == [15]


def test_functions_defined_in_a_scripts_main_work(tmp_path: Path) -> None:
    script = tmp_path / "batch.py"
    script.write_text(textwrap.dedent("""
        import threading
        from engine import Engine

        lock = threading.Lock()

        def square(x):
            return x * x

        def report(payload):
            with lock:  # callbacks run concurrently
                print("callback", payload["target"], payload["response"])

        if __name__ == "__main__":
            with Engine(workers=2) as eng:
                cid = eng.invoke([(square, 3), (square, 4)], callbacks=[report])
                print("results", [r.response for r in eng.wait(cid, timeout=30)])
    """))
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert "results [9, 16]" in done.stdout
    assert "callback __main__:square 9" in done.stdout


def test_main_objects_travel_by_value_with_the_globals_of_the_moment(tmp_path: Path) -> None:
    """A request of a class of `__main__` (which plain pickle would name, and a worker lacks)
    arrives, and a `__main__` function sees a global changed between two invocations."""
    script = tmp_path / "batch.py"
    script.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from engine import Engine

        FACTOR = 2

        @dataclass
        class Point:
            x: int

        def scale(point):
            return Point(point.x * FACTOR)

        if __name__ == "__main__":
            with Engine(workers=1) as eng:
                first = eng.wait(eng.invoke([(scale, Point(3))]), timeout=30)[0].result()
                FACTOR = 10
                second = eng.wait(eng.invoke([(scale, Point(3))]), timeout=30)[0].result()
                print("points", first, second)
    """))
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert "points Point(x=6) Point(x=30)" in done.stdout


def test_payload_has_exactly_the_documented_keys(engine: Engine) -> None:
    seen: list[dict] = []
    cid = engine.invoke([(targets.double, 1), (targets.fail, "no")], callbacks=[seen.append],
                        source="parallel1.my-service")
    engine.wait(cid, timeout=30)
    assert len(seen) == 2
    good, bad = sorted(seen, key=lambda p: p["index"])
    for payload in (good, bad):
        assert set(payload) == PAYLOAD_KEYS
        assert TIMESTAMP.match(payload["req_ts_utc"]) and TIMESTAMP.match(payload["resp_ts_utc"])
        assert payload["resp_ts_utc"] >= payload["req_ts_utc"]
        assert payload["source"] == "parallel1.my-service" and payload["cid"] == cid
        assert payload["phase"] == "on-target"
    assert good == {**good, "ok": True, "response": 2, "exception": None,
                    "target": "targets:double", "index": 0}
    assert bad["ok"] is False and bad["response"] is None
    assert "ValueError: no" in bad["exception"]
    assert 'targets.py", line' in bad["exception"] and "in fail" in bad["exception"]


def test_default_source_is_the_calling_module(engine: Engine) -> None:
    seen: list[dict] = []
    engine.wait(engine.invoke({targets.echo: 1}, callbacks=[seen.append]), timeout=30)
    assert seen[0]["source"] == __name__


def test_result_exception_is_the_real_one_and_reraises_with_the_workers_frames(
        engine: Engine) -> None:
    (result,) = engine.wait(engine.invoke([(targets.fail, "boom")]), timeout=30)
    assert not result.ok and result.response is None
    assert type(result.exception) is ValueError and str(result.exception) == "boom"
    assert "in fail" in result.traceback
    with pytest.raises(ValueError, match="boom") as info:
        result.result()
    frames = [(Path(entry.path).name, entry.name) for entry in info.traceback]
    assert ("targets.py", "fail") in frames


def test_targets_and_callbacks_know_their_channel_and_cid(engine: Engine) -> None:
    contexts: list[CallContext | None] = []
    lock = threading.Lock()

    def record(_: dict) -> None:
        from engine import current_context
        with lock:
            contexts.append(current_context())

    cid = engine.invoke({targets.context: None}, callbacks=[record])
    (result,) = engine.wait(cid, timeout=30).values()
    assert result.response == CallContext(Channel.PARALLEL_EXEC_CALL, cid, __name__,
                                          "targets:context", 0)
    cid2 = engine.fanout({targets.context: None}, on_target=[record], on_final=[record])
    (result2,) = engine.wait(cid2, timeout=30).values()
    assert result2.response.channel is Channel.FANOUT_CALL and result2.response.cid == cid2
    channels = {(c.channel, c.cid) for c in contexts if c is not None}
    assert len(contexts) == 3 and channels == {(Channel.PARALLEL_EXEC_ON_TARGET, cid),
                                               (Channel.FANOUT_ON_TARGET, cid2),
                                               (Channel.FANOUT_ON_FINAL, cid2)}
    assert str(Channel.FANOUT_ON_FINAL) == "fanout-on-final"


def test_as_completed_streams_results_as_they_land(engine: Engine) -> None:
    cid = engine.invoke([(targets.sleep, 1.0), (targets.sleep, 0.05)])
    order = [r.index for r in engine.as_completed(cid, timeout=30)]
    assert order == [1, 0]


def test_wait_raises_timeout_error_and_the_invocation_still_completes(engine: Engine) -> None:
    cid = engine.invoke({targets.sleep: 1.0})
    with pytest.raises(TimeoutError, match="0 of 1 results"):
        engine.wait(cid, timeout=0.05)
    with pytest.raises(TimeoutError):
        list(engine.as_completed(cid, timeout=0.05))
    assert engine.wait(cid, timeout=30)[targets.sleep].ok


def test_result_timestamps_and_duration(engine: Engine) -> None:
    (result,) = engine.wait(engine.invoke([(targets.sleep, 0.2)]), timeout=30)
    assert isinstance(result, Result)
    assert result.started is not None and result.req_ts <= result.started <= result.resp_ts
    assert result.duration is not None and result.duration >= 0.2
    assert TIMESTAMP.match(result.req_ts_utc)


def test_wait_on_an_unknown_cid_raises_key_error(engine: Engine) -> None:
    with pytest.raises(KeyError, match="no invocation"):
        engine.wait("nope")


def test_finished_invocations_are_kept_for_the_configured_history() -> None:
    with Engine(workers=1, history=2) as eng:
        cids = [eng.invoke({}) for _ in range(3)]
        with pytest.raises(KeyError):
            eng.wait(cids[0])
        assert eng.wait(cids[2]) == {}


def test_targets_whose_equality_raises_run_all_the_same(engine: Engine) -> None:
    """The engine tells a batch's targets apart without needing their `==`, which may raise."""
    a, b = targets.Touchy(1), targets.Touchy(2)
    results = engine.wait(engine.invoke([(a, 1), (b, 2), (a, 3)] * 1000), timeout=60)
    assert [result.response for result in results] == [1, 4, 3] * 1000


def test_a_finished_invocation_holds_none_of_its_input(engine: Engine) -> None:
    """Finished invocations are kept for `wait`, their results with them, but not their
    requests: those may be large, and the caller may have dropped them long ago."""
    requests = [targets.Box(i) for i in range(3000)]
    held = [weakref.ref(request) for request in requests]
    cid = engine.invoke([(targets.echo, request) for request in requests])
    results = engine.wait(cid, timeout=60)
    assert [result.response.value for result in results] == list(range(3000))
    mapped = list(engine.map(targets.echo, requests))
    assert [response.value for response in mapped] == list(range(3000))
    del requests
    gc.collect()
    assert [ref for ref in held if ref() is not None] == []
    assert engine.wait(cid) == results  # still known


def test_many_threads_invoking_at_once_each_get_every_result_once(engine: Engine) -> None:
    """A caller's thread sends its list's first batches itself when the manager is idle: many
    threads at once (and callbacks that invoke, from the callback pool) race for that."""
    nested: list[str] = []

    def invoke_again(payload: dict) -> None:
        if payload["index"] == 0:
            nested.append(engine.invoke([(targets.double, 21)]))

    errors: list[BaseException] = []

    def caller(seed: int) -> None:
        try:
            for round_ in range(15):
                size = 1 + (seed * 7 + round_) % 12
                work = [(targets.outcome, "raise" if i % 5 == 4 else "return") for i in range(size)]
                cid = engine.invoke(work, callbacks=[invoke_again],
                                    timeout=30 if round_ % 3 == 0 else None)
                results = engine.wait(cid, timeout=60)
                assert [r.index for r in results] == list(range(size))
                assert [r.ok for r in results] == [i % 5 != 4 for i in range(size)]
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    assert len(nested) == 8 * 15
    assert all(engine.wait(cid, timeout=30)[0].response == 42 for cid in nested)
