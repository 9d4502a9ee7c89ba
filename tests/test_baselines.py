"""Baselines on a tiny random CLIP (specs/baselines.md section 12): the invariants that make them faithful."""

from __future__ import annotations

import pytest
import torch

from medbridge.backbones.tiny import tiny_open_clip
from medbridge.engine.metrics import auroc
from medbridge.methods.baselines import (
    BASELINES,
    CoCoOp,
    CoOp,
    KgCoOp,
    LPText,
    NotApplicableError,
    ProGrad,
    build_baseline,
)

LABELS = ["Effusion", "Pneumonia", "Cardiomegaly"]
NAMES = ["pleural effusion", "pneumonia", "cardiomegaly"]


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip("ViT-B-16-quickgelu", layers=12)


@pytest.fixture(scope="module")
def data(clip):
    torch.manual_seed(0)
    v = clip.vision
    with torch.no_grad():
        feats = v.finalize(v.run_blocks(v.embed(torch.randn(24, 3, 32, 32)), 0))
    targets = (torch.rand(24, 3) < 0.4).float()
    targets[0], targets[1] = 1, 0
    return feats, targets


@pytest.fixture(scope="module")
def prefix(clip):
    """Vision tokens after block 4 (what MMA trains on) and the pooled features of the same images."""
    torch.manual_seed(1)
    v = clip.vision
    with torch.no_grad():
        tokens = v.run_blocks(v.embed(torch.randn(12, 3, 32, 32)), 0, 4)
        return tokens, v.finalize(v.run_blocks(tokens, 4))


def zero_shot_logits(clip, feats):
    zs = build_baseline("zero-shot", clip, LABELS, NAMES)
    zs.init_from_features(feats)
    return zs(feats), zs


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_trainable_set_step_and_frozen_backbone(name, clip, data, prefix):
    feats, targets = data
    if name in ("mma", "mmrl"):  # trained on cached vision tokens after block 4 / 5
        v = clip.vision
        feats = prefix[0] if name == "mma" else v.run_blocks(prefix[0], 4, 5).detach()
        targets = targets[:12]
    method = build_baseline(name, clip, LABELS, NAMES)
    method.init_from_features(feats)
    expected = {"zero-shot": set(), "coop": {"prompt.ctx", "head.bias"}, "kgcoop": {"prompt.ctx", "head.bias"},
                "prograd": {"prompt.ctx", "head.bias"},
                "cocoop": {"prompt.ctx", "head.bias", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                           "meta_net.2.bias"},
                "clip-adapter": {"adapter.0.weight", "adapter.2.weight", "head.bias"},
                "lp-text": {"weight", "bias", "alpha"},
                "mma": {f"{m}.{k}.{w}" for m in ("text_down", "text_up", "vis_down", "vis_up", "shared")
                        for k in range(8) for w in ("weight", "bias")} | {"head.bias"},
                "mmrl": {f"{m}.{k}.{w}" for m in ("to_text", "to_vision") for k in range(7)
                         for w in ("weight", "bias")} | {"rep", "rep_proj", "head.bias"}}[name]
    assert set(method.trainable_parameters()) == expected
    logits = method(feats)
    assert logits.shape == (len(feats), 3) and torch.isfinite(logits).all()
    if not expected:
        return
    before_backbone = {k: v.clone() for k, v in clip.state_dict().items()}
    before = {k: v.detach().clone() for k, v in method.trainable_parameters().items()}
    if name == "lp-text":
        method.init_weights(feats, targets)
        before = {k: v.detach().clone() for k, v in method.trainable_parameters().items()}
    opt = torch.optim.SGD(method.trainable_parameters().values(), lr=0.1)
    method.train_step(feats, targets, opt)
    for k, v in method.trainable_parameters().items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
    assert any(not torch.equal(v, before[k]) for k, v in method.trainable_parameters().items())
    assert all(torch.equal(v, before_backbone[k]) for k, v in clip.state_dict().items())
    if name == "mma":
        method.remove_hooks()  # the module-scoped tiny CLIP is shared with the other tests


def test_coop_from_template_equals_zero_shot(clip, data):
    feats, _ = data
    zs_logits, zs = zero_shot_logits(clip, feats)
    coop = CoOp(clip, LABELS, NAMES)
    coop.init_from_features(feats)
    torch.testing.assert_close(coop.text_features(), zs.text_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coop(feats), zs_logits, atol=1e-4, rtol=1e-5)
    random = CoOp(clip, LABELS, NAMES, init=None, n_ctx=16, class_specific=True)
    assert random.prompt.ctx.shape == (3, 16, clip.text.width)
    assert not torch.allclose(random.text_features(), zs.text_features, atol=1e-3)


def test_cocoop_with_zero_meta_net_equals_coop(clip, data):
    feats, _ = data
    coop, cocoop = CoOp(clip, LABELS, NAMES, n_ctx=4), CoCoOp(clip, LABELS, NAMES)
    for m in (coop, cocoop):
        m.init_from_features(feats)
    with torch.no_grad():
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
    torch.testing.assert_close(cocoop(feats[:4]), coop(feats[:4]), atol=1e-4, rtol=1e-5)


def test_prograd_never_conflicts_with_the_teacher(clip, data):
    feats, targets = data
    method = ProGrad(clip, LABELS, NAMES)
    method.init_from_features(feats)
    with torch.no_grad():
        method.prompt.ctx.add_(torch.randn_like(method.prompt.ctx) * 0.5)  # move away from the teacher
    with torch.no_grad():
        method.head.bias.add_(3.0)  # student more positive than the teacher ...
    targets = torch.ones_like(targets)  # ... and labels pushing further up: the bias gradients conflict
    params = list(method.trainable_parameters().values())
    logits = method(feats)
    task = method.loss(logits, targets)
    guide = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.sigmoid(method.teacher_logits(feats)))
    g_d = torch.autograd.grad(task, params, retain_graph=True)
    g_g = torch.autograd.grad(guide, params)
    _, projected = method.projected_gradients(feats, targets)
    conflicts = 0
    for gd, gg, g in zip(g_d, g_g, projected):
        assert (g * gg).sum() >= -1e-6 * gg.norm() * g.norm()
        if (gd * gg).sum() >= 0:
            torch.testing.assert_close(g, gd)
        else:
            conflicts += 1
    assert conflicts > 0  # the perturbation made the task and teacher gradients disagree somewhere


def test_kgcoop_regulariser_zero_at_init(clip, data):
    feats, _ = data
    method = KgCoOp(clip, LABELS, NAMES)
    assert float(method.knowledge_loss().detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        method.prompt.ctx.add_(torch.randn_like(method.prompt.ctx))
    assert float(method.knowledge_loss().detach()) > 1e-3


def test_clip_adapter_zero_w2_equals_zero_shot(clip, data):
    feats, _ = data
    zs_logits, _ = zero_shot_logits(clip, feats)
    method = build_baseline("clip-adapter", clip, LABELS, NAMES)
    method.init_from_features(feats)
    with torch.no_grad():
        method.adapter[2].weight.zero_()
    # W2 = 0: f' = (1 - a) f, a positive rescaling: cosine unchanged
    torch.testing.assert_close(method(feats), zs_logits, atol=1e-4, rtol=1e-5)


def test_lp_text_with_zero_linear_part_ranks_like_zero_shot(clip, data):
    feats, targets = data
    zs_logits, _ = zero_shot_logits(clip, feats)
    method = LPText(clip, LABELS, NAMES)
    method.init_weights(feats, targets)
    with torch.no_grad():
        method.weight.zero_()
        method.bias.zero_()
    out = method(feats).detach().numpy()
    for j in range(3):
        y = targets[:, j].numpy()
        assert auroc(out[:, j], y) == pytest.approx(auroc(zs_logits[:, j].detach().numpy(), y), abs=1e-9)
    info = method.fit_features(feats, targets, feats, targets, method.default_hparams)
    assert info["best_val_auroc"] > 0.5


def test_fit_save_load_round_trip(clip, data, tmp_path):
    """CoOp through the shared loop on cached features, saved in the one method format and loaded back."""
    import numpy as np

    from medbridge.engine.config import TrainConfig
    from medbridge.engine.trainer import fit_method
    from medbridge.methods import TrainingData, create_method, load_method, save_method

    feats, targets = data
    method = create_method("coop", {"epochs": 3, "batch_size": 8, "lr": 0.01}, backbones=[clip], labels=LABELS,
                           prompt_names=NAMES)
    cache = FeatureRows({"e0.frozen": feats[:, None]})
    rows = np.arange(len(feats))
    hist = fit_method(method, TrainingData(cache, targets.numpy(), rows, rows), TrainConfig(seed=0, checkpoint_every=0),
                      tmp_path / "run", progress_bar=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    save_method(method, tmp_path / "coop")
    again = load_method(tmp_path / "coop", [clip])
    np.testing.assert_array_equal(again.scores_cached(cache, rows), method.scores_cached(cache, rows))


class FeatureRows:
    """A cache stand-in holding the rows in memory (``read(rows, names)`` like FeatureCache)."""

    def __init__(self, arrays: dict) -> None:
        self.arrays = {k: v.half() for k, v in arrays.items()}

    def read(self, rows, names=None):
        return {k: v[rows] for k, v in self.arrays.items() if names is None or k in names}


def test_text_methods_refuse_unaligned_backbones(data):
    from medbridge.backbones.base import Backbone
    from medbridge.backbones.registry import tiny_builders

    b = tiny_builders()
    unaligned = Backbone("dino+bert", b["tiny-hf-dinov2"]().vision, b["tiny-hf-clip"]().text, aligned=False)
    for name in sorted(BASELINES):
        with pytest.raises(NotApplicableError, match=f"{name} needs a CLIP-style backbone"):
            build_baseline(name, unaligned, LABELS, NAMES)


def test_mma_zero_up_projection_equals_zero_shot_and_early_blocks_untouched(clip, prefix):
    from medbridge.methods.baselines import MMA

    tokens, pooled = prefix
    zs = build_baseline("zero-shot", clip, LABELS, NAMES)
    zs.init_from_features(pooled)
    mma = MMA(clip, LABELS, NAMES)
    try:
        mma.init_from_features(tokens)
        with torch.no_grad():
            for up in (*mma.text_up, *mma.vis_up):
                up.weight.zero_()
                up.bias.zero_()
        torch.testing.assert_close(mma(tokens), zs(pooled), atol=1e-4, rtol=1e-5)
        with torch.no_grad():  # non-zero adapters: blocks 1-4 still give the same tokens, later blocks differ
            for up in (*mma.text_up, *mma.vis_up):
                up.weight.normal_()
        v = clip.vision
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad(), mma.adapters_on():
            early_on, late_on = v.run_blocks(v.embed(x), 0, 4), v.run_blocks(v.embed(x), 0)
        with torch.no_grad():
            early_off, late_off = v.run_blocks(v.embed(x), 0, 4), v.run_blocks(v.embed(x), 0)
        assert torch.equal(early_on, early_off) and not torch.allclose(late_on, late_off)
        torch.testing.assert_close(mma(tokens), mma(tokens))  # hooks only act inside forward: no drift
        # the gradient trick: adapter gradients are the plain gradients times 1/s
        loss = mma(tokens).sum()
        params = mma.adapter_parameters()
        g_trick = torch.autograd.grad(loss, params, retain_graph=True)
        mma.grad_trick = False
        g_plain = torch.autograd.grad(loss, params)
        for a, b in zip(g_trick, g_plain):
            torch.testing.assert_close(a, b / mma.scale)
    finally:
        mma.remove_hooks()


def test_mmrl_sequence_lengths_and_untouched_early_blocks(clip, prefix):
    from medbridge.methods.baselines import MMRL

    v, t = clip.vision, clip.text
    tokens5 = v.run_blocks(prefix[0], 4, 5).detach()
    method = MMRL(clip, LABELS, NAMES, num_tokens=5)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs[0].shape[1])
        return hook

    handles = [blk.register_forward_hook(record(f"v{i}")) for i, blk in enumerate(v.blocks)]
    handles += [blk.register_forward_hook(record(f"t{i}")) for i, blk in enumerate(t.blocks)]
    try:
        logits = method(tokens5)
    finally:
        for h in handles:
            h.remove()
    n_vis = tokens5.shape[1]
    assert logits.shape == (12, 3) and torch.isfinite(logits).all()
    assert all(f"v{i}" not in seen for i in range(5))  # vision blocks 1-5 never run with MMRL's tokens
    assert all(seen[f"v{i}"] == n_vis + 5 for i in range(5, 12))  # 17 + K from block 6
    assert seen["t4"] == 77 and all(seen[f"t{i}"] == 77 + 5 for i in range(5, 12))  # 77 + K from block 6
    # with the inserted tokens' maps at zero the class path sees zero tokens; the loss has the regulariser
    loss = method.loss_terms(tokens5, (torch.rand(12, 3) < 0.5).float())
    assert torch.isfinite(loss)
    loss.backward()
    assert method.rep.grad is not None and method.to_text[0].weight.grad is not None
