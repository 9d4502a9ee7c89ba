"""Shared test builders: a tiny CLIP saved as a local-dir backbone, a small NIH-sample CSV, pydicom-data's real
chest X-ray DICOM."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd


def rg1_dicom(kind: str = "UNCR") -> Path:
    """pydicom-data's real chest X-ray ``RG1_<kind>.dcm`` (UNCR, J2KR, J2KI, UNCI); skips the test without it."""
    import pytest

    data_store = pytest.importorskip("data_store")
    path = Path(data_store.__file__).parent / "data" / f"RG1_{kind}.dcm"
    if not path.is_file():
        pytest.skip("pydicom-data's RG1 chest DICOM files are not installed")
    return path


def save_tiny_clip(folder: Path, seed: int = 5) -> str:
    """A tiny random transformers CLIP saved like a hub download; returns its ``local-dir:`` source."""
    from medbridge.backbones.tiny import tiny_hf_model

    if not (folder / "config.json").is_file():
        model, tokenizer = tiny_hf_model("clip", seed=seed)
        with contextlib.redirect_stderr(io.StringIO()):  # transformers 5.x: a "Writing model shards" progress bar
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    return f"local-dir:{folder}"


def nih_subset_csv(nih_sample: Path, out: Path, n: int = 48) -> Path:
    """The first ``n`` real NIH sample images as a generic CSV (patient ids kept), labels limited to 3 classes
    with positives among them."""
    from medbridge.data import load_dataset

    t = load_dataset("nih", nih_sample)
    sub = t.meta.iloc[:n]
    frame = pd.DataFrame({"path": sub["path"], "patient_id": sub["patient_id"], "view": sub["view"]})
    for lab in ("Pneumonia", "Infiltration", "Effusion"):
        frame[lab] = t.targets[:n, t.labels.index(lab)].astype(int)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def random_targets(n: int, labels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = (rng.random((n, labels)) < 0.4).astype(np.float32)
    t[0] = 1
    t[1] = 0
    return t


def train_medbridge(model, cache, targets, rows, cfg, out, val_rows=None, **kwargs) -> list:
    """The shared training loop on a bare MedBridgeModel (tests of the loop itself)."""
    from medbridge.engine.trainer import fit_method
    from medbridge.methods.api import TrainingData
    from medbridge.methods.medbridge.method import MedBridgeMethod

    method = MedBridgeMethod.from_model(model)
    val = np.zeros(0, dtype=int) if val_rows is None else np.asarray(val_rows)
    return fit_method(method, TrainingData(cache, targets, np.asarray(rows), val), cfg, out, **kwargs)


class MemoryCache:
    """The cache's read interface over tensors in memory (fp16 like the real one)."""

    def __init__(self, values: dict) -> None:
        self.arrays = {k: v.detach().half() for k, v in values.items()}

    def read(self, rows, names=None):
        return {k: v[np.asarray(rows)] for k, v in self.arrays.items() if names is None or k in names}


def cached(method, n: int = 16, seed: int = 0) -> MemoryCache:
    """What ``method`` caches for ``n`` random single-view images, held in memory."""
    import torch

    spec = method.cache_spec(1)
    size = method.preprocess[0].image_size
    px = torch.randn(n, 1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return MemoryCache(spec.compute([px] * len(method.backbones)))


def odir_subset(odir_sample: Path, out: Path, n: int = 40, drop: tuple[str, ...] = ()) -> Path:
    """The first ``n`` patients of the real ODIR-5K sample in the official layout under ``out`` (the sheet rewritten
    with openpyxl, the photographs symlinked); images named in ``drop`` are left out (a missing eye)."""
    import openpyxl

    src = Path(odir_sample).resolve() / "ODIR-5K"
    book = openpyxl.load_workbook(next(src.glob("*.xlsx")))
    sheet = book.active
    sheet.delete_rows(n + 2, sheet.max_row)
    folder = out / "ODIR-5K" / "Training Images"
    folder.mkdir(parents=True, exist_ok=True)
    book.save(out / "ODIR-5K" / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx")
    for row in sheet.iter_rows(min_row=2, values_only=True):
        for name in row[3:5]:
            if name not in drop and not (folder / name).exists():
                (folder / name).symlink_to(src / "Training Images" / name)
    return out
