"""One training loop for every method: closed-form fits, or mini-batches on cached frozen activations with the
method's optimiser and schedule, checkpoints + ``--resume``, torchrun data parallelism, bf16 autocast on GPU, a
NaN guard, Ctrl-C safety, progress and ``log.jsonl``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes, load_torch_checkpoint
from ..methods.api import ClosedFormFit, FitsMembers, Method, NonFiniteLoss, Optimization, TrainingData
from .config import TrainConfig
from .distributed import average_gradients, broadcast_flag, broadcast_parameters, world
from .metrics import evaluate_scores

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the epoch and step."""


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


def save_checkpoint(path: Path, method: Method, opt: torch.optim.Optimizer, progress: Progress,
                    history: list, best: dict | None = None) -> None:
    state = {"method": method.name, "trainable": {n: p.detach().cpu() for n, p in method.state_tensors().items()},
             "optimizer": opt.state_dict(), "progress": progress.to_dict(), "history": json.dumps(history)}
    if best is not None:  # the best epoch's tensors so far (Optimization.keep_best)
        state["best"] = best
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, method: Method, opt: torch.optim.Optimizer) -> tuple[Progress, list, dict | None]:
    state = load_torch_checkpoint(path)
    if not isinstance(state, dict) or "trainable" not in state:
        raise TrainingError(f"{path}: not a medbridge training checkpoint")
    params = method.state_tensors()
    missing = set(params) - set(state["trainable"])
    if missing or state.get("method", method.name) != method.name:
        raise TrainingError(f"{path}: checkpoint of {state.get('method', '?')} lacks {sorted(missing)[:3]}: it "
                            "belongs to another method or config")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(p.shape) != tuple(state["trainable"][n].shape):
                raise TrainingError(f"{path}: {n} has shape {tuple(state['trainable'][n].shape)}, the model "
                                    f"{tuple(p.shape)}: it belongs to another config")
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    return Progress(**state["progress"]), json.loads(state["history"]), state.get("best")


def default_optimization(cfg: TrainConfig) -> Optimization:
    """The run's ``train`` section as the loop's defaults (MedBridge trains with these)."""
    return Optimization(optimizer="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, schedule=cfg.schedule, keep_best=cfg.keep_best,
                        patience=cfg.patience)


def fit_method(method: Method, data: TrainingData, cfg: TrainConfig, run_dir: Path, device: str = "cpu",
               resume: bool = False, progress_bar: bool = True, stop_after: int | None = None) -> list[dict]:
    """Fit ``method`` on ``data``; returns the per-epoch history (one record for a closed-form fit).

    The batch order depends only on ``cfg.seed`` and the epoch and the schedule only on the step, so a resumed
    run reproduces an uninterrupted one exactly. ``stop_after`` (steps) simulates an interruption (tests).
    A method made of members (:class:`FitsMembers`: seed ensembles) is fitted member by member (member i with seed
    ``cfg.seed + i``, checkpoints in ``run_dir/member-i``); its history is the members' records, each tagged with
    its member. A :class:`ClosedFormFit` method is fitted by its ``fit_closed_form`` unless that returns None."""
    if isinstance(method, FitsMembers):
        return _fit_members(method, data, cfg, Path(run_dir), device, resume, progress_bar, stop_after)
    rank, _ = world()
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    method.to(device)
    method.prepare(data)  # deterministic: the same on resume and on every rank
    t0 = time.perf_counter()
    info = method.fit_closed_form(data) if isinstance(method, ClosedFormFit) else None
    if info is not None:
        record = {"event": "fit", "seconds": time.perf_counter() - t0, **_jsonable(info)}
        if rank == 0:
            with (run_dir / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        return [record]
    return _loop(method, data, cfg, run_dir, device, resume, progress_bar, stop_after)


def _fit_members(ensemble: FitsMembers, data: TrainingData, cfg: TrainConfig, run_dir: Path, device: str,
                 resume: bool, progress_bar: bool, stop_after: int | None) -> list[dict]:
    """Fit the members in turn; ``stop_after`` counts the steps of all members (a finished member resumed from
    its checkpoint takes no new step)."""
    history: list[dict] = []
    for i, member in enumerate(ensemble.members):
        done = sum(r.get("steps", 0) for r in history if r.get("event") == "epoch")
        if stop_after is not None and done >= stop_after:
            raise KeyboardInterrupt
        records = fit_method(member, data, replace(cfg, seed=cfg.seed + i), run_dir / f"member-{i}", device, resume,
                             progress_bar, None if stop_after is None else stop_after - done)
        history += [{"member": i, "seed": cfg.seed + i, **r} for r in records]
    return history


def _jsonable(info: dict) -> dict:
    return json.loads(json.dumps(info, default=float))


def _loop(method: Method, data: TrainingData, cfg: TrainConfig, run_dir: Path, device: str, resume: bool,
          progress_bar: bool, stop_after: int | None) -> list[dict]:
    from tqdm import tqdm

    rank, size = world()
    opt_cfg = method.optimization(default_optimization(cfg))
    groups = method.parameter_groups()
    broadcast_parameters([p for g in groups for p in g["params"]])
    opt = opt_cfg.make_optimizer(groups)
    train_rows = np.asarray(data.train_rows)
    steps_per_epoch = math.ceil(len(train_rows) / opt_cfg.batch_size)
    total = steps_per_epoch * opt_cfg.epochs
    ckpt = run_dir / CHECKPOINT
    progress, history, best = Progress(), [], None
    if resume and ckpt.is_file():
        progress, history, best = load_checkpoint(ckpt, method, opt)
        log.info("resumed from %s at epoch %d step %d", ckpt, progress.epoch, progress.step)
    targets_t = torch.from_numpy(data.targets)
    logf = (run_dir / "log.jsonl").open("a") if rank == 0 else None
    board = _tensorboard(run_dir) if rank == 0 else None
    use_amp = cfg.amp and str(device).startswith("cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    bar = tqdm(total=total, initial=progress.global_step, desc=f"training {method.name}", unit="step",
               disable=not progress_bar or rank != 0, dynamic_ncols=True)
    # a run that stopped early (patience) and is resumed stays stopped
    last = progress.epoch if opt_cfg.patience and _stale_epochs(history) >= opt_cfg.patience else opt_cfg.epochs
    try:
        for epoch in range(progress.epoch, last):
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(train_rows)
            method.train()
            t0, seen, loss = time.perf_counter(), 0, None
            for step in range(progress.step if epoch == progress.epoch else 0, steps_per_epoch):
                rows = perm[step * opt_cfg.batch_size:(step + 1) * opt_cfg.batch_size]
                local = rows[rank::size]
                lr = opt_cfg.lr_at(progress.global_step, epoch, steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                batch = method.read_batch(data.cache, local, device)
                reports = [data.reports[i] for i in local] if data.reports is not None else None
                try:
                    loss = method.training_step(batch, targets_t[local].to(device), reports, opt, average_gradients,
                                                autocast)
                except NonFiniteLoss as exc:
                    raise TrainingError(f"{method.name}: {exc} at epoch {epoch + 1} step {step + 1} (global step "
                                        f"{progress.global_step + 1}): lower the learning rate or check the labels;"
                                        f" the last good checkpoint is {ckpt}") from None
                seen += len(rows)
                progress = Progress(epoch, step + 1, progress.global_step + 1)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.1f}")
                if logf:
                    logf.write(json.dumps({"event": "step", **progress.to_dict(), "loss": loss.item(),
                                           "lr": opt.param_groups[0]["lr"]}) + "\n")
                if board:
                    board.add_scalar("train/loss", loss.item(), progress.global_step)
                if rank == 0 and cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, method, opt, progress, history, best)
                if stop_after is not None and progress.global_step >= stop_after:
                    raise KeyboardInterrupt
            record = {"event": "epoch", "epoch": epoch + 1, "seconds": time.perf_counter() - t0,
                      "loss": None if loss is None else loss.item(), "steps": steps_per_epoch}
            if len(data.val_rows) and rank == 0:
                method.eval()
                scores = method.scores_cached(data.cache, np.asarray(data.val_rows), device)
                record["val_macro_auroc"] = evaluate_scores(scores, data.targets[data.val_rows],
                                                            method.labels)["macro"]["auroc"]
            history.append(record)
            progress = Progress(epoch + 1, 0, progress.global_step)
            if opt_cfg.keep_best and rank == 0 and _best_epoch(history) == epoch + 1:
                best = {n: p.detach().cpu().clone() for n, p in method.state_tensors().items()}
            if rank == 0:
                save_checkpoint(ckpt, method, opt, progress, history, best)
                if logf:
                    logf.write(json.dumps(record) + "\n")
                if board and "val_macro_auroc" in record:
                    board.add_scalar("val/macro_auroc", record["val_macro_auroc"], epoch + 1)
                log.info("epoch %d: %s", epoch + 1, record)
            if opt_cfg.patience and broadcast_flag(rank == 0 and _stale_epochs(history) >= opt_cfg.patience):
                log.info("early stop after epoch %d: no better validation AUROC for %d epochs", epoch + 1,
                         opt_cfg.patience)
                break
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(ckpt, method, opt, progress, history, best)
        bar.close()
        raise
    finally:
        if logf:
            logf.close()
        if board:
            board.close()
    bar.close()
    method.eval()
    if opt_cfg.keep_best and best is not None and rank == 0:
        chosen = _best_epoch(history)
        method.load_state_tensors(best, f"{ckpt} (best epoch)")
        history.append({"event": "selected", "epoch": chosen,
                        "val_macro_auroc": _val_curve(history)[chosen - 1]})
    return history


def _val_curve(history: list[dict]) -> list[float]:
    return [r.get("val_macro_auroc", float("nan")) for r in history if r.get("event") == "epoch"]


def _best_epoch(history: list[dict]) -> int:
    """1-based epoch with the best validation macro AUROC (the earliest of equals; NaN never best)."""
    curve = np.nan_to_num(np.asarray(_val_curve(history), dtype=float), nan=-np.inf)
    return int(np.argmax(curve)) + 1 if len(curve) else 0


def _stale_epochs(history: list[dict]) -> int:
    """Epochs since the best validation macro AUROC."""
    return len(_val_curve(history)) - _best_epoch(history)
