"""Text prompt learners on a frozen CLIP: CoOp, CoCoOp, KgCoOp, ProGrad (specs/baselines.md sections 2-5).

Learned context vectors replace the word embeddings of placeholder tokens in "X X ... X <class name>." and the
prompt runs through the frozen text tower from embeddings (``TextTower.encode_embeddings``): no forked text
encoder. Initialised from the template phrase ("a radiology image with"), the prompt equals the zero-shot prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.base import Backbone, TextTower
from ..api import NonFiniteLoss
from ..prompts import DEFAULT_TEMPLATE
from .base import ClipHead, FeatureMethod, Hparams, backbone_scale, require_aligned_text, zero_shot_text


def _real_ids(text: TextTower, phrase: str) -> list[int]:
    tok = text.tokenize([phrase])
    return tok.input_ids[0][tok.attention_mask[0].bool()].tolist()


def phrase_span(text: TextTower, phrase: str) -> tuple[int, list[int]]:
    """(start position, token ids) of ``phrase``'s own tokens inside its tokenization (after BOS/CLS)."""
    empty, ids = _real_ids(text, ""), _real_ids(text, phrase)
    start = 0
    while start < min(len(empty), len(ids)) and empty[start] == ids[start]:
        start += 1
    return start, ids[start:len(ids) - (len(empty) - start)]


class PromptLearner(nn.Module):
    """Context vectors ``ctx`` [M, width] (or [L, M, width] class-specific) inserted before each class name."""

    def __init__(self, text: TextTower, names: list[str], init: str | None = DEFAULT_TEMPLATE.split(" {}")[0],
                 n_ctx: int = 16, class_specific: bool = False, suffix: str = ".") -> None:
        super().__init__()
        self.text = text
        if init:
            start, ids = phrase_span(text, init)
            with torch.no_grad():
                emb = text.token_embeddings(text.tokenize([init]))[0, start:start + len(ids)].detach().clone()
            n_ctx = len(ids)
        else:
            emb = torch.randn(n_ctx, text.width) * 0.02
        ctx = emb.unsqueeze(0).repeat(len(names), 1, 1) if class_specific else emb
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = n_ctx
        placeholder = " ".join(["X"] * n_ctx)
        self.tokens = text.tokenize([f"{placeholder} {n}{suffix}" for n in names])
        x_start, x_ids = phrase_span(text, "X")
        ids = self.tokens.input_ids
        pos = (ids == x_ids[0]).int().argmax(dim=1)
        if not (pos == pos[0]).all() or not (ids[:, pos[0]:pos[0] + n_ctx] == x_ids[0]).all():
            raise ValueError("could not locate the prompt placeholder tokens in every class prompt")
        self.start = int(pos[0])
        with torch.no_grad():
            self.register_buffer("embeddings", text.token_embeddings(self.tokens).detach().clone(), persistent=False)

    def forward(self, shift: Tensor | None = None) -> Tensor:
        """Projected class text features [L, E]; with a per-image context ``shift`` [B, width]: [B, L, E]."""
        emb = self.embeddings.to(self.ctx.device)
        n_cls = emb.shape[0]
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.unsqueeze(0).expand(n_cls, -1, -1)
        if shift is None:
            full = torch.cat([emb[:, :self.start], ctx.to(emb.dtype), emb[:, self.start + self.n_ctx:]], dim=1)
            return self.text.encode_embeddings(full, self.tokens.to(emb.device)).projected
        b = shift.shape[0]
        ctx_b = ctx.unsqueeze(0) + shift[:, None, None, :]  # [B, L, M, width]
        emb_b = emb.unsqueeze(0).expand(b, -1, -1, -1)
        full = torch.cat([emb_b[:, :, :self.start], ctx_b.to(emb.dtype), emb_b[:, :, self.start + self.n_ctx:]], 2)
        tokens = self.tokens.to(emb.device)
        from ...backbones.base import TextTokens

        flat = TextTokens(tokens.input_ids.repeat(b, 1), tokens.attention_mask.repeat(b, 1))
        out = self.text.encode_embeddings(full.flatten(0, 1), flat).projected
        return out.view(b, n_cls, -1)


class CoOp(FeatureMethod):
    """CoOp (Zhou et al., IJCV 2022): learn the prompt context; z = s cos(f, g([SOS, ctx, name, ., EOS])) + b."""

    name = "coop"
    default_hparams = Hparams(optimizer="sgd", lr=0.002, epochs=50, batch_size=32)

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE, init: str | None = "auto",
                 n_ctx: int = 16, class_specific: bool = False) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        for p in text.parameters():
            p.requires_grad_(False)
        init = template.split(" {}")[0] if init == "auto" else init
        self.prompt = PromptLearner(text, self.names, init, n_ctx, class_specific, suffix=template.split("{}")[1])
        self.register_buffer("zs_text", zero_shot_text(text, self.names, template))
        self.head = ClipHead(len(labels), backbone_scale(backbone))
        self._init, self._n_ctx, self._csc = init, n_ctx, class_specific

    def init_from_features(self, features: Tensor) -> None:
        self.head.init_bias(features, self.zs_text)

    def text_features(self) -> Tensor:
        return self.prompt()

    def forward(self, features: Tensor) -> Tensor:
        self._text = self.text_features()
        return self.head(features, self._text)

    def config(self) -> dict:
        return {"init": self._init, "n_ctx": self._n_ctx, "class_specific": self._csc}


class KgCoOp(CoOp):
    """KgCoOp (Yao et al., CVPR 2023): CoOp + W * (1 - mean_j cos(w_j, w_j^zs)), W = 8 (the code's form)."""

    name = "kgcoop"
    default_hparams = Hparams(optimizer="sgd", lr=0.002, epochs=50, batch_size=128, extra={"W": 8.0})

    def __init__(self, *args, weight: float = 8.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight = weight

    def knowledge_loss(self, text: Tensor | None = None) -> Tensor:
        text = self.text_features() if text is None else text
        return self.weight * (1 - F.cosine_similarity(text, self.zs_text, dim=-1).mean())

    def extra_loss(self) -> Tensor | None:
        return self.knowledge_loss(self._text)


class CoCoOp(CoOp):
    """CoCoOp (Zhou et al., CVPR 2022): a meta-net h(f^) shifts the context per image (B x L text passes)."""

    name = "cocoop"
    default_hparams = Hparams(optimizer="sgd", lr=0.002, epochs=10, batch_size=8)

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE, init: str | None = "auto",
                 n_ctx: int = 4) -> None:
        super().__init__(backbone, labels, names, template, init, n_ctx)
        e, w = self.zs_text.shape[1], backbone.text.width
        self.meta_net = nn.Sequential(nn.Linear(e, max(e // 16, 1)), nn.ReLU(), nn.Linear(max(e // 16, 1), w))

    def forward(self, features: Tensor) -> Tensor:
        shift = self.meta_net(F.normalize(features, dim=-1))
        self._text = self.prompt(shift)
        return self.head(features, self._text)


class ProGrad(CoOp):
    """ProGrad (Zhu et al., ICCV 2023): keep only the part of the task gradient that does not conflict with the
    gradient towards the zero-shot teacher (per parameter tensor); the teacher loss itself is never added."""

    name = "prograd"
    default_hparams = Hparams(optimizer="sgd", lr=0.002, epochs=50, batch_size=32, extra={"lambda": 1.0, "T": 1.0})

    def __init__(self, *args, lam: float = 1.0, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lam, self.temperature = lam, temperature

        self.register_buffer("bias0", torch.zeros(len(self.labels)))

    def init_from_features(self, features: Tensor) -> None:
        super().init_from_features(features)
        self.bias0.copy_(self.head.bias.detach())

    def teacher_logits(self, features: Tensor) -> Tensor:
        """The frozen zero-shot teacher: s cos(f, w^zs) + b0 (the initial bias)."""
        with torch.no_grad():
            return self.head.scale * self.head.cosine(features, self.zs_text) + self.bias0

    def projected_gradients(self, features: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        params = list(self.trainable_parameters().values())
        logits = self(features)
        task = self.loss(logits, targets)
        t = self.temperature
        guide = t * t * F.binary_cross_entropy_with_logits(logits / t, torch.sigmoid(self.teacher_logits(features) / t))
        g_d = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
        g_g = torch.autograd.grad(guide, params, allow_unused=True)
        out = []
        for p, gd, gg in zip(params, g_d, g_g):
            gd = torch.zeros_like(p) if gd is None else gd
            if gg is not None:
                dot = (gd * gg).sum()
                if dot < 0:
                    gd = gd - self.lam * dot / gg.pow(2).sum().clamp_min(1e-12) * gg
            out.append(gd)
        return task.detach(), out

    def train_step(self, features, targets, optimizer, reduce_gradients=None):
        """The projection is per process; under data parallelism the projected gradients are then averaged."""
        loss, grads = self.projected_gradients(features, targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        params = list(self.trainable_parameters().values())
        for p, g in zip(params, grads):
            p.grad = g
        if reduce_gradients is not None:
            reduce_gradients(params)
        optimizer.step()
        return loss
