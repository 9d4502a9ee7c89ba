"""The paper-scale dry run (``benchmarks/scale_dry_run.py``) at two sizes: memory per row of every stage may not
grow from N = 2,000 to N = 20,000 MIMIC-layout rows (times belong to the benchmark, not to a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import REPO

#: a stage's peak RSS rise over the RSS before loading, per table row, at N = 20k may be at most this factor of
#: the same at N = 2k (linear stages stay near 1; fixed-work stages fall, as their cost is spread over more rows)
FACTOR = 1.5
SMALL, LARGE = 2_000, 20_000


@pytest.mark.slow
def test_memory_per_row_of_every_stage_does_not_grow_from_2k_to_20k_rows(tmp_path, nih_sample):
    out = tmp_path / "dry.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_dry_run.py"), "--n", str(SMALL), str(LARGE),
                    "--root", str(tmp_path / "mimic"), "--nih", str(nih_sample), "--subset", "64", "--steps", "2",
                    "--predict", "16", "--json", str(out)], check=True, env=env, capture_output=True)
    small, large = json.loads(out.read_text())
    assert (small["n"], large["n"]) == (SMALL, LARGE)  # every generated row loads (labels, splits, paths)
    assert not Path(tmp_path / "mimic").exists() or not any((tmp_path / "mimic").iterdir())  # deleted after
    for stage, s in small["stages"].items():
        per_row_small = max(s["rise_mib"], 1.0) / SMALL  # at least 1 MiB: the sampler's resolution
        per_row_large = large["stages"][stage]["rise_mib"] / LARGE
        assert per_row_large <= FACTOR * per_row_small, (
            f"{stage}: {per_row_large * 2**20:.0f} bytes/row at N={LARGE} vs {per_row_small * 2**20:.0f} at "
            f"N={SMALL}")
