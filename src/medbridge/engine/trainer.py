"""Training MedBridge on cached frozen activations: AdamW, checkpoints, resume, NaN guard, Ctrl-C safety."""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones.loading import atomic_write_bytes
from ..io import load_torch_checkpoint
from ..methods.medbridge.model import MedBridgeModel
from .cache import FeatureCache
from .config import TrainConfig
from .distributed import average_gradients, broadcast_parameters, world
from .metrics import evaluate_scores

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the epoch and step."""


def split_cached(values: dict[str, torch.Tensor], n_experts: int, device) -> list[dict[str, torch.Tensor]]:
    """Flat cache entries {"e0.states": ...} -> per-expert dicts on ``device``."""
    out = [{} for _ in range(n_experts)]
    for name, t in values.items():
        k, key = name.split(".", 1)
        out[int(k[1:])][key] = t.to(device, non_blocking=True)
    return out


def medbridge_cache_values(model: MedBridgeModel, pixels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"e{k}.{name}": t for k, item in enumerate(model.cacheable(pixels)) for name, t in item.items()}


def fit_feature_norms(model: MedBridgeModel, cache: FeatureCache, train_rows: np.ndarray) -> None:
    """Standardisation statistics from the training rows' cached frozen embeddings (every view)."""
    if not model.standardized:
        return
    names = [f"e{k}.frozen" for k in range(len(model.encoders))]
    if not all(n in cache.arrays for n in names):  # joint attention caches only the prefix: run the frozen path
        names = None
    frozen = [[] for _ in model.encoders]
    with torch.no_grad():
        for i in range(0, len(train_rows), 256):
            cached = split_cached(cache.read(train_rows[i:i + 256], names), len(model.encoders), "cpu")
            for k, (enc, item) in enumerate(zip(model.encoders, cached)):
                if "frozen" in item:
                    frozen[k].append(item["frozen"].float())
                else:
                    b, n = item["prefix"].shape[:2]
                    weight = next(enc.vision.parameters())
                    out = enc.frozen_embedding(item["prefix"].flatten(0, 1).to(weight.device, weight.dtype))
                    frozen[k].append(out.view(b, n, -1).cpu().float())
    model.fit_feature_norms([torch.cat(f) for f in frozen])


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in ``run_dir/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0  # steps done inside ``epoch``
    global_step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "global_step": self.global_step}


def save_checkpoint(path: Path, model: MedBridgeModel, opt: torch.optim.Optimizer, progress: Progress,
                    history: list) -> None:
    state = {"trainable": {n: p.detach().cpu() for n, p in model.adapter_tensors().items()},
             "optimizer": opt.state_dict(), "progress": progress.to_dict(), "history": json.dumps(history)}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, model: MedBridgeModel, opt: torch.optim.Optimizer) -> tuple[Progress, list]:
    state = load_torch_checkpoint(path)
    params = model.adapter_tensors()
    missing = set(params) - set(state["trainable"])
    if missing:
        raise TrainingError(f"{path}: checkpoint lacks {sorted(missing)[:3]}: it belongs to another model config")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    return Progress(**state["progress"]), json.loads(state["history"])


def predict_cached(model: MedBridgeModel, cache: FeatureCache, rows: np.ndarray, batch_size: int = 32,
                   device: str = "cpu", labels: list[str] | None = None, prompt_names: list[str] | None = None,
                   with_details: bool = False):
    """Sigmoid scores [len(rows), L] (+ gates and view votes with ``with_details``) from the cache."""
    model.eval()
    scores, gates, votes = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            cached = split_cached(cache.read(rows[i:i + batch_size]), len(model.encoders), device)
            out = model.forward_cached(cached, labels, prompt_names)
            scores.append(torch.sigmoid(out.logits.float()).cpu())
            gates.append(out.gate.float().cpu())
            votes.append(out.view_votes.float().cpu())
    s = torch.cat(scores).numpy() if scores else np.zeros((0, len(labels or model.config.labels)))
    if with_details:
        return s, torch.cat(gates).numpy(), torch.cat(votes).numpy()
    return s


def train_medbridge(model: MedBridgeModel, cache: FeatureCache, targets: np.ndarray, train_rows: np.ndarray,
                    cfg: TrainConfig, run_dir: Path, val_rows: np.ndarray | None = None,
                    reports: list | None = None, device: str = "cpu", resume: bool = False,
                    progress_bar: bool = True, stop_after: int | None = None) -> list[dict]:
    """Train the adapter on cached activations; returns the per-epoch history. The batch order depends only on
    ``cfg.seed`` and the epoch, so a resumed run reproduces an uninterrupted one exactly. ``stop_after`` (steps)
    simulates an interruption (tests)."""
    from tqdm import tqdm

    rank, size = world()
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    fit_feature_norms(model, cache, np.asarray(train_rows))  # deterministic: the same on resume and every rank
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_parameters(params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if cfg.schedule == "cosine"
        else (lambda s: 1.0))
    ckpt = run_dir / CHECKPOINT
    progress, history = Progress(), []
    if resume and ckpt.is_file():
        progress, history = load_checkpoint(ckpt, model, opt)
        sched.last_epoch = progress.global_step
        log.info("resumed from %s at epoch %d step %d", ckpt, progress.epoch, progress.step)
    targets_t = torch.from_numpy(targets)
    logf = (run_dir / "log.jsonl").open("a") if rank == 0 else None
    board = _tensorboard(run_dir) if rank == 0 else None
    use_amp = cfg.amp and str(device).startswith("cuda")
    bar = tqdm(total=total, initial=progress.global_step, desc="training", unit="step",
               disable=not progress_bar or rank != 0, dynamic_ncols=True)
    try:
        for epoch in range(progress.epoch, cfg.epochs):
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(train_rows)
            model.train()
            t0, seen = time.perf_counter(), 0
            for step in range(progress.step if epoch == progress.epoch else 0, steps_per_epoch):
                rows = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                local = rows[rank::size]
                cached = split_cached(cache.read(local), len(model.encoders), device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    out = model.forward_cached(cached)
                    loss = model.loss(out, targets_t[local].to(device),
                                      reports=[reports[i] for i in local] if reports is not None else None)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (global step "
                                        f"{progress.global_step + 1}): lower train.lr or check the labels; the "
                                        f"last good checkpoint is {ckpt}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                opt.step()
                sched.step()
                seen += len(rows)
                progress = Progress(epoch, step + 1, progress.global_step + 1)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.1f}")
                if logf:
                    logf.write(json.dumps({"event": "step", **progress.to_dict(), "loss": loss.item(),
                                           "lr": sched.get_last_lr()[0]}) + "\n")
                if board:
                    board.add_scalar("train/loss", loss.item(), progress.global_step)
                if rank == 0 and cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, model, opt, progress, history)
                if stop_after is not None and progress.global_step >= stop_after:
                    raise KeyboardInterrupt
            record = {"event": "epoch", "epoch": epoch + 1, "seconds": time.perf_counter() - t0}
            if val_rows is not None and len(val_rows) and rank == 0:
                scores = predict_cached(model, cache, val_rows, cfg.eval_batch_size, device)
                record["val_macro_auroc"] = evaluate_scores(scores, targets[val_rows],
                                                            model.config.labels)["macro"]["auroc"]
            history.append(record)
            progress = Progress(epoch + 1, 0, progress.global_step)
            if rank == 0:
                save_checkpoint(ckpt, model, opt, progress, history)
                if logf:
                    logf.write(json.dumps(record) + "\n")
                if board and "val_macro_auroc" in record:
                    board.add_scalar("val/macro_auroc", record["val_macro_auroc"], epoch + 1)
                log.info("epoch %d: %s", epoch + 1, record)
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(ckpt, model, opt, progress, history)
        bar.close()
        raise
    finally:
        if logf:
            logf.close()
        if board:
            board.close()
    bar.close()
    return history
