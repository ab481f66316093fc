"""Reading a copied part of a large response out of a spill file (`engine._spill.read`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import _spill

HUGE = _spill.HUGE_READ_BYTES + 3 * 4096 + 5  #: read into huge pages; not a whole number of them
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


@pytest.mark.parametrize("size", [300_000, HUGE])
def test_a_part_reads_whole_from_its_offset(spill: int, way: str, size: int) -> None:
    want = contents(size)
    offset = 5 << 20
    os.pwrite(spill, b"before" * 1000, 0)
    os.pwrite(spill, want + b"after", offset)
    data = _spill.read(spill, size, offset)
    assert type(data) is bytes and len(data) == size
    assert data == want
    assert hash(data) == hash(want) and data.decode("latin-1").encode("latin-1") == want


@pytest.mark.parametrize("size", [300_000, HUGE])
def test_a_file_shorter_than_announced_is_an_error(spill: int, way: str, size: int) -> None:
    os.pwrite(spill, contents(size - 10), 0)
    with pytest.raises(EOFError, match="shorter than announced"):
        _spill.read(spill, size, 0)


def _transparent_huge_pages() -> str:
    try:
        modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return modes.split("[")[1].split("]")[0]


@pytest.mark.skipif(_transparent_huge_pages() != "madvise",
                    reason="huge pages are given on advice only where the system's mode is madvise")
def test_a_large_part_lands_on_huge_pages(spill: int) -> None:
    os.pwrite(spill, contents(HUGE), 0)
    data = _spill.read(spill, HUGE, 0)
    assert huge_kb_under(id(data) + HUGE // 2) >= 2048, "no huge page under the object's memory"


def huge_kb_under(address: int) -> int:
    """The kB of huge pages in the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("the address is in no mapping")
