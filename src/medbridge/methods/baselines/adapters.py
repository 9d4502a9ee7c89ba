"""Feature-space adapters on a frozen CLIP: CLIP-Adapter and LP + text (LP++ blend), specs sections 7-8."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.base import Backbone
from ..heads import masked_bce
from ..prompts import DEFAULT_TEMPLATE
from .base import ClipHead, FeatureMethod, Hparams, backbone_scale, require_aligned_text, zero_shot_text


class ClipAdapter(FeatureMethod):
    """CLIP-Adapter (Gao et al., IJCV 2024): f' = a A(f) + (1 - a) f, A(f) = ReLU(W2 ReLU(W1 f)) (no biases,
    hidden D/4), z = s cos(f', w^zs) + b. W2 = 0 or a = 0 gives exactly zero-shot."""

    name = "clip-adapter"
    default_hparams = Hparams(optimizer="sgd", lr=0.01, epochs=50, batch_size=32)

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE,
                 ratio: float = 0.2, reduction: int = 4) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        self.register_buffer("zs_text", zero_shot_text(text, self.names, template))
        d = self.zs_text.shape[1]
        self.adapter = nn.Sequential(nn.Linear(d, d // reduction, bias=False), nn.ReLU(),
                                     nn.Linear(d // reduction, d, bias=False), nn.ReLU())
        self.ratio = ratio
        self.head = ClipHead(len(labels), backbone_scale(backbone))

    def init_from_features(self, features: Tensor) -> None:
        self.head.init_bias(features, self.zs_text)

    def forward(self, features: Tensor) -> Tensor:
        adapted = self.ratio * self.adapter(features) + (1 - self.ratio) * features
        return self.head(adapted, self.zs_text)

    def config(self) -> dict:
        return {"ratio": self.ratio}


class LPText(FeatureMethod):
    """LP + text (Shakeri et al., MICCAI 2024; the LP++ blend): z_k = w_k.f + b_k + alpha_k (t_k.f) on
    L2-normalised f and zero-shot text t_k. Full-batch: W, b by SGD (momentum 0.9, lr 4N / lambda_max(F^T F)),
    alpha by a gradient step every 10 epochs (lr N / (4 max_k sum_i (f_i.t_k)^2)); best validation epoch."""

    name = "lp-text"
    seed_dependent = False  # full-batch from a data-derived initialisation
    default_hparams = Hparams(optimizer="sgd", epochs=200, extra={"alpha_every": 10, "accumulate_alpha_grad": False})

    def __init__(self, backbone: Backbone, labels, names, template: str = DEFAULT_TEMPLATE) -> None:
        super().__init__(backbone, labels, names, template)
        text = require_aligned_text(backbone, self.name)
        self.register_buffer("zs_text", F.normalize(zero_shot_text(text, self.names, template), dim=-1))
        d, n = self.zs_text.shape[1], len(labels)
        self.weight = nn.Parameter(torch.zeros(n, d))
        self.bias = nn.Parameter(torch.zeros(n))
        self.alpha = nn.Parameter(torch.ones(n))

    def forward(self, features: Tensor) -> Tensor:
        f = F.normalize(features, dim=-1)
        return f @ self.weight.T + self.bias + self.alpha * (f @ self.zs_text.T)

    @torch.no_grad()
    def init_weights(self, f: Tensor, y: Tensor) -> None:
        """w_k = sum of positive features, alpha0 = 250 mean (class means . t), b_k centring the initial logits."""
        f = F.normalize(f, dim=-1)
        pos = torch.nan_to_num(y, nan=0.0)
        self.weight.copy_(pos.T @ f)
        counts = pos.sum(0).clamp_min(1)
        means = (pos.T @ f) / counts[:, None]
        alpha0 = 250 * (means @ self.zs_text.T).mean()
        self.alpha.fill_(float(alpha0))
        self.bias.copy_(-(f @ self.weight.T + alpha0 * (f @ self.zs_text.T)).mean(0))

    def fit_features(self, x_train, y_train, x_val, y_val, hp: Hparams) -> dict:
        from ..selection import macro_auroc

        f = F.normalize(x_train, dim=-1)
        n = f.shape[0]
        self.init_weights(x_train, y_train)
        lam_max = torch.linalg.eigvalsh(f.T @ f)[-1].item()
        lr_w = 4 * n / max(lam_max, 1e-12)
        lr_a = n / (4 * ((f @ self.zs_text.T) ** 2).sum(0).max().item() + 1e-12)
        opt = torch.optim.SGD([self.weight, self.bias], lr=lr_w, momentum=0.9)
        every = hp.extra.get("alpha_every", 10)
        accumulate = hp.extra.get("accumulate_alpha_grad", False)
        best, best_state = -1.0, None
        for epoch in range(hp.epochs):
            loss = masked_bce(self(x_train), y_train)
            opt.zero_grad(set_to_none=True)
            if not accumulate and self.alpha.grad is not None and (epoch % every) == 0:
                self.alpha.grad = None
            loss.backward()
            opt.step()
            if (epoch + 1) % every == 0:
                with torch.no_grad():
                    self.alpha -= lr_a * self.alpha.grad
            if x_val is not None and y_val is not None:
                with torch.no_grad():
                    scores = self(x_val).cpu().numpy()
                    score = macro_auroc(scores, y_val.cpu().numpy())
                if np.isfinite(score) and score > best:
                    best, best_state = score, {k: v.clone() for k, v in self.trainable_parameters().items()}
        if best_state is not None:
            with torch.no_grad():
                for k, v in self.trainable_parameters().items():
                    v.copy_(best_state[k])
        return {"lr_w": lr_w, "lr_alpha": lr_a, "best_val_auroc": best}
