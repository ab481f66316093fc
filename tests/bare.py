"""A target whose module imports nothing but `sys`: what its worker holds is the engine's doing."""

import sys


def engine_modules(_: object) -> list[str]:
    return sorted(name for name in sys.modules if name.partition(".")[0] == "engine")
