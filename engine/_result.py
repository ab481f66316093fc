"""Results as values: what one target produced, and the payloads built from it."""

from __future__ import annotations

import dataclasses
import time
import traceback as traceback_module
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, NamedTuple


def utc_timestamp(epoch: float) -> str:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, the payload's timestamp format.

    Called for every result, so the date and time of the last second seen are reused.
    """
    global _last_second
    second, cached = int(epoch), _last_second  # one read: other threads may replace it
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((epoch - second) * 1_000_000):06d}"


_last_second = (-1, "")


class Outcome(NamedTuple):
    """What the target pool reports for one target: the raw facts, before any bookkeeping."""

    ok: bool
    value: Any  #: the response if ok, else the exception
    traceback: str | None  #: the formatted traceback if not ok
    started: float | None  #: epoch seconds when the worker began the target (None: never began)
    finished: float  #: epoch seconds when the response or failure was produced
    pid: int | None  #: the worker that ran it

    @classmethod
    def failure(cls, exc: BaseException, *, started: float | None = None,
                finished: float | None = None, pid: int | None = None) -> Outcome:
        """A failure the engine itself diagnosed (crash, timeout, cancellation, pickling)."""
        text = "".join(traceback_module.format_exception_only(type(exc), exc))
        return cls(False, exc, text, started, time.time() if finished is None else finished, pid)


class Result(NamedTuple):
    """The one result of one target of an invocation: an immutable value (a named tuple).

    `exception` is the real exception object: a target's own exception (re-raising it shows the
    worker's frames), or an `engine.TargetError` saying why there is no response.
    """

    cid: str
    target: str  #: the target's name: registered name, ``module:function`` path or qualname
    index: int  # type: ignore[assignment]  # (shadows tuple.index) the position in the input
    ok: bool
    response: Any  #: what the target returned; None if it failed
    exception: BaseException | None
    traceback: str | None  #: the traceback text when not ok (the worker's frames for a raise)
    req_ts: float  #: epoch seconds when the invocation was issued
    resp_ts: float  #: epoch seconds when the response (or failure) was produced
    started: float | None  #: epoch seconds when a worker began the target; None if it never did
    pid: int | None  #: the worker process that ran the target
    attempts: int = 1  #: how many times it ran: more than 1 only with retries

    @property
    def duration(self) -> float | None:
        """Seconds the target ran in its worker; None if it never started."""
        return None if self.started is None else self.resp_ts - self.started

    @property
    def req_ts_utc(self) -> str:
        return utc_timestamp(self.req_ts)

    @property
    def resp_ts_utc(self) -> str:
        return utc_timestamp(self.resp_ts)

    def result(self) -> Any:
        """The response, or raise the exception: `concurrent.futures.Future.result` style."""
        if self.exception is not None:
            raise self.exception
        return self.response

    def payload(self, source: str, with_attempts: bool = False) -> dict[str, Any]:
        """The on-target callback payload of DESIGN.md section 4 (plus `attempts` if asked)."""
        payload = {
            "source": source,
            "target": self.target,
            "response": self.response,
            "req_ts_utc": self.req_ts_utc,
            "resp_ts_utc": self.resp_ts_utc,
            "ok": self.ok,
            "exception": None if self.ok else self.traceback,
            "cid": self.cid,
            "phase": "on-target",
            "index": self.index,
        }
        if with_attempts:
            payload["attempts"] = self.attempts
        return payload


#: A Result's fields in an exact tuple. The engine keeps results as records (or `Responses`,
#: columns of many) and makes Results only when they are asked for: the garbage collector stops
#: tracking an exact tuple of plain values, but never a named tuple, and a million kept Results
#: would make each of its full collections walk a million objects.
Record = tuple[Any, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Responses:
    """A run of one batch's targets that all returned, kept as the columns the pool read: no
    object per target until a Result is asked for. Iterating gives its records."""

    cid: str
    targets: Sequence[str]
    indices: Sequence[int]
    values: Sequence[Any]
    req_ts: float
    finished: Sequence[float]
    started: Sequence[float]
    pid: int | None
    attempts: int

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Record]:
        return zip(repeat(self.cid), self.targets, self.indices, repeat(True), self.values,
                   repeat(None), repeat(None), repeat(self.req_ts), self.finished, self.started,
                   repeat(self.pid), repeat(self.attempts))


Records = Responses | Sequence[Record]  #: what the pool delivers at once


def record(invocation: Any, index: int, target: str, outcome: Outcome, attempts: int = 1) -> Record:
    """The record of target `index` of `invocation` (its `cid` and `req_ts` are read)."""
    ok, value, traceback, started, finished, pid = outcome
    return (invocation.cid, target, index, ok, value if ok else None, None if ok else value,
            traceback, invocation.req_ts, finished, started, pid, attempts)


def as_results(records: Iterable[Record]) -> list[Result]:
    """Records made Results, in C: no Python code runs per record."""
    return list(map(tuple.__new__, repeat(Result), records))


Result.__module__ = "engine"  # reprs and pickles say engine.Result
