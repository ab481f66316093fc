"""Shutdown, cancellation and interruption: nothing is lost, nothing hangs, no process is left."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import bare
import pytest
import targets
from conftest import script_env, wait_gone
from test_callbacks import Recorder

from engine import Engine, EngineState, TargetCancelledError


def ready_pids(eng: Engine) -> tuple[int, ...]:
    eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=30)
    return eng.stats().worker_pids


def test_shutdown_waits_for_running_targets_and_pending_callbacks() -> None:
    slow = Recorder(delay=0.2)
    eng = Engine(workers=2)
    pids = ready_pids(eng)
    cid = eng.invoke([(targets.sleep, 0.5)] * 4, callbacks=[slow])
    eng.shutdown(wait=True)
    assert eng.stats().state is EngineState.CLOSED
    assert len(slow.payloads) == 4 and all(p["ok"] for p in slow.payloads)
    assert all(r.ok for r in eng.wait(cid, timeout=1))
    assert eng.stats().worker_pids == ()
    assert not wait_gone(pids, timeout=0)


def test_leaving_the_with_block_finishes_the_work() -> None:
    slow = Recorder(delay=0.1)
    with Engine(workers=2) as eng:
        cid = eng.invoke([(targets.double, i) for i in range(6)], callbacks=[slow])
    assert len(slow.payloads) == 6
    assert [r.response for r in eng.wait(cid, timeout=1)] == [2 * i for i in range(6)]


def test_cancel_skips_queued_targets_kills_running_ones_and_still_calls_back(
        engine: Engine) -> None:
    pids = ready_pids(engine)
    calls = Recorder()
    cid = engine.invoke([(targets.sleep, 30)] * 2 + [(targets.double, i) for i in range(10)],
                        callbacks=[calls])
    time.sleep(0.5)  # both sleepers are running; the rest wait in the queue
    assert engine.cancel(cid) is True
    results = engine.wait(cid, timeout=30)
    assert all(isinstance(r.exception, TargetCancelledError) for r in results)
    assert [r.exception.running for r in results] == [True, True] + [False] * 10
    assert all(r.started is None for r in results[2:])
    assert sorted(p["index"] for p in calls.payloads) == list(range(12))
    assert not wait_gone(pids), "the cancelled targets' workers were not killed"
    assert engine.cancel(cid) is False  # nothing left to cancel
    assert engine.wait(engine.invoke({targets.double: 4}), timeout=30)[targets.double].ok


def test_an_interrupt_in_the_with_block_cancels_instead_of_waiting() -> None:
    calls = Recorder()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with Engine(workers=2) as eng:
            pids = ready_pids(eng)
            eng.invoke([(targets.sleep, 60)] * 3, callbacks=[calls])
            time.sleep(0.3)
            raise KeyboardInterrupt
    assert time.monotonic() - started < 20
    assert len(calls.payloads) == 3 and not any(p["ok"] for p in calls.payloads)
    assert not wait_gone(pids, timeout=0)


def test_shutdown_timeout_abandons_a_hanging_callback_and_names_it(
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def hang(_: dict) -> None:
        release.wait(60)

    eng = Engine(workers=1)
    try:
        eng.wait(eng.invoke({targets.echo: 1}), timeout=30)
        eng.invoke({targets.echo: 1}, callbacks=[hang])
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="engine"):
            eng.shutdown(wait=True, timeout=1.0)
        assert time.monotonic() - started < 15
        assert "abandoned" in caplog.text and "hang" in caplog.text
        assert eng.stats().worker_pids == ()
    finally:
        release.set()


def test_a_callback_may_start_a_shutdown_but_not_wait_for_it() -> None:
    errors: list[BaseException] = []
    eng = Engine(workers=1)

    def stop(_: dict) -> None:
        try:
            eng.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(exc)
        eng.shutdown(wait=False)

    cid = eng.invoke([(targets.double, 1), (targets.sleep, 0.3)], callbacks=[stop])
    eng.shutdown(wait=True)  # returns once the shutdown the callback began is complete
    assert eng.stats().state is EngineState.CLOSED
    assert len(errors) == 2 and "wait for itself" in str(errors[0])
    assert all(r.ok for r in eng.wait(cid, timeout=1))


def start_script(tmp_path: Path, body: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start a script that prints its worker pids on its first line, then does `body`."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import targets
        from engine import Engine

        eng = Engine(workers=2)
        eng.wait(eng.invoke([(targets.echo, 0)] * 2), timeout=60)
        print(*eng.stats().worker_pids, flush=True)
    """) + textwrap.dedent(body))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=script_env())
    assert process.stdout is not None
    pids = [int(pid) for pid in process.stdout.readline().split()]
    assert len(pids) == 2, process.stderr.read() if process.stderr else ""
    return process, pids


def test_ctrl_c_while_waiting_stops_the_workers(tmp_path: Path) -> None:
    process, pids = start_script(tmp_path, """
        cid = eng.invoke([(targets.sleep, 60)] * 4)
        print("waiting", flush=True)
        eng.wait(cid)
    """)
    with process:  # (closes its pipes)
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        finally:
            process.kill()
        assert not wait_gone(pids, timeout=5), "workers outlived the interrupted caller"
        assert "KeyboardInterrupt" in process.stderr.read()


def test_workers_exit_on_their_own_when_the_caller_is_killed(tmp_path: Path) -> None:
    process, pids = start_script(tmp_path, """
        eng.invoke([(targets.sleep, 60)] * 4)
        time.sleep(60)
    """)
    with process:
        process.kill()
        process.wait(timeout=10)
    assert not wait_gone(pids, timeout=10), "workers outlived the killed caller"


def test_a_script_that_never_shuts_down_exits_cleanly_and_runs_its_callbacks(
        tmp_path: Path) -> None:
    out = tmp_path / "callbacks.txt"
    process, pids = start_script(tmp_path, f"""
        def note(payload):
            time.sleep(0.1)
            with open({str(out)!r}, "a") as f:
                f.write(str(payload["response"]) + "\\n")

        eng.invoke([(targets.sleep, 0.3)] * 4, callbacks=[note])
        print("invoked", flush=True)
    """)
    with process:
        assert process.wait(timeout=30) == 0, process.stderr.read()
    assert out.read_text().split() == ["0.3"] * 4
    assert not wait_gone(pids, timeout=5)


def test_workers_start_safely_while_caller_threads_hold_locks() -> None:
    """Workers are exec'd, not forked copies of the caller: a lock that one of the caller's
    threads holds while workers start is free in them (in a forked child it would be held)."""
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with targets.SHARED_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        with Engine(workers=2) as eng:
            results = eng.wait(eng.invoke([(targets.take_shared_lock, None)] * 4), timeout=60)
        assert [r.response for r in results] == [True] * 4
    finally:
        release.set()
        holder.join()


def test_a_worker_imports_only_its_loop() -> None:
    """A worker starts faster for importing only its loop, journal and pipe (not the engine
    itself, its exceptions or its results), until a target asks for more."""
    with Engine(workers=1) as eng:
        (result,) = eng.wait(eng.invoke([(bare.engine_modules, None)]), timeout=60)
    assert result.response == ["engine", "engine._journal", "engine._pipe", "engine._running",
                               "engine._worker"]


def test_functions_of_a_notebook_style_main_without_a_file_work() -> None:
    code = textwrap.dedent("""
        from engine import Engine
        double = lambda x: 2 * x
        def triple(x):
            return 3 * x
        with Engine(workers=1) as eng:
            print([r.response for r in eng.wait(eng.invoke([(double, 2), (triple, 2)]))])
    """)
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True,
                          timeout=60, env=script_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[4, 6]"
