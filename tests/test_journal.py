"""The journal's entries are pickles cut to their items and concatenated: they must read back
as written, for every kind of value a worker puts there."""

from __future__ import annotations

import pickle

from engine._journal import Journal, entries

VALUES = [None, True, False, 0, -1, 255, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, -(2**70), 1.5,
          -0.0, 1e-310, float("-inf"), float("inf"), 2 - 3j, "", "é" * 300, "日本", "\udc80 lone",
          "x" * 70_000, b"", b"\x00" * 300, pickle.dumps({"any": ["thing"]})]


def test_entries_read_back_as_written() -> None:
    journal = Journal.create(1 << 20)
    try:
        written = [(task_id, value, task_id % 4, 1e9 + task_id / 7, 2e9 + task_id)
                   for task_id, value in enumerate(VALUES * 3, start=2**40 - 30)]
        for task_id, value, status, started, finished in written:
            assert journal.append(task_id, status, started, finished, value)
        pending = journal.pending()
        assert pending is not None
        read = list(entries(bytes(pending)))
        assert read == written
        assert [type(entry[1]) for entry in read] == [type(entry[1]) for entry in written]
        pending.release()
        assert list(entries(journal.committed())) == written  # what a dead worker leaves
        journal.clear()
        assert journal.pending() is None and list(entries(journal.committed())) == []
    finally:
        journal.close()


def test_a_full_journal_refuses_an_entry_and_keeps_the_others() -> None:
    journal = Journal.create(4096)
    try:
        count = 0
        while journal.append(count, 1, 0.0, 0.0, "y" * 100):
            count += 1
        assert 0 < count < 4096 // 100
        assert [entry[0] for entry in entries(journal.committed())] == list(range(count))
        assert all(entry[1] == "y" * 100 for entry in entries(journal.committed()))
    finally:
        journal.close()
