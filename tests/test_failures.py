"""Targets that raise, crash their worker, run too long, or cannot be pickled: each fails alone."""

from __future__ import annotations

import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import targets
from conftest import wait_gone

from engine import Engine, RemoteError, SerializationError, TargetTimeoutError, WorkerCrashedError

CRASHES = [  # (target, request, the cause the error must name)
    pytest.param(targets.exit_with, 1, "EXIT(1)", id="os._exit(1)"),
    pytest.param(targets.segfault, None, "SIGSEGV", id="segfault"),
    pytest.param(targets.kill_self, signal.SIGKILL, "SIGKILL", id="SIGKILL"),
    pytest.param(targets.kill_self, signal.SIGTERM, "SIGTERM", id="SIGTERM"),
]


@pytest.mark.parametrize("crash, request_, cause", CRASHES)
def test_a_crashing_worker_fails_only_its_target(engine: Engine, crash: Callable[..., Any],
                                                 request_: Any, cause: str) -> None:
    innocents = [(targets.sleep, 0.3)] * 4 + [(targets.double, i) for i in range(10)]
    cid = engine.invoke(innocents[:2] + [(crash, request_)] + innocents[2:])
    results = engine.wait(cid, timeout=60)
    crashed = results[2]
    assert not crashed.ok and isinstance(crashed.exception, WorkerCrashedError)
    error = crashed.exception
    assert error.cause == cause and cause in str(error)
    assert error.pid == crashed.pid and str(crashed.pid) in str(error)
    assert error.target == f"targets:{crash.__name__}"
    assert cause in crashed.traceback
    innocent_results = results[:2] + results[3:]
    assert all(r.ok for r in innocent_results), [r.exception for r in innocent_results if not r.ok]
    assert not wait_gone([crashed.pid]), "the crashed worker is still alive"
    # the worker was replaced and the engine keeps serving
    assert crashed.pid not in engine.stats().worker_pids
    (again,) = engine.wait(engine.invoke([(targets.getpid, None)]), timeout=30)
    assert again.ok and again.response != crashed.pid
    assert len(engine.stats().worker_pids) == 2


def test_a_target_past_its_timeout_has_its_worker_killed_and_replaced(engine: Engine) -> None:
    cid = engine.invoke([(targets.sleep, 30), (targets.sleep, 0.1), (targets.double, 2)],
                        timeout=0.5)
    slow, quick, other = engine.wait(cid, timeout=30)
    assert isinstance(slow.exception, TargetTimeoutError)
    assert isinstance(slow.exception, TimeoutError)
    assert slow.exception.timeout == 0.5 and "timed out after 0.5 s" in str(slow.exception)
    assert 0.5 <= slow.duration < 10
    assert quick.ok and other.ok and other.response == 4
    assert not wait_gone([slow.pid]), "the timed-out worker is still alive"
    assert slow.pid not in engine.stats().worker_pids
    assert engine.wait(engine.invoke({targets.double: 1}), timeout=30)[targets.double].ok


def test_engine_timeout_is_the_default_and_invoke_overrides_it() -> None:
    with Engine(workers=1, timeout=0.3) as eng:
        (limited,) = eng.wait(eng.invoke([(targets.sleep, 20)]), timeout=30)
        (allowed,) = eng.wait(eng.invoke([(targets.sleep, 0.6)], timeout=5), timeout=30)
    assert isinstance(limited.exception, TargetTimeoutError) and allowed.ok


def test_killing_a_timed_out_worker_kills_its_children_too(engine: Engine,
                                                           tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    (result,) = engine.wait(engine.invoke([(targets.spawn_grandchild, str(pid_file))],
                                          timeout=1.5), timeout=30)
    assert isinstance(result.exception, TargetTimeoutError)
    assert not wait_gone([int(pid_file.read_text())]), "the target's own child outlived it"


def test_an_unpicklable_request_fails_that_target_only(engine: Engine) -> None:
    cid = engine.invoke([(targets.echo, threading.Lock()), (targets.echo, "fine")])
    bad, good = engine.wait(cid, timeout=30)
    assert isinstance(bad.exception, SerializationError) and bad.exception.what == "request"
    assert "lock" in str(bad.exception) and bad.pid is None and bad.started is None
    assert good.ok and good.response == "fine"


def test_an_unpicklable_response_fails_that_target_only(engine: Engine) -> None:
    cid = engine.invoke([(targets.unpicklable_response, None), (targets.echo, "fine")])
    bad, good = engine.wait(cid, timeout=30)
    assert isinstance(bad.exception, SerializationError) and bad.exception.what == "response"
    assert "engine.SerializationError: " in bad.traceback  # as the worker printed it
    assert good.ok


def test_an_unpicklable_function_fails_its_target() -> None:
    lock = threading.Lock()
    with Engine(workers=1) as eng:
        (result,) = eng.wait(eng.invoke({lambda _: lock.locked(): None}), timeout=30).values()
    assert isinstance(result.exception, SerializationError) and result.exception.what == "function"


def test_targets_after_unpicklable_functions_still_run(engine: Engine) -> None:
    """The first batch holds only targets that fail before running: the input is read on (this
    hung once: an empty batch was taken for the end of the input)."""
    lock = threading.Lock()
    cid = engine.invoke([(lambda _: lock.locked(), None)] * 3 + [(targets.double, i)
                                                                 for i in range(40)])
    results = engine.wait(cid, timeout=30)
    assert all(isinstance(r.exception, SerializationError) for r in results[:3])
    assert [r.response for r in results[3:]] == [2 * i for i in range(40)]


def test_an_unpicklable_exception_comes_back_as_remote_error(engine: Engine) -> None:
    (result,) = engine.wait(engine.invoke([(targets.raise_unpicklable, "held")]), timeout=30)
    error = result.exception
    assert isinstance(error, RemoteError)
    assert error.type_name == "targets.HoldsLockError" and error.message == "held"
    assert "in raise_unpicklable" in error.traceback and "held" in result.traceback
    assert pickle.loads(pickle.dumps(error)).type_name == error.type_name


def test_exceptions_with_custom_init_and_chains_survive_the_trip(engine: Engine) -> None:
    cid = engine.invoke([(targets.raise_custom, None), (targets.raise_chained, None)])
    custom, chained = engine.wait(cid, timeout=30)
    assert type(custom.exception) is targets.CustomInitError
    assert str(custom.exception) == "7: custom" and custom.exception.code == 7
    error = chained.exception
    assert type(error) is RuntimeError and type(error.__cause__) is KeyError
    assert error.__notes__ == ["a note"]
    assert "inner" in chained.traceback and "outer" in chained.traceback


@pytest.mark.parametrize("kind, exc_type", [("exit", SystemExit), ("interrupt", KeyboardInterrupt)])
def test_base_exceptions_in_a_target_fail_it_and_the_worker_survives(
        kind: str, exc_type: type[BaseException]) -> None:
    with Engine(workers=1) as eng:
        cid = eng.invoke([(targets.raise_base, kind), (targets.getpid, None)])
        raised, after = eng.wait(cid, timeout=30)
    assert type(raised.exception) is exc_type
    assert after.ok and after.response == raised.pid


def test_an_idle_worker_killed_from_outside_is_replaced(engine: Engine) -> None:
    engine.wait(engine.invoke([(targets.getpid, None)] * 2), timeout=30)
    victim = engine.stats().worker_pids[0]
    psutil.Process(victim).kill()
    deadline = time.monotonic() + 20
    while victim in engine.stats().worker_pids or len(engine.stats().worker_pids) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.05)
    results = engine.wait(engine.invoke([(targets.double, i) for i in range(6)]), timeout=30)
    assert all(r.ok for r in results)


@pytest.mark.parametrize("where", ["_receive", "_responses", "_send_message"])
def test_a_failure_of_the_engine_itself_fails_every_target_instead_of_hanging(
        where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the manager thread, before it reads what a worker sent or after (while it makes
    the results of outcomes it has read), or while a batch is sent (by the invoking thread
    itself, here), fails every target rather than lose one."""
    from engine import EngineBrokenError
    from engine._pool import TargetPool

    original = getattr(TargetPool, where)
    broken = threading.Event()

    def fail_once_broken(*args: Any) -> Any:
        if broken.is_set():
            raise RuntimeError("injected bug in the manager thread")
        return original(*args)

    monkeypatch.setattr(TargetPool, where, staticmethod(fail_once_broken)
                        if where == "_responses" else fail_once_broken)
    with Engine(workers=2) as eng:
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)
        pids = eng.stats().worker_pids
        broken.set()
        cid = eng.invoke([(targets.sleep, 0.2)] * 2 + [(targets.double, 1)] * 3)
        results = eng.wait(cid, timeout=30)
        assert all(isinstance(r.exception, EngineBrokenError) for r in results)
        later = eng.wait(eng.invoke({targets.double: 2}), timeout=30)[targets.double]
        assert isinstance(later.exception, EngineBrokenError)
    assert "injected bug" in caplog.text
    assert not wait_gone(pids)


def test_without_pidfd_a_pipe_tells_of_a_worker_death(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.3 have no pidfd: a pipe only the worker holds says when it is gone."""
    from engine import _process

    monkeypatch.setattr(_process, "_HAVE_PIDFD", False)
    with Engine(workers=1) as eng:
        crashed, after = eng.wait(eng.invoke([(targets.exit_with, 4), (targets.getpid, None)]),
                                  timeout=60)
    assert isinstance(crashed.exception, WorkerCrashedError) and "EXIT(4)" in str(crashed.exception)
    assert after.ok and after.response != crashed.pid
