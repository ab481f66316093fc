"""Reading a copied part of a large response out of a spill file (`engine._spill.Copy`), whole
or while it is written."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from engine import _spill

LARGE = 5 * 2**20 + 3 * 4096 + 5  #: not a whole number of pages
PATTERN = bytes(range(256)) * 97  #: a length prime to the page size: a misplaced byte shows


def contents(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


@pytest.fixture
def spill() -> Iterator[int]:
    fd = os.memfd_create("test-spill")
    yield fd
    os.close(fd)


@pytest.fixture(params=["ctypes", "plain"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways to read: into a blank object made through the C API, and `os.pread`."""
    if request.param == "plain":
        monkeypatch.setattr(_spill, "_c_api", ())
    return str(request.param)


@pytest.mark.parametrize("size", [300_000, LARGE])
def test_a_part_reads_whole_from_its_offset(spill: int, way: str, size: int) -> None:
    want = contents(size)
    offset = 5 << 20
    os.pwrite(spill, b"before" * 1000, 0)
    os.pwrite(spill, want + b"after", offset)
    copy = _spill.Copy(spill, offset, size)
    copy.follow()
    data = copy.finish()
    assert type(data) is bytes and len(data) == size
    assert data == want
    assert hash(data) == hash(want) and data.decode("latin-1").encode("latin-1") == want


@pytest.mark.parametrize("size", [300_000, LARGE])
def test_a_file_shorter_than_announced_is_an_error(spill: int, way: str, size: int) -> None:
    os.pwrite(spill, contents(size - 10), 0)
    copy = _spill.Copy(spill, 0, size)
    copy.follow()
    with pytest.raises(EOFError, match="shorter than announced"):
        copy.finish()


def test_a_part_is_read_as_it_is_written_until_the_writer_pauses(spill: int) -> None:
    """`follow` takes each piece as it lands, and gives up (rather than wait on a worker that
    may have stopped) once nothing more came for its patience; `finish` reads the rest."""
    want, offset = contents(LARGE), 1 << 20
    os.pwrite(spill, b"older response", 0)
    pieces = [want[k:k + 2**20] for k in range(0, LARGE, 2**20)]
    written = threading.Event()

    def write_all_but_the_last() -> None:
        for k, piece in enumerate(pieces[:-1]):
            os.pwrite(spill, piece, offset + k * 2**20)
            time.sleep(0.0005)  # well within the patience
        written.set()

    copy = _spill.Copy(spill, offset, LARGE)
    writer = threading.Thread(target=write_all_but_the_last)
    writer.start()
    started = time.monotonic()
    copy.follow(patience=0.1)
    gave_up_after = time.monotonic() - started
    writer.join()
    assert written.is_set() and copy.done == LARGE - len(pieces[-1]), "not all that was written"
    assert gave_up_after < 10
    os.pwrite(spill, pieces[-1], offset + LARGE - len(pieces[-1]))
    assert copy.finish() == want
