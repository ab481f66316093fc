"""engine: run targets in parallel worker processes, with callbacks per target and fan-in.

>>> from engine import Engine
>>> with Engine(workers=2) as eng:
...     cid = eng.invoke({"package.module:function": {"hello": "world"}}, callbacks=[print])
...     results = eng.wait(cid)
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._context import CallContext as CallContext
from ._context import Channel as Channel
from ._context import current_context as current_context
from ._exceptions import DuplicateCidError as DuplicateCidError
from ._exceptions import EngineBrokenError as EngineBrokenError
from ._exceptions import EngineClosedError as EngineClosedError
from ._exceptions import EngineError as EngineError
from ._exceptions import InvocationError as InvocationError
from ._exceptions import MemoryLimitError as MemoryLimitError
from ._exceptions import RemoteError as RemoteError
from ._exceptions import SerializationError as SerializationError
from ._exceptions import TargetCancelledError as TargetCancelledError
from ._exceptions import TargetError as TargetError
from ._exceptions import TargetTimeoutError as TargetTimeoutError
from ._exceptions import UnknownNameError as UnknownNameError
from ._exceptions import WorkerCrashedError as WorkerCrashedError
from ._exceptions import WorkerStartError as WorkerStartError
from ._result import Result as Result

__all__ = [
    "CallContext",
    "Channel",
    "DuplicateCidError",
    "Engine",
    "EngineBrokenError",
    "EngineClosedError",
    "EngineError",
    "EngineState",
    "EngineStats",
    "InvocationError",
    "MemoryLimitError",
    "RemoteError",
    "Result",
    "SerializationError",
    "TargetCancelledError",
    "TargetError",
    "TargetTimeoutError",
    "UnknownNameError",
    "WorkerCrashedError",
    "WorkerStartError",
    "current_context",
]

# The engine itself is imported on first use: a worker process imports this package too (for
# engine._worker), and starts faster without it.
_LAZY = {"Engine", "EngineState", "EngineStats"}
if _TYPE_CHECKING:
    from ._engine import Engine as Engine
    from ._engine import EngineState as EngineState
    from ._engine import EngineStats as EngineStats
else:
    def __dir__() -> list[str]:
        return sorted(set(globals()) | _LAZY)

    def __getattr__(name: str) -> _Any:
        if name not in _LAZY:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from . import _engine

        for lazy in _LAZY:
            value = getattr(_engine, lazy)
            value.__module__ = __name__
            globals()[lazy] = value
        return globals()[name]

for _name in set(__all__) - _LAZY:  # errors and reprs say engine.X, not engine._module.X
    globals()[_name].__module__ = __name__
del _name

__version__ = "0.1.0"
