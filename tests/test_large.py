"""Large responses skip the pipe: written to a shared file in memory, copied out once (bytes) or
mapped with no copy (out-of-band buffers: numpy arrays)."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import targets
from conftest import wait_gone

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
    assert result.ok and result.response == targets.large(("bytes", size))
    assert peak[0] < 1.6 * size, f"the caller grew by {peak[0] / size:.2f}× the response"


def test_an_exception_too_large_for_the_journal_still_arrives(engine: Engine) -> None:
    message = "x" * 2_000_000
    (result,) = engine.wait(engine.invoke([(targets.fail, message)]), timeout=60)
    assert not result.ok and isinstance(result.exception, ValueError)
    assert str(result.exception) == message


def spill_memory(engine: Engine) -> int:
    """Bytes of memory the workers' spill files hold (a file in memory reports what it holds)."""
    return sum(os.fstat(worker.process.spill).st_blocks * 512 for worker in engine._pool._workers)


def spill_holds(engine: Engine, responses: int) -> bool:
    """Whether the spill files come to hold `responses` responses of SIZE, within 10 s (the
    pool frees a copied part after delivery, and an invocation is retired just after `wait`)."""
    deadline = time.monotonic() + 10
    while not (responses - 0.01) * SIZE <= spill_memory(engine) < (responses + 0.1) * SIZE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_numpy_arrays_live_in_the_pages_their_worker_wrote_until_they_are_freed() -> None:
    """No copy in the caller: each array is made on its worker's spill file, each response past
    the last one's pages, and the memory is freed with the array (history=0: the engine keeps
    no finished invocation's results)."""
    pytest.importorskip("numpy")
    with Engine(workers=1, history=0) as engine:
        arrays = []
        for value in range(3):
            (result,) = engine.wait(engine.invoke([(targets.filled, (value, SIZE))]), timeout=60)
            arrays.append(result.response)
            del result
        assert spill_holds(engine, 3)
        for value in range(3):
            array = arrays.pop(0)
            assert array.shape == (SIZE // 8,) and (array == value).all()
            del array
            assert spill_holds(engine, len(arrays))
        (result,) = engine.wait(engine.invoke([(targets.large, ("bytes", SIZE))]), timeout=60)
        assert result.response == expected("bytes")
        assert spill_holds(engine, 0)  # a copied response is freed after delivery


def test_a_mapped_array_outlives_its_worker_and_the_engine() -> None:
    numpy = pytest.importorskip("numpy")
    with Engine(workers=1) as engine:
        (result,) = engine.wait(engine.invoke([(targets.large, ("numpy", SIZE))]), timeout=60)
        os.kill(result.pid, signal.SIGKILL)
        assert wait_gone([result.pid]) == set()
    array = result.response["array"]
    assert numpy.array_equal(array, expected("numpy")["array"])
    array += 1.0
    assert array[0, 0] == 1.0


# The fork is the point: a caller that forks (multiprocessing's default before Python 3.14)
# while it holds arrays; its child only touches the array and the pipes, then exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_an_array_lives_keeps_its_own_view_of_it() -> None:
    """Arrays are mapped from their worker's spill file, yet behave as memory of one's own
    across a fork: each side's writes stay its own, and the parent freeing its array does not
    take the pages from the child."""
    pytest.importorskip("numpy")
    with Engine(workers=1, history=0) as engine:
        (result,) = engine.wait(engine.invoke([(targets.filled, (7, SIZE))]), timeout=60)
        array = result.response
        del result
        to_parent, from_child = os.pipe()
        to_child, from_parent = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nothing but the array and the pipes, then _exit
            try:
                os.close(to_parent)
                os.close(from_parent)
                array[0] = -1.0
                os.write(from_child, b"1")
                os.read(to_child, 1)  # the parent freed its array (or failed)
                same = array[0] == -1.0 and array[1:].min() == 7 == array[1:].max()
                os._exit(0 if same else 1)
            finally:
                os._exit(2)
        os.close(from_child)
        os.close(to_child)
        try:
            assert os.read(to_parent, 1) == b"1"
            assert array[0] == 7.0  # the child's write is its own
            array[1] = 0.0
            del array
            os.write(from_parent, b"1")
        finally:
            os.close(from_parent)
            os.close(to_parent)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_worker_killed_while_writing_a_large_response_fails_that_target_only() -> None:
    """The caller reads a large `bytes` response as its worker writes it, and gives up on a
    worker that stops writing: killed mid-write, the target fails as a crash, no truncated
    response is delivered, and the pool serves on."""
    size = 256 * 800_000  # 205 MB: some 100 ms of writing
    for _ in range(3):  # until a worker is caught mid-write
        with Engine(workers=2) as engine:
            engine.wait(engine.invoke([(targets.echo, 0)] * 2), timeout=60)
            cid = engine.invoke([(targets.large, ("bytes", size))])
            pid, spill = kill_once_writing(engine)
            try:
                assert not wait_gone({pid})
                written = os.fstat(spill).st_size
            finally:
                os.close(spill)
            (result,) = engine.wait(cid, timeout=60)
            caught = written < size  # else it had written it all: try again
            if caught:
                assert not result.ok and isinstance(result.exception, WorkerCrashedError)
                assert result.response is None
                (after,) = engine.wait(engine.invoke([(targets.large, ("bytes", SIZE))]),
                                       timeout=60)
                assert after.response == expected("bytes")
            pids = set(engine.stats().worker_pids)
        assert not wait_gone(pids)
        if caught:
            return
    raise AssertionError("the write was never caught in the middle")


def kill_once_writing(engine: Engine) -> tuple[int, int]:
    """SIGKILL the worker whose spill file has begun to grow; its pid, and a descriptor of its
    spill file (to close)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in engine._pool._workers:
            if os.fstat(worker.process.spill).st_size:
                spill = os.dup(worker.process.spill)
                os.kill(worker.pid, signal.SIGKILL)
                return worker.pid, spill
    raise AssertionError("no worker began to write its response")


def test_ctrl_c_while_a_large_response_is_read_leaves_the_engine_serving() -> None:
    """An interrupt that lands while the waiting thread reads a large response as it is written
    is raised, and loses nothing: the response is read whole once its worker announces it."""
    size = 256 * 800_000  # 205 MB: some 100 ms of writing
    with Engine(workers=2) as engine:
        engine.wait(engine.invoke([(targets.echo, 0)] * 2), timeout=60)
        workers = list(engine._pool._workers)

        def interrupt_once_writing() -> None:
            # Once 16 MB are written, the waiting thread has long received the announcement and
            # reads pages; an interrupt in its receiving of a message would break the engine
            # (the README's bookkeeping window), which is not what this test is about.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if any(os.fstat(w.process.spill).st_size >= 16 << 20 for w in workers):
                    os.kill(os.getpid(), signal.SIGINT)
                    return

        cid = engine.invoke([(targets.large, ("bytes", size))])
        interrupter = threading.Thread(target=interrupt_once_writing)
        interrupter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                engine.wait(cid, timeout=60)
                time.sleep(5)  # (the interrupt landed after the wait: raised here)
        finally:
            interrupter.join()
        (result,) = engine.wait(cid, timeout=60)
        assert result.ok and result.response == targets.large(("bytes", size))
        (after,) = engine.wait(engine.invoke([(targets.double, 2)]), timeout=60)
        assert after.response == 4
        pids = set(engine.stats().worker_pids)
    assert not wait_gone(pids)
