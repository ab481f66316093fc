"""Quick targets travel in batches; each still has its own result, crash, timeout and error.

A worker that dies mid-batch fails only the target it was running: what it finished before is
delivered (from its journal if it had not sent it yet), what was queued behind runs elsewhere.
Each test checks, through a log written by every run, that no target ran twice or was lost.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest
import targets

from engine import Engine, SerializationError, TargetTimeoutError, WorkerCrashedError

COUNT = 3_000
SPECIAL = 2_000  # late enough that the targets around it travel in a batch


def runs(log: Path) -> collections.Counter[int]:
    return collections.Counter(index for index, _ in ran(log))


def ran(log: Path) -> list[tuple[int, int]]:
    """(index, worker pid) of each run, in the order they began."""
    return [(int(index), int(pid)) for index, pid in map(str.split, log.read_text().splitlines())]


def batched(results: list) -> bool:
    """Whether consecutive targets shared workers: more results than worker processes used."""
    return len({r.pid for r in results}) < len(results) // 10


@pytest.mark.parametrize("how, ballast", [("exit", b""), ("kill", b""), ("exit", b"x" * 40_000)],
                         ids=["exit", "kill", "exit-with-a-batch-held"])
def test_a_crash_mid_batch_fails_only_the_running_target_and_loses_none(
        engine: Engine, tmp_path: Path, how: str, ballast: bytes) -> None:
    """With ballast, the next batch is too big to go ahead into a busy worker's pipe: it waits
    in the pool for that worker, and must not be lost when the worker dies instead."""
    log = tmp_path / "runs"
    cid = engine.invoke([(targets.log_run, (str(log), i, SPECIAL, how, ballast))
                         for i in range(COUNT)])
    results = engine.wait(cid, timeout=120)
    crashed = results[SPECIAL]
    assert isinstance(crashed.exception, WorkerCrashedError), crashed.exception
    innocent = results[:SPECIAL] + results[SPECIAL + 1:]
    assert all(r.ok and r.response == r.index for r in innocent)
    assert runs(log) == collections.Counter(range(COUNT)), "a target ran twice or never"
    assert batched(results)
    # what the dead worker finished (its batch-mates before it included) was delivered, as its
    assert {index for index, pid in ran(log) if pid == crashed.pid} - {SPECIAL} == \
        {r.index for r in innocent if r.pid == crashed.pid}


def test_a_timeout_mid_batch_fails_only_that_target(engine: Engine, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    cid = engine.invoke([(targets.log_run, (str(log), i, SPECIAL, "hang")) for i in range(COUNT)],
                        timeout=2)
    results = engine.wait(cid, timeout=120)
    hung = results[SPECIAL]
    assert isinstance(hung.exception, TargetTimeoutError), hung.exception
    assert 2 <= hung.duration < 10
    assert all(r.ok for r in results[:SPECIAL] + results[SPECIAL + 1:])
    assert runs(log) == collections.Counter(range(COUNT))
    assert batched(results)


def test_a_request_that_will_not_unpickle_in_the_worker_fails_alone(engine: Engine) -> None:
    work = [(targets.double, i) for i in range(COUNT)]
    work[SPECIAL] = (targets.echo, targets.LoadsNowhere())
    results = engine.wait(engine.invoke(work), timeout=120)
    bad = results[SPECIAL]
    assert isinstance(bad.exception, SerializationError) and bad.exception.what == "request"
    assert "cannot be unpickled" in str(bad.exception)
    assert all(r.ok and r.response == 2 * r.index for r in results if r.index != SPECIAL)
    assert batched(results)


def test_unpicklable_requests_and_responses_in_a_batch_fail_alone(engine: Engine) -> None:
    work = [(targets.echo, i) for i in range(COUNT)]
    work[SPECIAL] = (targets.echo, threading.Lock())  # will not pickle in the caller
    work[SPECIAL + 1] = (targets.unpicklable_response, None)  # will not pickle in the worker
    results = engine.wait(engine.invoke(work), timeout=120)
    assert results[SPECIAL].exception.what == "request"
    assert results[SPECIAL + 1].exception.what == "response"
    assert all(r.ok and r.response == r.index for r in results if r.index < SPECIAL)
    assert all(r.ok for r in results[SPECIAL + 2:])
    assert batched(results)


def test_batches_mix_functions_and_keep_the_order_of_indexes(engine: Engine) -> None:
    work = [(targets.double if i % 3 else targets.echo, i) for i in range(COUNT)]
    results = engine.wait(engine.invoke(work), timeout=120)
    assert [r.index for r in results] == list(range(COUNT))
    assert [r.response for r in results] == [2 * i if i % 3 else i for i in range(COUNT)]
    assert batched(results)


def test_each_target_of_a_batch_sees_its_own_context(engine: Engine) -> None:
    """A worker sets the context once per batch and moves it to each target in turn."""
    pairs = [(targets.context, None)] * COUNT + [(targets.echo, "other")]
    results = engine.wait(engine.invoke(pairs, source="batch"), timeout=60)
    assert batched(results[:COUNT])
    contexts = [r.response for r in results[:COUNT]]
    assert [(c.index, c.target, c.source) for c in contexts] == \
        [(index, "targets:context", "batch") for index in range(COUNT)]
    assert engine.wait(engine.invoke([(targets.context, None)]), timeout=30)[0].response.index == 0
