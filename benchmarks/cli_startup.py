"""Start-up time of ``medbridge --help`` / ``--version`` beside the bare interpreter and ``import torch``, measured
side by side (interleaved, median of N runs) so that machine load affects all alike. Goal: --help under 0.5 s
(it imports no torch, numpy or pandas).

    .venv/bin/python benchmarks/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "medbridge --version": [sys.executable, "-m", "medbridge", "--version"],
    "medbridge --help": [sys.executable, "-m", "medbridge", "--help"],
    "medbridge train --help": [sys.executable, "-m", "medbridge", "train", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':<28}{'median s':>10}{'x bare python':>15}")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"{name:<28}{m:>10.3f}{m / base:>15.1f}")
    help_s = statistics.median(times["medbridge --help"])
    print(f"\n--help {'meets' if help_s < 0.5 else 'MISSES'} the 0.5 s goal ({help_s:.3f} s; load average "
          f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
