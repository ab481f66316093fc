"""Which channel invoked the code that is running now, and for which invocation.

Targets (in a worker process) and callbacks (on the callback pool) can call `current_context()`
to learn their channel and CID, as a service of the original platform reads ``self.channel``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from typing import Any


class Channel(enum.StrEnum):
    """The channel names of the parallel-execution pattern (DESIGN.md section 4)."""

    PARALLEL_EXEC_CALL = "parallel-exec-call"  #: a target started by `Engine.invoke`
    FANOUT_CALL = "fanout-call"  #: a target started by `Engine.fanout`
    PARALLEL_EXEC_ON_TARGET = "parallel-exec-on-target"  #: a callback of `invoke`
    FANOUT_ON_TARGET = "fanout-on-target"  #: an on-target callback of `fanout`
    FANOUT_ON_FINAL = "fanout-on-final"  #: an on-final (fan-in) callback of `fanout`


@dataclasses.dataclass(frozen=True, slots=True)
class CallContext:
    """What a target or callback may ask about the call it serves."""

    channel: Channel
    cid: str
    source: str
    target: str | None  #: None in an on-final callback, which serves every target
    index: int | None


class BatchCursor:
    """The context of the targets of a worker's batch: set once for the batch, then moved to
    each target in turn (a context variable's set and reset for each target cost a quarter of
    what a worker spends on a quick one)."""

    __slots__ = ("prefix", "names", "indices", "first_id", "task_id")

    def __init__(self, prefix: tuple[str, str, str], names: list[str], indices: Any,
                 first_id: int) -> None:
        self.prefix, self.names, self.indices = prefix, names, indices
        self.first_id = self.task_id = first_id  #: task_id: the target running now

    @property
    def target(self) -> str:
        return self.names[self.task_id - self.first_id]

    def context(self) -> tuple[Any, ...]:
        return (*self.prefix, self.target, self.indices[self.task_id - self.first_id])


# A plain tuple (a callback's) or a worker's cursor, made a CallContext only when asked for.
_current: contextvars.ContextVar[CallContext | tuple[Any, ...] | BatchCursor | None] = \
    contextvars.ContextVar("engine_call_context", default=None)


def current_context() -> CallContext | None:
    """The context of the target or callback running in this thread, or None outside one."""
    context = _current.get()
    if isinstance(context, BatchCursor):
        context = context.context()
    if isinstance(context, tuple):
        channel, *rest = context
        return CallContext(Channel(channel), *rest)
    return context
