"""Dry run at paper scale on CPU: a MIMIC-CXR-JPG-layout folder of N images (the official CSVs with N rows; the
JPEGs hard links to the real NIH sample images under ``files/pXX/pYYYYYYYY/sZZZZZZZZ/``) through the real pipeline,
with wall time and peak RSS per stage.

    PYTHONPATH=src python benchmarks/scale_dry_run.py --n 10000 50000 227000 [--root /tmp/mimic-dry]
        [--nih ../shared/data/nih-cxr14-sample] [--json out.json] [--keep]

Stages (each N in its own process, so peaks do not carry over): ``load`` (the MIMIC loader on the CSVs: ids,
labels, joins, path checks), ``split`` (the official split, patient-disjoint, plus a seeded patient split),
``plan`` (cache modes sized and chosen: the images' key from every file's size and mtime), ``cache`` (the
cache of a fixed subset of ``--subset`` training rows built with a tiny backbone), ``train`` (``--steps`` steps of
the shared loop from that cache), ``predict`` (``--predict`` test images through ``predict_images``). Per stage:
seconds, peak RSS and the peak's rise over the RSS before ``load`` (MiB; DataLoader workers not included).
Building the folder is not part of the table. The folder and the cache are deleted at the end (``--keep``:
kept). Growth: load/split/plan should be linear in N, cache/train/predict flat (fixed work)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
            "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
            "Pneumothorax", "Support Devices"]
STAGES = ("load", "split", "plan", "cache", "train", "predict")


def build_folder(root: Path, n: int, nih: Path, seed: int = 0) -> None:
    """``n`` images in MIMIC-CXR-JPG v2 layout: 2 images per study, 3 studies per patient (6 images per patient
    on average, like the real ~227k studies of ~65k patients), hard links (else symlinks) to the NIH JPEGs."""
    rng = np.random.default_rng(seed)
    sources = sorted((nih / "images").glob("*.jpg"))
    img = np.arange(n)
    study = img // 2
    patient = study // 3
    subject_ids = 10000000 + patient
    study_ids = 50000000 + study
    dicom = [f"{i:08x}-{(i * 2654435761) % 2**32:08x}-dry" for i in img]
    views = np.array(["PA", "AP", "LATERAL", "LL", "AP AXIAL"])[rng.choice(5, n, p=[.4, .35, .2, .04, .01])]
    part = np.array(["train", "validate", "test"])[rng.choice(3, patient[-1] + 1, p=[.96, .01, .03])][patient]
    root.mkdir(parents=True, exist_ok=True)

    def write(name: str, header: list[str], rows) -> None:
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", compresslevel=1) as f:
            f.write(",".join(header) + "\n")
            f.writelines(",".join(map(str, r)) + "\n" for r in rows)

    write("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns", "StudyDate",
                       "StudyTime"],
          ((d, s, t, v, 1024, 1024, 21800101 + int(t) % 28, "120000.000")
           for d, s, t, v in zip(dicom, subject_ids, study_ids, views)))
    write("split", ["dicom_id", "study_id", "subject_id", "split"], zip(dicom, study_ids, subject_ids, part))
    n_studies = study[-1] + 1
    values = rng.choice(np.array(["1.0", "0.0", "-1.0", ""]), (n_studies, len(CHEXPERT)), p=[.1, .2, .05, .65])
    write("chexpert", ["subject_id", "study_id", *CHEXPERT],
          ([10000000 + s // 3, 50000000 + s, *values[s]] for s in range(n_studies)))
    link = os.link
    for i in range(n):
        d = root / "files" / f"p{str(subject_ids[i])[:2]}" / f"p{subject_ids[i]}" / f"s{study_ids[i]}"
        if i % 2 == 0:
            d.mkdir(parents=True, exist_ok=True)
        target, src = d / f"{dicom[i]}.jpg", sources[i % len(sources)]
        try:
            link(src, target)
        except OSError:  # another file system: symbolic links instead
            link = os.symlink
            link(src, target)


class PeakRSS:
    """Samples this process's RSS every millisecond in a thread; ``stage()`` returns the peak since the last."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def reset(self) -> int:
        self.peak = now = self.now()
        return now


def run_stages(root: Path, *, subset: int, steps: int, predict: int, seed: int = 0) -> dict:
    """The pipeline's stages on the folder at ``root``; per stage seconds and peak RSS (bytes)."""
    import torch

    from medbridge.backbones.registry import tiny_builders
    from medbridge.data import load_dataset, make_split
    from medbridge.data.splits import patient_split
    from medbridge.engine.config import TrainConfig
    from medbridge.engine.evaluate import predict_images
    from medbridge.engine.features import build_cache, cache_plans, choose_plan, fixed_view_count, free_bytes
    from medbridge.engine.trainer import fit_method
    from medbridge.methods import TrainingData, create_method

    torch.manual_seed(seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tiny = tiny_builders()["tiny-hf-clip"]()
    method = create_method("medbridge", {"num_queries": 2, "t1": 1}, backbones=[tiny], labels=CHEXPERT,
                           focal={"region_size": 512, "stride": 512, "num_crops": 0})
    sampler = PeakRSS()
    base = sampler.reset()
    out: dict = {"rss_before_mib": base / 2**20, "stages": {}}
    state: dict = {}

    def stage(name: str, fn) -> None:
        start = sampler.reset()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        time.sleep(0.005)
        out["stages"][name] = {"s": dt, "peak_mib": sampler.peak / 2**20, "rise_mib": (sampler.peak - base) / 2**20,
                               "stage_rise_mib": (sampler.peak - start) / 2**20}

    def load() -> None:
        state["table"] = load_dataset("mimic-cxr", root)

    def split() -> None:
        state["split"] = make_split(state["table"])
        patient_split(state["table"], (0.7, 0.1, 0.2), seed)

    def plan() -> None:
        t = state["table"]
        state["spec"] = method.cache_spec(fixed_view_count(t, method.focal))
        plans = cache_plans(state["spec"], t, root / "cache", np.arange(len(t)))
        state["mode"] = choose_plan(plans, "auto", None, free_bytes(root)).mode

    rows = {}

    def cache() -> None:
        sp = state["split"]
        rng = np.random.default_rng(seed)
        rows["fit"] = np.sort(rng.choice(sp.train, subset, replace=False))
        state["cache"] = build_cache(state["spec"], state["table"], rows["fit"], root=root / "cache", batch_size=16,
                                     workers=1, progress=False, mode="auto")

    def train() -> None:
        t, n_val = state["table"], max(16, subset // 8)
        data = TrainingData(state["cache"], t.targets, rows["fit"][:-n_val][:steps * 16], rows["fit"][-n_val:])
        fit_method(method, data, TrainConfig(epochs=1, batch_size=16, workers=0, seed=seed), root / "run",
                   progress_bar=False)

    def predict_stage() -> None:
        t = state["table"]
        paths = t.meta["path"].to_numpy()[state["split"].test[:predict]].tolist()
        assert len(predict_images(method, paths, batch_size=16, device="cpu", workers=1)) == len(paths)

    for name, fn in zip(STAGES, (load, split, plan, cache, train, predict_stage)):
        stage(name, fn)
    sampler._stop = True
    out.update({"n": len(state["table"]), "cache_mode": state["mode"],
                "peak_mib": max(s["peak_mib"] for s in out["stages"].values())})
    return out


def one(args: argparse.Namespace, n: int) -> dict:
    root = Path(args.root) / f"n{n}"
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    build_folder(root, n, Path(args.nih))
    built = time.perf_counter() - t0
    try:
        cmd = [sys.executable, __file__, "--stages-only", str(root), "--subset", str(args.subset), "--steps",
               str(args.steps), "--predict", str(args.predict)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"N={n}: the stages failed:\n{done.stderr[-3000:]}")
        res = json.loads(done.stdout.splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res["build_s"] = built
    return res


def table(results: list[dict]) -> str:
    head = "| N | " + " | ".join(f"{s} s / MiB" for s in STAGES) + " | peak RSS MiB |"
    lines = [head, "|" + "---|" * (len(STAGES) + 2)]
    for r in results:
        cells = [f"{r['stages'][s]['s']:.1f} / {r['stages'][s]['stage_rise_mib']:.0f}" for s in STAGES]
        lines.append(f"| {r['n']:,} | " + " | ".join(cells) + f" | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10000, 50000, 227000])
    ap.add_argument("--root", default="/tmp/mimic-dry")
    ap.add_argument("--nih", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/nih-cxr14-sample"))
    ap.add_argument("--subset", type=int, default=256, help="rows cached (and trained on)")
    ap.add_argument("--steps", type=int, default=12, help="training steps (batch 16)")
    ap.add_argument("--predict", type=int, default=64, help="images predicted")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated folders")
    ap.add_argument("--stages-only", metavar="ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stages_only:
        print(json.dumps(run_stages(Path(args.stages_only), subset=args.subset, steps=args.steps,
                                    predict=args.predict)))
        return
    results = []
    for n in args.n:
        results.append(one(args, n))
        r = results[-1]
        print(f"N={r['n']}: built in {r['build_s']:.1f} s; " + ", ".join(
            f"{s} {v['s']:.2f} s {v['stage_rise_mib']:.0f} MiB" for s, v in r["stages"].items())
            + f"; peak {r['peak_mib']:.0f} MiB (before load {r['rss_before_mib']:.0f}); cache mode {r['cache_mode']}",
            flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
