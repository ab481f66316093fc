"""Turning what the caller names (a registered name, ``module:function``, a callable) into code."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

from ._exceptions import UnknownNameError


def name_of(fn: Callable[..., Any]) -> str:
    """A readable name for a callable given directly: ``module:qualname``."""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}:{qualname}"


class Registry:
    """Named services, as the original platform calls targets and callbacks by name."""

    def __init__(self) -> None:
        self._services: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a service name must be a non-empty str, not {name!r}")
        if not callable(fn):
            raise TypeError(f"service {name!r} must be callable, not {type(fn).__name__}")
        if self._services.get(name, fn) is not fn:
            raise ValueError(f"a different service is already registered as {name!r}")
        self._services[name] = fn

    def resolve(self, ref: object, kind: str) -> tuple[str, Callable[..., Any]]:
        """``(name, callable)`` for `ref`; `kind` ("target", "callback") words the errors."""
        if isinstance(ref, str):
            fn = self._services.get(ref)
            if fn is not None:
                return ref, fn
            if ":" in ref:
                return ref, _import(ref, kind)
            close = difflib.get_close_matches(ref, self._services, n=3)
            raise UnknownNameError(kind, ref, close, "not registered; an import path is "
                                                     "written 'package.module:function'")
        if callable(ref):
            return name_of(ref), ref
        raise TypeError(f"a {kind} must be a callable, a registered name or a "
                        f"'package.module:function' path, not {type(ref).__name__}: {ref!r}")


def _import(path: str, kind: str) -> Callable[..., Any]:
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UnknownNameError(kind, path, (), f"cannot import {module_name!r}: "
                                               f"{type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = [f"{module_name}:{n}" for n in difflib.get_close_matches(part, names, n=3)]
            raise UnknownNameError(kind, path, close, f"{module_name!r} has no {part!r}") from None
    if not callable(obj):
        raise TypeError(f"{kind} {path!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]
