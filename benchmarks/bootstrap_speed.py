"""Speed of the vectorised patient bootstrap (engine/stats.py) against recomputing every materialised resample.

    python benchmarks/bootstrap_speed.py [--images 1000] [--labels 14] [--patients 600] [--n-boot 1000]

A random table (scores, ~10% positives per label, images spread over patients) is bootstrapped two ways with the
same draws: ``bootstrap_metrics`` (all resamples at once as weighted counts) and the brute force a notebook would
write (build each resample's image list, call ``evaluate_scores``), timed on a subset of resamples and scaled.
Prints both times and the ratio; the two agree to 1e-12 (tests/test_stats.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from medbridge.engine.metrics import evaluate_scores, pick_thresholds
from medbridge.engine.stats import bootstrap_metrics, draw_patients, patient_inverse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--labels", type=int, default=14)
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--brute", type=int, default=50, help="resamples timed for the brute force (then scaled)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    labels = [f"c{j}" for j in range(args.labels)]
    targets = (rng.random((args.images, args.labels)) < 0.1).astype(float)
    scores = rng.random((args.images, args.labels)) + 0.3 * targets
    patients = rng.integers(0, args.patients, args.images).astype(str)
    thresholds = pick_thresholds(scores, targets, labels)

    t0 = time.perf_counter()
    bootstrap_metrics(scores, targets, labels, patients, thresholds, n_boot=args.n_boot, seed=0)
    fast = time.perf_counter() - t0

    inverse, n_patients = patient_inverse(patients)
    counts = draw_patients(n_patients, args.brute, seed=0)[:, inverse]
    t0 = time.perf_counter()
    full = evaluate_scores(scores, targets, labels)["per_class"]
    oracle = {lab: r["threshold_oracle"] for lab, r in full.items()}  # held fixed across resamples
    for b in range(args.brute):
        idx = np.repeat(np.arange(args.images), counts[b])
        evaluate_scores(scores[idx], targets[idx], labels, thresholds)
        evaluate_scores(scores[idx], targets[idx], labels, oracle)
    brute = (time.perf_counter() - t0) / args.brute * args.n_boot

    print(f"{args.n_boot} patient-bootstrap resamples of {args.images} images x {args.labels} labels "
          f"({args.patients} patients), AUROC + F1/ACC at validation and oracle thresholds:")
    print(f"  vectorised (bootstrap_metrics): {fast:8.2f} s")
    print(f"  brute force (evaluate_scores per resample, {args.brute} timed, scaled): {brute:8.2f} s")
    print(f"  ratio brute / vectorised: {brute / fast:.1f}x")


if __name__ == "__main__":
    main()
