"""Targets for the benchmarks; workers import this module by reference, so it stays light."""

from __future__ import annotations

import time
from typing import Any


def noop(x: Any) -> Any:
    return x


def sleep_50ms(_: Any) -> None:
    time.sleep(0.05)
