from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from engine import Engine

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def engine_children() -> set[int]:
    """Our child processes, except the process-global resource trackers that loky and
    multiprocessing start once per caller (for the benchmark's peers); they exit with the caller."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or \
                    "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        pids.add(child.pid)
    return pids


def wait_gone(pids: set[int] | list[int], timeout: float = 10.0) -> set[int]:
    """The pids among `pids` still alive (and not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = engine_children()
    yield
    left = wait_gone(engine_children() - before)
    assert not left, f"the test left child processes behind: {sorted(left)}"


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = Engine(workers=2, callback_workers=4)
    try:
        yield eng
    finally:
        eng.shutdown(wait=True, cancel=True, timeout=30)


def script_env() -> dict[str, str]:
    """The environment of a script run in a fresh interpreter: it imports engine and targets."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def run_script(path: Path, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the script at `path` as __main__, as a user would, and wait for it."""
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=timeout, env=script_env())
