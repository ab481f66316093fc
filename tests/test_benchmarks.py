"""The benchmark suite still runs (at a tiny size): benchmarks that rot measure nothing.

No speed is asserted: only that every workload ran for the engine and the peers and that the
reports were written. The peers are the ones CI has (the standard library's and loky), plus
pebble, which exercises the skipping of a peer that is not installed where the `bench` extra is
missing; mpire and dask distributed start too slowly for a smoke test and are left to the full
run (benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, script_env

WORKLOADS = {"dispatch", "round-trip", "slow-callbacks", "crash", "timeout", "cpu", "payload",
             "startup", "memory"}
PEERS = {"mp.Pool": "multiprocessing.Pool", "PPE": "ProcessPoolExecutor", "loky": "loky",
         "pebble": "pebble"}
FAILED = {"error", "timed out"}  #: what a measurement that could not be made records


def test_every_workload_runs_at_a_tiny_size_for_the_engine_and_its_peers(tmp_path: Path) -> None:
    out, png = tmp_path / "figures.json", tmp_path / "ratios.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny",
                           "--repeat", "1", "--peers", ",".join(PEERS), "--json", str(out),
                           "--plot", str(png)],
                          capture_output=True, text=True, timeout=110, env=script_env())
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == WORKLOADS

    for name, workload in report["workloads"].items():
        engines = {label: figures for label, figures in workload["raw"].items()
                   if label.startswith("engine")}
        assert engines, name
        for label, figures in engines.items():
            failed = {k: v for k, v in figures.items() if FAILED & set(map(str, v))}
            assert not failed, (name, label, failed, workload["notes"])

    installed = {key: label for key, label in PEERS.items()
                 if importlib.util.find_spec("pebble") or key != "pebble"}
    measured = set(report["workloads"]["round-trip"]["raw"])
    assert measured == {"engine", *installed.values()}
    if "pebble" not in installed:
        assert "pebble: not installed, skipped" in done.stdout

    assert "x best peer" in done.stdout and "| engine / best peer |" in done.stdout
    if importlib.util.find_spec("matplotlib"):
        assert png.stat().st_size > 0
    else:
        assert "matplotlib is not installed" in done.stdout


def test_the_cpu_split_runs_at_a_tiny_size() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_split.py"),
                           "--rounds", "1", "--dispatch", "200"],
                          capture_output=True, text=True, timeout=60, env=script_env())
    assert done.returncode == 0, done.stderr
    rows = {line.split("  ")[0]: line.split()[-5:] for line in done.stdout.splitlines()[2:]}
    assert set(rows) >= {"engine, invoke + wait", "engine.map", "loky.map(chunksize=100)"}
    assert all(float(value) >= 0 for values in rows.values() for value in values)
