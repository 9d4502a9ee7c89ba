"""The service's model side: a trained method loaded once, scoring decoded images in batches, and a micro-batcher
that runs it once per batch of concurrent requests behind a bounded queue."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.focal import focal_views
from ..engine.calibration import apply_calibration, load_calibrator
from ..engine.evaluate import run_thresholds
from ..engine.run import resolve_device
from ..io import read_json
from ..methods.api import Explainable, Method
from ..methods.inference import score_views
from ..methods.registry import load_method, method_folder, saved_method_in
from .decisions import decide
from .explain import DEFAULT_LAYER, explained_layers, heat_maps

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5


@dataclass
class Job:
    """One image of a request: the decoded pixels, the name to report, whether to explain it."""

    image: np.ndarray
    name: str
    explain: int | list[int] | None = None  # heat maps: label indices, or the k most probable labels, or none
    preview: bool = False


def parse_explain(spec: str | None, labels: list[str]) -> int | list[int] | None:
    """The ``explain`` request parameter: ``none``/``false`` (default), ``all``/``true``, ``top`` or ``topK``
    (the K most probable, default 3), or comma-separated label names -> label indices / K / None."""
    text = (spec or "").strip()
    low = text.lower()
    if low in ("", "none", "false", "0"):
        return None
    if low in ("all", "true", "1"):
        return list(range(len(labels)))
    if low.startswith("top") and (low[3:].isdigit() or low == "top"):
        k = int(low[3:] or 3)
        if k < 1:
            raise ValueError(f"explain={text}: K must be >= 1")
        return k
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise ValueError(f"explain: unknown label(s) {unknown}; the model's labels are {labels} (or use all, topK, "
                         "none)")
    return list(dict.fromkeys(labels.index(n) for n in names))  # a label named twice is explained once


def png_data_url(values: np.ndarray) -> str:
    """[h, w] in [0, 1] -> an 8-bit greyscale PNG as a data: URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def finite_or_none(value: float) -> float | None:
    """A threshold for JSON: an infinite one (the label had no positive in the validation split, so it is never
    called positive) becomes null."""
    return float(value) if np.isfinite(value) else None


def preview_data_url(image: np.ndarray, max_side: int = 1024) -> str:
    """The decoded image as the service sees it (windowed, MONOCHROME1 inverted), long side at most ``max_side``,
    as a JPEG data: URL for the page (DICOM cannot be shown by a browser directly)."""
    from PIL import Image

    im = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _backbone_names(method: Method) -> list[str]:
    return [b.name for b in method.backbones]


def run_folder_of(folder: Path) -> Path | None:
    """The run folder holding ``folder`` (itself or its parent), recognised by its metrics.json."""
    for cand in (folder, folder.parent):
        if (cand / "metrics.json").is_file():
            return cand
    return None


def resolve_cv_fold(folder: Path) -> tuple[Path, Path | None]:
    """A cross-validation run folder (``train --cv K``, ``medbridge demo``: ``fold-<f>/`` run folders, no method at
    the top) -> (its first fold's run folder, the CV folder); any other folder -> (itself, None). Each fold's model
    was trained on (K-1)/K of the data; serve ``RUN/fold-<f>`` to choose another."""
    folds = sorted((f for f in folder.glob("fold-*") if f.is_dir() and (f / "metrics.json").is_file()),
                   key=lambda f: int(f.name.split("-")[1]) if f.name.split("-")[1].isdigit() else 1 << 30)
    if folds and saved_method_in(folder) is None:
        log.warning("%s is a cross-validation run: serving the model of %s", folder, folds[0].name)
        return folds[0], folder
    return folder, None


class Predictor:
    """A saved method (run folder, adapter, probe or baseline folder) loaded once with the CLI's safe loaders,
    its validation thresholds and what ``GET /v1/model`` reports."""

    def __init__(self, source: str | Path, explain_layer: int | None = DEFAULT_LAYER, device: str = "cpu",
                 amp: bool = True) -> None:
        self.folder, self.cv_root = resolve_cv_fold(Path(source))
        self.method = load_method(self.folder)
        self.device, self.amp = resolve_device(device, "--device"), amp
        self.method.to(self.device).eval()
        self.explain_layer = explain_layer
        found = run_thresholds(self.folder, self.method.name)
        self.threshold_source = "validation split of the training run" if found else f"default {DEFAULT_THRESHOLD}"
        self.thresholds = {lab: float((found or {}).get(lab, DEFAULT_THRESHOLD)) for lab in self.method.labels}
        self.validated = bool(found)
        self.calibrator = load_calibrator(method_folder(self.folder), self.method.labels)
        self.info = self._describe()

    def _describe(self) -> dict:
        m = self.method
        info = {"method": m.name, "labels": list(m.labels), "backbones": _backbone_names(m),
                "thresholds": {lab: finite_or_none(t) for lab, t in self.thresholds.items()},
                "threshold_source": self.threshold_source,
                "calibration": (f"{self.calibrator['kind']} scaling per label, fitted on the validation part"
                                if self.calibrator else None),
                "focal": m.focal.to_dict(),
                "explanation": {"method": "gradient x (activation - mean-image activation) on the frozen tower's "
                                          "patch tokens",
                                "layer": explained_layers(m, self.explain_layer)}
                if isinstance(m, Explainable) else None,
                "training_data": None, "metrics": None}
        run = run_folder_of(self.folder)
        if run is None:
            return info
        if (run / "config.yaml").is_file():
            import yaml

            data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data", {})
            info["training_data"] = {k: data.get(k) for k in ("path", "format", "split", "fractions", "split_seed",
                                                              "label_fraction") if k in data}
        metrics = read_json(run / "metrics.json", "run metrics").get("methods", {}).get(m.name)
        if metrics:  # everything but per-threshold tables: macro and per-class metrics, with intervals if present
            info["metrics"] = {k: v for k, v in metrics.items() if k != "thresholds"}
        if self.cv_root is not None:
            cv = read_json(self.cv_root / "metrics.json", "cross-validation metrics") if (
                self.cv_root / "metrics.json").is_file() else {}
            info["cross_validation"] = {"folder": str(self.cv_root), "served_fold": self.folder.name,
                                        "folds": cv.get("folds"), "metrics": cv.get("methods", {}).get(m.name)}
        return info

    def score(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[dict]]:
        """Decoded images -> probabilities [n, L] and per image the MedBridge details (gate, per-view boxes and
        votes; empty for other methods). Images with the same number of views run as one batch."""
        m = self.method
        views = [focal_views(img, m.focal, m.preprocess) for img in images]
        probs = np.zeros((len(images), len(m.labels)), dtype=np.float64)
        details: list[dict] = [{} for _ in images]
        for n in sorted({v[0].pixels.shape[0] for v in views}):
            group = [j for j, v in enumerate(views) if v[0].pixels.shape[0] == n]
            pixels = [torch.stack([views[j][k].pixels for j in group]) for k in range(len(m.preprocess))]
            scores, extra = score_views(m, pixels, self.device, self.amp)
            for gi, j in enumerate(group):
                probs[j] = scores[gi]
                if extra:
                    details[j] = {"gate": [round(float(g), 4) for g in extra["gate"][gi]],
                                  "views": [{"box": views[j][0].boxes[v].tolist(),
                                             "vote": round(float(extra["view_votes"][gi, :, v].mean()), 4)}
                                            for v in range(n)]}
        return apply_calibration(self.calibrator, probs, m.labels), details

    def predict(self, jobs: list[Job]) -> list[dict]:
        """The answer for each image: per label probability, threshold and decision (model order), MedBridge's
        gate and views, and (when asked) per-label heat maps as PNG data URLs."""
        probs, details = self.score([j.image for j in jobs])
        out = []
        for job, p, extra in zip(jobs, probs, details):
            h, w = job.image.shape[:2]
            row = {"image": job.name, "width": int(w), "height": int(h),
                   "predictions": [{"label": lab, "probability": round(float(p[c]), 6),
                                    "threshold": finite_or_none(self.thresholds[lab]),
                                    **decide(float(p[c]), self.thresholds[lab], self.validated)}
                                   for c, lab in enumerate(self.method.labels)],
                   "threshold_source": self.threshold_source, **extra}
            if job.explain is not None:
                which = (np.argsort(-p)[:job.explain].tolist() if isinstance(job.explain, int) else job.explain)
                row["explanation"] = self.explain(job.image, which)
            if job.preview:
                row["preview"] = preview_data_url(job.image)
            out.append(row)
        return out

    def explain(self, image: np.ndarray, labels: list[int] | None = None) -> dict:
        """Heat maps of the given label indices (default: all) as greyscale PNG data URLs."""
        res = heat_maps(self.method, image, labels, self.explain_layer)
        h, w = res["size"]
        return {"method": "gradient x (activation - mean-image activation)",
                "layer": explained_layers(self.method, self.explain_layer),
                "height": h, "width": w, "boxes": res["boxes"],
                "maps": {self.method.labels[c]: png_data_url(res["maps"][k]) for k, c in enumerate(res["labels"])}}


class QueueFull(RuntimeError):
    """The bounded queue of pending images is full (the service answers 503)."""


class MicroBatcher:
    """Collects the images of concurrent requests and runs ``fn`` once per batch (up to ``max_batch`` images,
    waiting at most ``max_wait_s`` for more) in one model thread. At most ``max_pending`` images wait; beyond
    that :meth:`submit` raises :class:`QueueFull` at once instead of queueing without bound."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 16, max_wait_s: float = 0.005,
                 max_pending: int = 64) -> None:
        self.fn = fn
        self.max_batch, self.max_wait_s, self.max_pending = max_batch, max_wait_s, max_pending
        self.pending = 0
        self.stats = {"requests": 0, "images": 0, "batches": 0, "refused": 0}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medbridge-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())

    async def submit(self, items: list) -> list:
        if not items:
            return []
        self._ensure_worker()
        if self.pending + len(items) > self.max_pending:
            self.stats["refused"] += 1
            raise QueueFull(f"the service is busy: {self.pending} images are waiting (limit {self.max_pending}); "
                            "retry later")
        fut = self._loop.create_future()
        self.pending += len(items)
        self.stats["requests"] += 1
        self._queue.put_nowait((items, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            n = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while n < self.max_batch:
                try:
                    nxt = self._queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(
                        self._queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(nxt)
                n += len(nxt[0])
            flat = [x for items, _ in batch for x in items]
            try:
                results = await loop.run_in_executor(self._executor, self.fn, flat)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                start = 0
                for items, fut in batch:
                    if not fut.done():
                        fut.set_result(results[start:start + len(items)])
                    start += len(items)
            finally:
                self.pending -= n
                self.stats["batches"] += 1
                self.stats["images"] += n

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

