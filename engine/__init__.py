"""engine: run targets in parallel worker processes, with callbacks per target and fan-in.

>>> from engine import Engine
>>> with Engine(workers=2) as eng:
...     cid = eng.invoke({"package.module:function": {"hello": "world"}}, callbacks=[print])
...     results = eng.wait(cid)
"""

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

# Each name is imported on first use: a worker process imports this package too (for
# engine._worker), and starts faster without the rest. Each module marks its public objects as
# engine's (`__module__`), so reprs and pickles say engine.X however they were imported.
_HOMES = {
    "_engine": ("Engine", "EngineState", "EngineStats"),
    "_result": ("Result",),
    "_context": ("CallContext", "Channel", "current_context"),
    "_exceptions": ("DuplicateCidError", "EngineBrokenError", "EngineClosedError", "EngineError",
                    "InvocationError", "MemoryLimitError", "RemoteError", "SerializationError",
                    "TargetCancelledError", "TargetError", "TargetTimeoutError",
                    "UnknownNameError", "WorkerCrashedError", "WorkerStartError"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._context import CallContext as CallContext
    from ._context import Channel as Channel
    from ._context import current_context as current_context
    from ._engine import Engine as Engine
    from ._engine import EngineState as EngineState
    from ._engine import EngineStats as EngineStats
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
else:
    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))

    def __getattr__(name: str) -> object:
        if name not in _HOME:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
del TYPE_CHECKING

__version__ = "0.1.0"
