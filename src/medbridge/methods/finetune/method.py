"""Fine-tuning the vision tower itself: the baseline users try first ("why not just fine-tune?").

Three registered methods share this class and differ in what trains:

- ``full-finetune``: every tower weight (optionally with layer-wise learning-rate decay) and a linear head;
- ``partial-finetune``: the last ``blocks`` blocks, the final norm and the head (earlier blocks run without
  gradients);
- ``lora-finetune``: low-rank adapters (peft's LoRA, injected into the tower's own attention projections) and the
  head; the pretrained weights stay as they are.

The tower is a private copy of the pretrained one (the backbones a run shares stay pretrained), run block by block
through the library's own modules. Input: the whole image at the tower's resolution, with mild augmentation while
training (zoom, rotation, translation, contrast/brightness; horizontal flips off by default: a flipped chest
X-ray has its heart on the wrong side, and laterality markers turn around). What is cached is the preprocessed
pixels (``train.cache`` mode ``pixels``), never frozen activations. Saved: the tuned tensors + the head, checked
against the pretrained backbone's fingerprint when loaded.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...backbones.base import Backbone, backbone_fingerprint
from ...data.focal import FocalConfig
from ...extras import MissingExtraError, require
from ..api import CacheSpec, Explainable, Method, NotApplicableError, Optimization, OptionsError, TrainingData

PIXELS = "e0.pixels"
#: fine-tuning sees the whole image only (the tower's resolution)
WHOLE_IMAGE = FocalConfig(region_size=1.0, num_crops=0, include_whole=True)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FineTuneOptions:
    """Settings every fine-tuning method shares."""

    lr: float = field(default=2e-5, metadata=_help("learning rate of the tower's trained weights"))
    head_lr: float = field(default=1e-3, metadata=_help("learning rate of the linear head"))
    weight_decay: float = field(default=0.05, metadata=_help("AdamW weight decay (not on biases and norms)"))
    epochs: int = field(default=5, metadata=_help("epochs; the weights of the best validation epoch are kept"))
    batch_size: int = field(default=16, metadata=_help("mini-batch size"))
    schedule: str = field(default="cosine", metadata=_help("constant or cosine (per step, to 0 at the end)"))
    patience: int = field(default=0, metadata=_help("stop after this many epochs without a better validation "
                                                    "macro AUROC (0: run every epoch)"))
    augment: bool = field(default=True, metadata=_help("random zoom 0.9-1.1, rotation +-10 deg, shift +-6%, "
                                                       "contrast/brightness +-10% while training"))
    hflip: bool = field(default=False, metadata=_help("random horizontal flips (off: laterality matters in CXRs)"))
    gradient_checkpointing: str = field(default="auto", metadata=_help(
        "recompute block activations in the backward pass to save memory: on, off, or auto (on with CUDA)"))

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise OptionsError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.patience < 0:
            raise OptionsError(f"patience must be >= 0, got {self.patience}")
        if self.schedule not in ("constant", "cosine"):
            raise OptionsError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise OptionsError(f"gradient_checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")


@dataclass
class FullFineTuneOptions(FineTuneOptions):
    layer_decay: float = field(default=1.0, metadata=_help(
        "layer-wise learning-rate decay: block i of D trains at lr * layer_decay**(D - i), the embeddings at "
        "lr * layer_decay**(D + 1) (1: off; 0.65-0.75 is the BEiT/MAE recipe for ViTs)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise OptionsError(f"layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class PartialFineTuneOptions(FineTuneOptions):
    lr: float = field(default=1e-4, metadata=_help("learning rate of the tower's trained blocks"))
    blocks: int = field(default=4, metadata=_help("how many of the last blocks train (with the final norm)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks < 1:
            raise OptionsError(f"blocks must be >= 1, got {self.blocks}")


@dataclass
class LoraFineTuneOptions(FineTuneOptions):
    lr: float = field(default=1e-3, metadata=_help("learning rate of the LoRA matrices"))
    rank: int = field(default=8, metadata=_help("LoRA rank r"))
    alpha: float = field(default=16.0, metadata=_help("LoRA scaling alpha (the update is alpha/r * B A)"))
    targets: str = field(default="attention", metadata=_help(
        "which linear layers of the blocks get adapters: attention (query/value projections; a fused qkv "
        "projection where the model has one), all-linear, or a comma-separated list of layer names"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1 or self.alpha <= 0:
            raise OptionsError(f"rank must be >= 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")


#: names of the query/value (or fused qkv) projections in the libraries' attention modules
ATTENTION_TARGETS = ("query", "value", "q_proj", "v_proj", "qkv", "q", "v")


def augment_pixels(x: Tensor, generator: torch.Generator, hflip: bool) -> Tensor:
    """Random affine (zoom 0.9-1.1, rotation +-10 deg, shift +-6 %) and contrast/brightness (+-10 %) of normalised
    pixels [B, 3, S, S]; edges repeat the border. Reproducible from ``generator``."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    zoom, angle = uniform(0.9, 1.1), uniform(-10, 10) * math.pi / 180
    tx, ty = uniform(-0.06, 0.06) * 2, uniform(-0.06, 0.06) * 2
    flip = (torch.rand(b, generator=generator) < 0.5).float() * 2 - 1 if hflip else torch.ones(b)
    contrast, brightness = uniform(0.9, 1.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # output (x, y) -> input: rotate and zoom, mirror x when flipped, shift
    theta = torch.stack([torch.stack([flip * cos, -sin, tx], 1), torch.stack([flip * sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * contrast.view(b, 1, 1, 1).to(x) + mean + brightness.view(b, 1, 1, 1).to(x)


class FineTuneMethod(Explainable, Method):
    """Fine-tuning of a vision tower with a linear head on its pooled embedding (see the module docstring)."""

    #: which weights train: "all", "last-blocks" or "lora" (set by the registered subclasses)
    trains: str = "all"

    def __init__(self, options: FineTuneOptions, backbones: list[Backbone], labels: list[str],
                 prompt_names: list[str], focal: FocalConfig) -> None:
        if len(backbones) != 1:
            raise NotApplicableError(f"{self.name} fine-tunes one tower; {len(backbones)} backbones were given")
        pretrained = backbones[0]
        fingerprints = [backbone_fingerprint(pretrained)]
        tower = Backbone(pretrained.name, copy.deepcopy(pretrained.vision))  # private copy, frozen to start
        super().__init__(options, [tower], labels, prompt_names, WHOLE_IMAGE)
        self._fingerprints = fingerprints
        self.head = nn.Linear(tower.vision.embed_dim, len(labels))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.aug_seed = 0
        self._outside: tuple[set[int], set[int]] | None = None
        self.lora_targets: list[str] = []
        self._unfreeze()

    # -- what trains
    @property
    def tower(self):
        return self.frozen_backbones[0].vision

    def _unfreeze(self) -> None:
        v = self.tower
        depth = v.depth
        if self.trains == "all":  # everything the forward pass uses (not e.g. DINOv2's unused mask token)
            embedding, final = self._outside_params()
            in_blocks = {id(p) for b in v.blocks for p in b.parameters()}
            for p in v.parameters():
                p.requires_grad_(id(p) in in_blocks or id(p) in embedding or id(p) in final)
        elif self.trains == "last-blocks":
            first = max(depth - self.options.blocks, 0)
            _, final = self._outside_params()
            for p in v.parameters():  # the final norm / projection (after the blocks) trains too
                p.requires_grad_(id(p) in final)
            for block in list(v.blocks)[first:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        elif self.trains == "lora":
            self._inject_lora()
        v.frozen = False

    def _outside_params(self) -> tuple[set[int], set[int]]:
        """Tower parameters outside the blocks used by the embedding (patch/position embeddings, CLS, ...) and by
        ``finalize`` (final norm, projection), found through autograd on one dummy image, not by names."""
        if self._outside is not None:
            return self._outside
        v = self.tower
        in_blocks = {id(p) for b in v.blocks for p in b.parameters()}
        others = [p for p in v.parameters() if id(p) not in in_blocks]
        flags = [p.requires_grad for p in others]
        for p in others:
            p.requires_grad_(True)
        size = v.preprocess.image_size
        tokens = v.embed(torch.zeros(1, 3, size, size, device=others[0].device if others else "cpu"))
        found = []
        for out in (tokens, v.finalize(tokens.detach()) if others else tokens):
            grads = torch.autograd.grad(out.float().sum(), others, allow_unused=True) if out.requires_grad else []
            found.append({id(p) for p, g in zip(others, grads) if g is not None})
        for p, flag in zip(others, flags):
            p.requires_grad_(flag)
        self._outside = (found[0], found[1])
        return self._outside

    def _inject_lora(self) -> None:
        try:
            require("peft")
        except MissingExtraError as exc:
            raise NotApplicableError(str(exc)) from exc
        from peft import LoraConfig, inject_adapter_in_model
        v = self.tower
        in_blocks = {id(m) for b in v.blocks for m in b.modules()}
        # nn.MultiheadAttention (open_clip's blocks): peft adapts its fused input projection as a whole
        linears = [n for n, m in v.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))
                   and id(m) in in_blocks]
        inside_mha = {f"{n}.out_proj" for n, m in v.named_modules() if isinstance(m, nn.MultiheadAttention)}
        linears = [n for n in linears if n not in inside_mha]
        wanted = self.options.targets
        if wanted == "all-linear":
            targets = linears
        else:
            names = ATTENTION_TARGETS if wanted == "attention" else tuple(t.strip() for t in wanted.split(","))
            targets = [n for n in linears if n.rsplit(".", 1)[-1] in names or (
                wanted == "attention" and isinstance(v.get_submodule(n), nn.MultiheadAttention))]
        if not targets:
            leaf = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise OptionsError(f"method_options.{self.name}.targets={wanted!r}: no linear layer of the blocks matches"
                               f" (their names: {', '.join(leaf) or 'none'}); name some, or use all-linear")
        config = LoraConfig(r=self.options.rank, lora_alpha=self.options.alpha, lora_dropout=0.0,
                            target_modules=targets, bias="none")
        inject_adapter_in_model(config, v)
        for n, p in v.named_parameters():
            p.requires_grad_("lora_" in n)
        self.lora_targets = targets

    def parameter_groups(self) -> list[dict]:
        """Head at ``head_lr``; tower weights at ``lr`` (times the layer decay); no weight decay on 1-d tensors."""
        opts, v = self.options, self.tower
        scale = {}
        decay = getattr(opts, "layer_decay", 1.0)
        if decay < 1.0:
            depth = v.depth
            embedding = self._outside_params()[0]
            for i, block in enumerate(v.blocks):
                for p in block.parameters():
                    scale[id(p)] = decay ** (depth - i)
            for p in v.parameters():
                if id(p) in embedding:
                    scale[id(p)] = decay ** (depth + 1)
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for p in v.parameters():
            if p.requires_grad:
                groups.setdefault((scale.get(id(p), 1.0), p.ndim > 1), []).append(p)
        out = [{"params": ps, "lr_scale": s, "weight_decay": opts.weight_decay if decayed else 0.0}
               for (s, decayed), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
        head_scale = opts.head_lr / opts.lr
        out += [{"params": [self.head.weight], "lr_scale": head_scale, "weight_decay": opts.weight_decay},
                {"params": [self.head.bias], "lr_scale": head_scale, "weight_decay": 0.0}]
        return out

    def optimization(self, defaults: Optimization) -> Optimization:
        o = self.options
        return Optimization(optimizer="adamw", lr=o.lr, weight_decay=o.weight_decay, epochs=o.epochs,
                            batch_size=o.batch_size, schedule=o.schedule, keep_best=True, patience=o.patience)

    # -- forward
    def _checkpointing(self) -> bool:
        mode = self.options.gradient_checkpointing
        return self.training and torch.is_grad_enabled() and (
            mode == "on" or (mode == "auto" and self.head.weight.is_cuda))

    def logits(self, pixels: Tensor) -> Tensor:
        """Logits [B, L] from normalised whole-image pixels [B, 3, S, S]."""
        v = self.tower
        x = v.embed(pixels)
        first = max(v.depth - self.options.blocks, 0) if self.trains == "last-blocks" else 0
        if first:
            with torch.no_grad():
                x = v.run_blocks(x, 0, first)
        ckpt = self._checkpointing()
        for block in list(v.blocks)[first:]:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        return self.head(v.finalize(x).float())

    def cache_spec(self, n_views: int) -> CacheSpec:
        s = self.tower.preprocess.image_size
        parts = {"what": "pixels", "focal": self.focal.to_dict(), "preprocess": [p.to_dict() for p in self.preprocess]}

        def compute(pixels: list[Tensor]) -> dict[str, Tensor]:
            return {PIXELS: pixels[0]}

        return CacheSpec(parts, {PIXELS: (n_views, 3, s, s)}, compute, self.focal, self.preprocess)

    def _pixels(self, cache: Any, rows: np.ndarray, device: str) -> Tensor:
        return cache.read(np.asarray(rows), [PIXELS])[PIXELS][:, 0].to(device).float()

    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 32):
                out.append(torch.sigmoid(self.logits(self._pixels(cache, rows[i:i + 32], device))).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        with torch.no_grad():
            px = pixels[0][:, 0].to(self.head.weight.device).float()
            return torch.sigmoid(self.logits(px).float()).cpu().numpy(), {}

    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        v = self.tower
        return self.head(v.finalize(v.run_blocks(tokens[0], layers[0])).float()).view(b, n, -1)[:, 0]

    # -- fitting
    def prepare(self, data: TrainingData) -> None:
        """Head bias at each class's prior log-odds on the training rows; a seed for the augmentation."""
        y = data.targets[data.train_rows]
        prior = np.clip(np.nan_to_num(np.nanmean(y, axis=0), nan=0.5), 1e-3, 1 - 1e-3) if len(y) else 0.5
        with torch.no_grad():
            self.head.bias.copy_(torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32))
        self.aug_seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the run's seed (set by the loop)

    def read_batch(self, cache: Any, rows: np.ndarray, device: str) -> Tensor:
        x = self._pixels(cache, rows, "cpu")
        if self.options.augment:
            # the batch's rows and the run's seed fix the augmentation: a resumed run draws the same
            g = torch.Generator().manual_seed(zlib.crc32(np.asarray(rows, dtype=np.int64).tobytes()) ^ self.aug_seed)
            x = augment_pixels(x, g, self.options.hflip)
        return x.to(device)

    def training_loss(self, batch: Tensor, targets: Tensor, reports: list | None) -> Tensor:
        from ..heads import masked_bce

        return masked_bce(self.logits(batch), targets)

    # -- what is saved
    def backbone_fingerprints(self) -> list[dict]:
        return list(self._fingerprints)

    def state_tensors(self) -> dict[str, Tensor]:
        return {n.replace("frozen_backbones.0.vision.", "tower.", 1): p
                for n, p in self.named_parameters() if p.requires_grad}

    def info(self) -> dict:
        out = {"trains": self.trains, "tower_parameters": int(sum(p.numel() for p in self.tower.parameters()))}
        if self.trains == "lora":
            out["lora_targets"] = len(self.lora_targets)
        return out


class FullFineTune(FineTuneMethod):
    """Full fine-tuning: every tower weight and a linear head."""

    trains = "all"


class PartialFineTune(FineTuneMethod):
    """Partial fine-tuning: the last ``blocks`` blocks, the final norm and a linear head."""

    trains = "last-blocks"


class LoraFineTune(FineTuneMethod):
    """LoRA (peft) on the tower's attention projections and a linear head."""

    trains = "lora"
