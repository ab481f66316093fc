"""Which channel invoked the code that is running now, and for which invocation.

Targets (in a worker process) and callbacks (on the callback pool) can call `current_context()`
to learn their channel and CID, as a service of the original platform reads ``self.channel``.
"""

from __future__ import annotations

import dataclasses
import enum

from ._running import BatchCursor, current


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


def current_context() -> CallContext | None:
    """The context of the target or callback running in this thread, or None outside one."""
    context = current.get()
    if isinstance(context, BatchCursor):
        context = context.context()
    if isinstance(context, tuple):
        channel, *rest = context
        return CallContext(Channel(channel), *rest)
    return context


for _public in (Channel, CallContext, current_context):  # reprs and pickles say engine.X
    _public.__module__ = "engine"
