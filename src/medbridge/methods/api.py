"""The interface every method implements (MedBridge, the linear probe, the baselines, your own).

A method is one class deriving from :class:`Method`, one options dataclass, and one ``register_method`` call
(``methods/registry.py``). The engine only ever talks to this interface: it asks the method what frozen
activations to cache (:meth:`Method.cache_spec`), fits it (closed form through :meth:`Method.fit_closed_form`,
or mini-batches through the shared training loop, which calls :meth:`Method.training_step`), scores images from
the cache or from views, and saves/loads it through one file format (``adapter.safetensors`` + ``adapter.json``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..backbones.base import Backbone, PreprocessConfig
from ..data.focal import FocalConfig


class NotApplicableError(ValueError):
    """The method cannot run on this backbone (e.g. text prompt learning without an aligned text tower)."""


class OptionsError(ValueError):
    """A method option is unknown or invalid; the message names the option and what is allowed."""


class NonFiniteLoss(RuntimeError):
    """A training step produced a NaN/inf loss (the engine adds the epoch and step to the message)."""


@dataclass
class CacheSpec:
    """What to cache for a method: key parts, per-image shapes, and the function computing it from views.
    ``alternatives``: other stored forms (mode name -> spec) the method can train from, each smaller and slower."""

    parts: dict
    shapes: dict[str, tuple[int, ...]]
    compute: Callable[[list[Tensor]], dict[str, Tensor]]
    focal: FocalConfig
    preprocess: list[PreprocessConfig]
    alternatives: dict[str, CacheSpec] = field(default_factory=dict)


@dataclass
class Optimization:
    """How the shared training loop optimises a method (from the method's own options or the run's ``train``)."""

    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9)
    lr: float = 5e-4
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 16
    # constant; cosine (per step, to 0 at the end); warmup-cosine (Dassl, per epoch: warmup_epochs at 1e-5, then
    # cosine over the remaining epochs)
    schedule: str = "constant"
    warmup_epochs: int = 0
    # keep the weights of the epoch with the best validation macro AUROC (not the last epoch's)
    keep_best: bool = False
    # stop after this many epochs without a better validation macro AUROC (0: run every epoch)
    patience: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise OptionsError(f"optimizer: {self.optimizer!r} is not one of adamw, sgd")
        if self.schedule not in ("constant", "cosine", "warmup-cosine"):
            raise OptionsError(f"schedule: {self.schedule!r} is not one of constant, cosine, warmup-cosine")

    def lr_at(self, global_step: int, epoch: int, steps_per_epoch: int) -> float:
        """Learning rate of the step that follows ``global_step`` finished steps (in ``epoch``)."""
        import math

        if self.schedule == "cosine":
            total = max(steps_per_epoch * self.epochs, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(global_step, total) / total))
        if self.schedule == "warmup-cosine":
            if epoch < self.warmup_epochs:
                return 1e-5
            span = max(self.epochs - self.warmup_epochs, 1)
            return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))
        return self.lr

    def make_optimizer(self, params: list[nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
        """The optimiser over parameters or parameter groups (a group's ``lr_scale`` multiplies the schedule's
        learning rate for it; a group may set its own ``weight_decay``)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class TrainingData:
    """What a method is fitted on: the cache (``read(rows, names) -> {name: tensor}``), every image's targets
    (NaN = unknown), the training/validation rows, and every image's report text (or None)."""

    cache: Any
    targets: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    reports: list | None = None


# ------------------------------------------------------------------------------------------------ options
def option_fields(config_class: type) -> list[dataclasses.Field]:
    """The user-settable fields of an options dataclass (those not marked ``metadata={"internal": True}``)."""
    return [f for f in dataclasses.fields(config_class) if not f.metadata.get("internal")]


def _coerce(name: str, kind: str, value: Any) -> Any:
    """A value checked against its field's type (numbers/booleans given as text cast); errors name the option."""
    from ..fieldcheck import FieldTypeError, check_value

    try:
        return check_value(name, value, kind)
    except FieldTypeError as exc:
        raise OptionsError(str(exc)) from None


def parse_options(config_class: type, options: dict | None, where: str = "options", **internal) -> Any:
    """An options dataclass from a user dict: unknown keys name the allowed ones, numbers given as text are
    cast, and the dataclass's own validation errors are prefixed with ``where``."""
    options = dict(options or {})
    allowed = {f.name: f for f in option_fields(config_class)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise OptionsError(f"{where}.{unknown[0]}: unknown option; allowed: {sorted(allowed)}")
    values = {k: _coerce(f"{where}.{k}", str(allowed[k].type), v) for k, v in options.items()}
    try:
        return config_class(**values, **internal)
    except OptionsError as exc:
        raise OptionsError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise OptionsError(f"{where}: {exc}") from exc


def describe_options(config_class: type) -> list[dict]:
    """Name, type, default and help of every option (for ``medbridge list methods --json`` and the docs)."""
    out = []
    for f in option_fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        out.append({"name": f.name, "type": str(f.type), "default": default, "help": f.metadata.get("help", "")})
    return out


def options_dict(options: Any) -> dict:
    """The user-settable fields of an options dataclass instance as plain JSON-able values."""
    out = {}
    for f in option_fields(type(options)):
        v = getattr(options, f.name)
        out[f.name] = v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v) if dataclasses.is_dataclass(
            v) else v
    return out


# ------------------------------------------------------------------------------------------------ the interface
#: the hooks every method implements (abstract: a class missing one cannot be registered or built)
REQUIRED_HOOKS = ("cache_spec", "scores_cached", "scores_views")
#: the shared training loop's hooks, required unless the method derives from :class:`ClosedFormFit`
LOOP_HOOKS = ("read_batch", "training_loss")


class Method(nn.Module, metaclass=ABCMeta):
    """A trainable classifier on frozen backbones, for a list of labels.

    Set by :func:`register_method`: ``name`` and ``options_class``. A subclass implements the abstract
    :meth:`cache_spec`, :meth:`scores_cached` and :meth:`scores_views`, and either derives from
    :class:`ClosedFormFit` (:meth:`ClosedFormFit.fit_closed_form`) or implements :meth:`read_batch` +
    :meth:`training_loss` (+ :meth:`optimization`) for the shared loop, which gives it checkpoints, ``--resume``,
    torchrun data parallelism, bf16 autocast on GPU and a NaN guard. Optional capabilities are the mixins below
    (:class:`Explainable`, :class:`TextPrompted`, :class:`ClosedFormFit`); the engine checks them, never a class.
    """

    name: ClassVar[str] = ""
    options_class: ClassVar[type] = object
    #: sub-folder of a run folder the method is saved in (default: its name)
    folder_name: ClassVar[str | None] = None
    #: scores any label names through text prompts (derived: True for :class:`TextPrompted` methods)
    text_prompted: ClassVar[bool] = False
    #: its fit depends on the training seed (initialisation, batch order): ``train.ensemble`` trains several
    seed_dependent: ClassVar[bool] = True
    #: under ``data.unit: case`` the method reads a case as ONE input whose views are those of all its images (its
    #: own view pooling combines them: MedBridge). False (default rule): each image is scored alone, trained with
    #: its case's labels, and a case's score is the sigmoid of the mean of its images' logits (engine/cases.py)
    case_views: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.text_prompted = issubclass(cls, TextPrompted)

    def __init__(self, options: Any, backbones: list[Backbone], labels: list[str], prompt_names: list[str],
                 focal: FocalConfig) -> None:
        super().__init__()
        self.options = options
        self.frozen_backbones = nn.ModuleList(backbones)  # registered so that .to(device) moves them
        self.labels = list(labels)
        self.prompt_names = list(prompt_names)
        self.focal = focal

    # -- construction
    @classmethod
    def build(cls, options: Any, backbones: list[Backbone], labels: list[str], prompt_names: list[str],
              focal: FocalConfig) -> Method:
        """A new, untrained method (``options`` an instance of ``options_class``)."""
        return cls(options, backbones, labels, prompt_names, focal)

    @classmethod
    def check_options(cls, options: dict | None, where: str = "options") -> Any:
        """Validate user options (config time, before any backbone is built)."""
        return parse_options(cls.options_class, options, where)

    def saved_options(self) -> dict:
        """What :meth:`build` needs again when the method is loaded (written into ``adapter.json``)."""
        return options_dict(self.options)

    # -- what the engine needs
    @property
    def backbones(self) -> list[Backbone]:
        return list(self.frozen_backbones)

    @property
    def preprocess(self) -> list[PreprocessConfig]:
        return [b.vision.preprocess for b in self.backbones]

    @classmethod
    def folder(cls) -> str:
        return cls.folder_name or cls.name

    @abstractmethod
    def cache_spec(self, n_views: int) -> CacheSpec:
        """What frozen activations to cache for ``n_views`` views per image (required)."""

    def reads(self, spec: CacheSpec, n_views: int) -> bool:
        """Whether this method can read its inputs from another method's cache (a companion method fitted beside
        the run's method reuses its cache when it can); default: the same cache."""
        return spec.parts == self.cache_spec(n_views).parts

    @abstractmethod
    def scores_cached(self, cache: Any, rows: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Sigmoid scores [len(rows), L] from cached activations (required)."""

    @abstractmethod
    def scores_views(self, pixels: list[Tensor]) -> tuple[np.ndarray, dict]:
        """Scores [B, L] from views (one tensor [B, N, 3, S, S] per backbone) and details for explanations
        (required)."""

    def predict(self, images: list, batch_size: int = 8, device: str = "auto", workers: int | None = None,
                amp: bool = True, progress: bool = False) -> np.ndarray:
        """Probabilities [len(images), L] for image files (PNG, JPEG, DICOM) or arrays in [0, 1] (H x W), in
        batches on ``device`` (auto: CUDA when present; bf16 autocast there unless ``amp=False``), decoding in
        ``workers`` processes (default: from the machine's cores)."""
        from .inference import iter_scored, resolve_device

        dev = resolve_device(device, "device")
        out = [s.scores for s in iter_scored(self, images, batch_size=batch_size, device=dev, workers=workers,
                                             amp=amp, progress=progress)]
        return np.stack(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict_case(self, images: list) -> np.ndarray:
        """Probabilities [L] of ONE case made of several image files (a patient's two fundus photographs, a study's
        PA and lateral): with ``case_views`` the views of all images are scored together, else the mean of the
        images' logits (the rule training used under ``data.unit: case``)."""
        from ..data.cases import mean_logit
        from ..data.focal import focal_views, read_view_image

        if not images:
            raise ValueError("a case needs at least one image")
        views = []
        for x in images:
            image, full = (x, None) if isinstance(x, np.ndarray) else read_view_image(x, self.focal, self.preprocess)
            views.append(focal_views(image, self.focal, self.preprocess, full_size=full))
        with torch.no_grad():
            if self.case_views:
                pixels = [torch.cat([v[k].pixels for v in views]).unsqueeze(0) for k in range(len(self.preprocess))]
                return self.scores_views(pixels)[0][0]
            per_image = [self.scores_views([e.pixels.unsqueeze(0) for e in v])[0][0] for v in views]
        return mean_logit(np.stack(per_image))

    # -- fitting
    def prepare(self, data: TrainingData) -> None:
        """Deterministic set-up from the training data before fitting (statistics, label-free init); runs again
        on resume, before the checkpoint is restored."""

    def optimization(self, defaults: Optimization) -> Optimization:
        """The loop's optimiser and schedule; ``defaults`` come from the run's ``train`` section."""
        return defaults

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups: ``{"params": [...], "lr_scale": s, "weight_decay": w}`` (``lr_scale``
        and ``weight_decay`` optional); default: one group of every trainable parameter."""
        return [{"params": list(self.trainable_parameters().values())}]

    def read_batch(self, cache: Any, rows: np.ndarray, device: str) -> Any:
        """A training batch of cached inputs for ``rows`` on ``device`` (the shared loop)."""
        raise NotImplementedError(f"{self.name} does not train through the shared loop")

    def training_loss(self, batch: Any, targets: Tensor, reports: list | None) -> Tensor:
        """The loss of one batch (the shared loop)."""
        raise NotImplementedError(f"{self.name} does not train through the shared loop")

    def training_step(self, batch: Any, targets: Tensor, reports: list | None, optimizer: torch.optim.Optimizer,
                      reduce_gradients: Callable[[list[nn.Parameter]], None],
                      autocast: Callable[[], AbstractContextManager]) -> Tensor:
        """One optimiser step; the default is loss -> backward -> gradient all-reduce -> step."""
        with autocast():
            loss = self.training_loss(batch, targets, reports)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reduce_gradients(list(self.trainable_parameters().values()))
        optimizer.step()
        return loss.detach()

    # -- what is saved
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything the saved file holds (trainable tensors and fitted statistics; never a frozen backbone)."""
        return dict(self.trainable_parameters())

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str = "weights") -> None:
        """Copy saved tensors in, refusing missing/unexpected names and wrong shapes (naming ``source``)."""
        from ..io import CorruptFileError

        own = self.state_tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise CorruptFileError(f"{source}: does not fit this {self.name} ({len(self.labels)} labels): missing "
                                   f"{missing[:4]}, unexpected {unexpected[:4]}")
        wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
                 if tuple(v.shape) != tuple(tensors[k].shape)]
        if wrong:
            raise CorruptFileError(f"{source}: shapes do not fit this {self.name} with {len(self.labels)} labels: "
                                   + ", ".join(wrong[:4]))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(tensors[k])

    def backbone_fingerprints(self) -> list[dict]:
        """What the saved method records of its backbones and checks when loaded (the pretrained weights it was
        built on; a fine-tuned tower's own copy is saved in its tensors)."""
        from ..backbones.base import backbone_fingerprint

        return [backbone_fingerprint(b) for b in self.backbones]

    def info(self) -> dict:
        """Facts saved beside the weights and reported (e.g. the probe's chosen C)."""
        return {}

    def restore_info(self, info: dict) -> None:
        """Receive :meth:`info` back when the method is loaded."""

    def num_trainable(self) -> int:
        return int(sum(p.numel() for p in self.trainable_parameters().values()))


# ------------------------------------------------------------------------------------------------ capabilities
class ClosedFormFit(ABC):
    """Capability: fits without the mini-batch loop (the probe, LP++, zero-shot)."""

    @abstractmethod
    def fit_closed_form(self, data: TrainingData) -> dict | None:
        """Fit and return what to log; None: this configuration trains through the shared loop instead."""


class TextPrompted(ABC):
    """Capability: scores any label names through text prompts (``eval --label-space data``)."""

    @abstractmethod
    def with_label_names(self, labels: list[str], prompt_names: list[str]) -> Method:
        """The same trained method scoring other label names."""


class Explainable(ABC):
    """Capability: gradient x activation explanations on the frozen towers' tokens (``predict --explain``, serve)."""

    def explain_top_block(self, expert: int) -> int:
        """The deepest block whose input tokens every path of the method still sees (for expert ``expert``)."""
        return self.backbones[expert].vision.depth - 1  # type: ignore[attr-defined]

    @abstractmethod
    def logits_from_tokens(self, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
        """Logits [b, L] from the frozen tokens entering block ``layers[k]`` of each expert ([b*n, T, width],
        ``n`` views per image), differentiable with respect to those tokens."""


class FitsMembers(ABC):
    """Capability: made of ``members`` (methods) that the engine fits one after another, member i with the training
    seed + i in ``member-i/`` (seed ensembles)."""

    members: nn.ModuleList


#: the optional capabilities a method class may declare (``medbridge list methods --json`` lists them)
CAPABILITIES: tuple[type, ...] = (ClosedFormFit, TextPrompted, Explainable)


def missing_hooks(method_class: type) -> list[str]:
    """The hooks ``method_class`` lacks to be registered: abstract ones, and the shared loop's unless it fits in
    closed form."""
    missing = sorted(getattr(method_class, "__abstractmethods__", ()))
    if not issubclass(method_class, ClosedFormFit):
        missing += [h for h in LOOP_HOOKS if getattr(method_class, h) is getattr(Method, h)]
    return missing


def require(method: Method, capability: type, what: str) -> None:
    """Refuse ``what`` for a method without ``capability`` (one line naming the method and the missing hook)."""
    if not isinstance(method, capability):
        hooks = sorted(getattr(capability, "__abstractmethods__", ()))
        raise NotApplicableError(f"{method.name} does not support {what}: it does not implement {', '.join(hooks)} "
                                 f"(medbridge.methods.api.{capability.__name__})")


__all__ = ["CAPABILITIES", "LOOP_HOOKS", "REQUIRED_HOOKS", "CacheSpec", "ClosedFormFit", "Explainable", "FitsMembers",
           "Method", "NonFiniteLoss", "NotApplicableError", "Optimization", "OptionsError", "TextPrompted",
           "TrainingData", "describe_options", "missing_hooks", "option_fields", "options_dict", "parse_options",
           "require"]
