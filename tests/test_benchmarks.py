"""The benchmark suite still runs (at a tiny size): benchmarks that rot measure nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, script_env


def test_the_benchmark_suite_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--repeat", "1",
                           "--dispatch", "40", "--round-trips", "5", "--memory", "50",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=script_env())
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    assert len(figures) == 4 and all("engine" in contenders for contenders in figures.values())
    assert "x best peer" in done.stdout
