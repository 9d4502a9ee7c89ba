"""Faithfulness of medbridge serve's heat maps by deletion, on real NIH images (docs/serve.md).

For each test image of a run's split, its 3 (--labels-per-image) most probable labels: delete (fill with the image
mean) the square of 1/4 the short side where the label's heat map is hottest, and 3 (--random) random squares of the
same size; compare the label's probability drop. Per explained layer: mean drop hottest vs random, share of
(image, label) pairs where the hottest square lowers the score more, a paired bootstrap 95% CI of the mean difference
and a sign-test p-value.

    python benchmarks/serve_deletion.py runs/demo --images 60 --layers 0,2,4,6    # the run's own dataset and split
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import yaml


def sign_test_p(wins: int, n: int) -> float:
    """Two-sided exact binomial (p = 0.5) p-value."""
    k = max(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder (its split.json test images are used) or method folder inside it")
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--offset", type=int, default=0, help="skip this many test images (a fresh set)")
    ap.add_argument("--layers", default="0,2,4,6")
    ap.add_argument("--method-dir", help="method folder to explain (default: the run's MedBridge adapter)")
    ap.add_argument("--references", default="zero", help="comma-separated: zero (gradient x activation), mean "
                                                        "(gradient x (activation - the mean-filled image's))")
    ap.add_argument("--labels-per-image", type=int, default=3)
    ap.add_argument("--random", type=int, default=3, help="random squares per (image, label)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from medbridge.data import load_dataset, load_split
    from medbridge.data.images import read_image
    from medbridge.methods import load_method
    from medbridge.serve.explain import deletion_test, explained_layers

    run = Path(args.run)
    method = load_method(args.method_dir or run)
    data = (yaml.safe_load((run / "config.yaml").read_text()) or {})["data"]
    table = load_dataset(data.get("format", "auto"), data["path"])
    rows = load_split(run / "split.json", table).test[args.offset: args.offset + args.images]
    images = [read_image(p) for p in table.meta["path"].iloc[rows]]
    print(f"{method.name} from {args.method_dir or run}: {len(images)} test images of {data['path']}, "
          f"top-{args.labels_per_image} labels each, {args.random} random squares", flush=True)
    print("| layer, reference | mean drop hottest | mean drop random | hottest > random | diff 95% CI (bootstrap) "
          "| sign test p | s |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    settings = [(int(x), ref) for x in args.layers.split(",") for ref in args.references.split(",")]
    for layer, ref in settings:
        t0 = time.perf_counter()
        res = deletion_test(method, images, args.labels_per_image, n_random=args.random, layer=layer,
                            seed=args.seed, reference=ref)
        p = np.array([r["p"] for r in res])
        hot, rand = p - np.array([r["p_hot"] for r in res]), p - np.array([r["p_random"] for r in res])
        diff = hot - rand
        boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
        wins = int((diff > 0).sum())
        used = explained_layers(method, layer)
        print(f"| {layer} (used {used}), {ref} | {hot.mean():.4f} | {rand.mean():.4f} | {wins}/{len(diff)} "
              f"| {diff.mean():.4f} [{np.percentile(boot, 2.5):.4f}, {np.percentile(boot, 97.5):.4f}] "
              f"| {sign_test_p(wins, len(diff)):.2g} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
