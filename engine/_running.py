"""What the code running in this thread serves: the context variable behind `current_context`,
and a worker's cursor over its batch. Workers import this, not `engine._context`, whose
dataclass machinery would lengthen every worker's start."""

from __future__ import annotations

import contextvars

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from ._context import CallContext


class BatchCursor:
    """The context of the targets of a worker's batch: set once for the batch, then moved to
    each target in turn (a context variable's set and reset for each target cost a quarter of
    what a worker spends on a quick one)."""

    __slots__ = ("prefix", "names", "indices", "first_id", "task_id")

    def __init__(self, prefix: tuple[str, str, str], names: list[str], indices: Sequence[int],
                 first_id: int) -> None:
        self.prefix, self.names, self.indices = prefix, names, indices
        self.first_id = self.task_id = first_id  #: task_id: the target running now

    @property
    def target(self) -> str:
        return self.names[self.task_id - self.first_id]

    def context(self) -> tuple[Any, ...]:
        return (*self.prefix, self.target, self.indices[self.task_id - self.first_id])


# A plain tuple (a callback's) or a worker's cursor, made a CallContext only when asked for.
current: contextvars.ContextVar[CallContext | tuple[Any, ...] | BatchCursor | None] = \
    contextvars.ContextVar("engine_call_context", default=None)
