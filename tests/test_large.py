"""Large responses skip the pipe: they are written to a shared file and read with one copy."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import targets

from engine import Engine, WorkerCrashedError

SIZE = 256 * 80_000  # 20 MB


def expected(kind: str) -> object:
    return targets.large((kind, SIZE))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "nested", "str"])
def test_large_responses_arrive_whole_and_of_their_type(engine: Engine, kind: str) -> None:
    results = engine.wait(engine.invoke([(targets.large, (kind, SIZE))] * 3), timeout=120)
    want = expected(kind)
    for result in results:
        assert result.ok, result.exception
        assert type(result.response) is type(want) and result.response == want


def test_large_numpy_arrays_arrive_whole_and_writable(engine: Engine) -> None:
    numpy = pytest.importorskip("numpy")
    results = engine.wait(engine.invoke([(targets.large, ("numpy", SIZE))] * 2), timeout=120)
    want = expected("numpy")
    for result in results:
        array = result.response["array"]
        assert numpy.array_equal(array, want["array"]) and array.dtype == want["array"].dtype
        assert numpy.array_equal(result.response["small"], want["small"])
        array[0, 0] = -1.0  # writable: the caller owns it
        assert array[0, 0] == -1.0


def test_one_worker_sends_large_responses_one_after_another() -> None:
    """Each waits until the pool has read and released the one before (after delivering it)."""
    with Engine(workers=1) as engine:
        kinds = ["bytes", "nested", "bytes", "str"]
        results = engine.wait(engine.invoke([(targets.large, (kind, SIZE)) for kind in kinds]),
                              timeout=120)
        assert ([r.response == expected(kind) for r, kind in zip(results, kinds, strict=True)]
                == [True] * 4)
        assert len({r.pid for r in results}) == 1


def test_a_large_bytearray_is_writable_in_the_caller(engine: Engine) -> None:
    (result,) = engine.wait(engine.invoke([(targets.large, ("bytearray", SIZE))]), timeout=60)
    result.response[0] = 255
    assert result.response[0] == 255


def test_a_crash_after_a_large_response_keeps_it(engine: Engine) -> None:
    work = [(targets.large, ("bytes", SIZE)), (targets.exit_with, 3), (targets.double, 4)]
    big, crashed, after = engine.wait(engine.invoke(work), timeout=120)
    assert big.ok and len(big.response) == SIZE
    assert isinstance(crashed.exception, WorkerCrashedError)
    assert after.ok and after.response == 8


def test_the_caller_holds_one_copy_of_a_large_response(engine: Engine) -> None:
    """Sampled resident memory of the caller while a 50 MB response arrives: the response itself
    and little else (through a pipe and a pickle it would be two or three copies)."""
    size = 256 * 200_000  # 51 MB
    engine.wait(engine.invoke([(targets.echo, 0)] * 2), timeout=60)
    caller, peak, stop = psutil.Process(), [0], threading.Event()
    base = caller.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], caller.memory_info().rss - base)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        (result,) = engine.wait(engine.invoke([(targets.large, ("bytes", size))]), timeout=120)
    finally:
        stop.set()
        sampler.join()
    assert result.ok and len(result.response) == size
    assert peak[0] < 1.6 * size, f"the caller grew by {peak[0] / size:.2f}× the response"


def test_an_exception_too_large_for_the_journal_still_arrives(engine: Engine) -> None:
    message = "x" * 2_000_000
    (result,) = engine.wait(engine.invoke([(targets.fail, message)]), timeout=60)
    assert not result.ok and isinstance(result.exception, ValueError)
    assert str(result.exception) == message
