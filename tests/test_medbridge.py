"""MedBridge model: trainable set, frozen backbones, isolated-mode exactness, zero-shot equivalence, MoE, round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medbridge.backbones import tiny_builders
from medbridge.data.focal import FocalConfig
from medbridge.methods.heads import masked_bce
from medbridge.methods.medbridge import MedBridgeConfig, MedBridgeMethod, MedBridgeModel, QEncoder
from medbridge.methods.registry import AdapterMismatchError, load_method, save_method

B = tiny_builders()
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
LABELS = ["Effusion", "Pleural_Thickening", "Cardiomegaly"]


def _model(names=("tiny-clip-vit-b-16",), **kw) -> MedBridgeModel:
    torch.manual_seed(0)
    cfg = MedBridgeConfig(labels=LABELS, backbones=list(names), t1=kw.pop("t1", 2),
                          focal=FocalConfig(region_size=16, stride=16), **kw)
    return MedBridgeModel(cfg, [B[n]() for n in names])


def _pixels(model, b=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, 3, p.image_size, p.image_size, generator=g) for p in model.preprocess]


def test_only_adapter_trains_and_backbones_stay_bitwise_equal():
    model = _model(attention="joint")
    before = {n: p.detach().clone() for b in model.backbones for n, p in b.named_parameters()}
    trainable = model.trainable_parameters()
    assert trainable and not any(n.startswith("backbones.") for n in trainable)
    assert all(not p.requires_grad for p in model.backbones.parameters())
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    out = model(_pixels(model))
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    loss = model.loss(out, y)
    loss.backward()
    assert model.encoders[0].queries.grad is not None and model.encoders[0].queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbones.parameters())
    snapshot = {n: p.detach().clone() for n, p in trainable.items()}
    opt.step()
    after = {n: p for b in model.backbones for n, p in b.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(snapshot[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("name", ["tiny-clip-vit-b-16", "tiny-eva02-clip-b-16", "tiny-hf-dinov2", "tiny-timm-vit"])
def test_isolated_mode_frozen_path_equals_plain_backbone(name):
    vision = B[name]().vision
    size = vision.preprocess.image_size
    x = torch.randn(3, 3, size, size)
    for seed in (0, 1):
        enc = QEncoder(vision, t1=2, num_queries=4, attention="isolated")
        with torch.no_grad():
            enc.queries.normal_(generator=torch.Generator().manual_seed(seed))
            frozen, queries = enc(x)
            plain = vision(x)
        torch.testing.assert_close(frozen, plain, atol=1e-5, rtol=1e-5)
        assert queries.shape == (3, 4, vision.embed_dim)


@pytest.mark.parametrize("name", ["tiny-clip-vit-b-16", "tiny-eva02-clip-b-16"])
def test_joint_mode_lets_queries_change_frozen_tokens(name):
    model = _model((name,), attention="joint", num_queries=4)
    size = model.preprocess[0].image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model.encoders[0].queries.mul_(100)
        frozen, _ = model.encoders[0](x)
        plain = model.backbones[0].vision(x)
        assert (frozen - plain).norm() > 1e-3 * plain.norm()


@pytest.mark.parametrize("name", ["tiny-clip-vit-b-16", "tiny-siglip-vit-b-16", "tiny-eva02-clip-b-16", "tiny-hf-clip"])
def test_q0_frozen_only_equals_zero_shot_cosine(name):
    model = _model((name,), num_queries=0, frozen_weight=1.0, logits="cosine", t1=1)
    bb = model.backbones[0]
    size = bb.vision.preprocess.image_size
    x = torch.randn(2, 1, 3, size, size)  # whole image only
    with torch.no_grad():
        out = model([x])
        img = F.normalize(bb.vision.reference_forward(x[:, 0]), dim=-1)
        # names from the one readable-name rule (medbridge.methods.prompts.prompt_name), as a dataset run names them
        prompts = [f"a radiology image with {n}." for n in ["pleural effusion", "pleural thickening", "cardiomegaly"]]
        txt = F.normalize(bb.text.reference_encode(bb.text.tokenize(prompts)), dim=-1)
    assert model.text_head.init == "model text projection"
    torch.testing.assert_close(out.logits, img @ txt.t(), atol=1e-5, rtol=1e-5)


def test_mixture_of_experts_of_different_widths():
    model = _model(("tiny-clip-vit-b-16", "tiny-hf-dinov2", "tiny-timm-vit"), num_queries=2)
    dims = [b.vision.embed_dim for b in model.backbones]
    assert len(set(dims)) > 1
    with torch.no_grad():
        model.mixture.gate.weight.normal_()
    out = model(_pixels(model))
    assert out.gate.shape == (2, 3)
    torch.testing.assert_close(out.gate.sum(-1), torch.ones(2))
    model.loss(out, torch.ones(2, 3)).backward()
    for enc in model.encoders:
        assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0
    assert out.view_votes.shape == (2, 3, 3)


def test_single_expert_has_no_gate():
    model = _model()
    assert model.mixture.gate is None
    out = model(_pixels(model))
    assert torch.equal(out.gate, torch.ones(2, 1))


def test_text_features_cached_and_new_labels_need_no_retraining():
    model = _model()
    with torch.no_grad():
        out = model(_pixels(model))
        assert len(model.text_head._cache) == 1
        model(_pixels(model))
        assert len(model.text_head._cache) == 1
        new = model(_pixels(model), labels=["Pneumonia", "Effusion"])
    assert new.logits.shape == (2, 2)
    torch.testing.assert_close(new.logits[:, 1], out.logits[:, 0])


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0]])
    assert masked_bce(logits, torch.tensor([[float("nan"), float("nan")]])) == 0
    full = masked_bce(logits, torch.tensor([[1.0, 0.0]]))
    half = masked_bce(logits, torch.tensor([[1.0, float("nan")]]))
    assert torch.isclose(half, F.binary_cross_entropy_with_logits(logits[:, :1], torch.ones(1, 1)))
    assert full != half


def test_report_supervision_adds_a_term():
    model = _model(report_weight=0.5)
    out = model(_pixels(model))
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    with_reports = model.loss(out, y, reports=["large left pleural effusion", None])
    assert not torch.isclose(with_reports, model.loss(out, y))


@pytest.mark.parametrize("view_dim", [None, 8])
def test_adapter_round_trip_and_wrong_backbone(tmp_path, view_dim):
    model = _model(("tiny-clip-vit-b-16", "tiny-hf-dinov2"), num_queries=3, view_dim=view_dim)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
    model.fit_feature_norms([torch.randn(20, 2, b.vision.embed_dim) * 3 + 1 for b in model.backbones])
    save_method(MedBridgeMethod.from_model(model), tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"adapter.safetensors", "adapter.json"}
    px = _pixels(model)
    loaded = load_method(tmp_path, [B["tiny-clip-vit-b-16"](), B["tiny-hf-dinov2"]()]).model
    with torch.no_grad():
        torch.testing.assert_close(loaded(px).logits, model.eval()(px).logits, atol=0, rtol=0)
    from medbridge.backbones.tiny import tiny_open_clip

    with pytest.raises(AdapterMismatchError, match="backbone 0"):
        load_method(tmp_path, [tiny_open_clip("ViT-B-16-quickgelu", seed=9), B["tiny-hf-dinov2"]()])
    report = model.parameter_report()
    assert report["trainable"] == sum(p.numel() for p in model.trainable_parameters().values())


def test_feature_standardisation_equals_the_plain_model_on_standardised_features():
    """Frozen-only model: standardising inside == the un-normalised model fed (f - mean) / std."""
    kw = dict(num_queries=0, frozen_weight=1.0, view_attention=False)
    std_model, plain = _model(feature_norm="standardize", **kw), _model(feature_norm="none", **kw)
    plain.load_state_dict({k: v for k, v in std_model.state_dict().items() if "feature_norms" not in k})
    e = std_model.backbones[0].vision.embed_dim
    train = torch.randn(50, 2, e) * torch.linspace(0.1, 30, e) + 5  # a few dimensions dominate, as in DINOv2
    std_model.fit_feature_norms([train])
    mean, std = train.reshape(-1, e).mean(0), train.reshape(-1, e).std(0)
    torch.testing.assert_close(std_model.feature_norms[0].mean, mean)
    frozen = torch.randn(4, 2, e) * 10
    with torch.no_grad():
        a = std_model.forward_cached([{"states": torch.zeros(4, 2, 1, 1, 1), "frozen": frozen}]).logits
        b = plain.forward_cached([{"states": torch.zeros(4, 2, 1, 1, 1), "frozen": (frozen - mean) / std}]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected \[n >= 2"):
        std_model.fit_feature_norms([torch.randn(1, e)])
    assert "feature_norms.0.mean" in std_model.adapter_tensors()
    assert not any(p.requires_grad for p in std_model.feature_norms.buffers())


def test_feature_norm_auto_keeps_an_aligned_clip_unstandardised():
    assert not _model().standardized  # tiny CLIP: text tower aligned with its image tower -> zero-shot start kept
    assert isinstance(_model().feature_norms[0], torch.nn.Identity)
    assert _model(feature_norm="standardize").standardized


def test_adapter_from_before_feature_norm_loads_unstandardised(tmp_path):
    """A medbridge-adapter/1 file written before feature_norm existed (the legacy fixture, minus the field)."""
    import json
    import shutil

    from medbridge.backbones.tiny import tiny_open_clip

    shutil.copytree(LEGACY / "medbridge", tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(cfg_file.read_text())
    del meta["config"]["feature_norm"], meta["weights_sha256"]  # as written before either existed
    cfg_file.write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "a" / "adapter.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("feature_norms.")}, str(weights))
    assert load_method(tmp_path / "a", [tiny_open_clip("ViT-B-16-quickgelu", seed=3)]).model.config.feature_norm \
        == "none"


@pytest.mark.parametrize("kw, match", [
    (dict(labels=["A"], feature_norm="batch"), "feature_norm"),
    (dict(labels=[]), "empty"),
    (dict(labels=["A"], prompt_names=[""]), "no prompt name"),
    (dict(labels=["A"], num_queries=-1), "num_queries"),
    (dict(labels=["A"], frozen_weight=1.5), "frozen_weight"),
    (dict(labels=["A"], attention="cross"), "attention"),
    (dict(labels=["A"], view_dim=0), "view_dim"),
    (dict(labels=["A"], view_dim=2.5), "view_dim"),
    (dict(labels=["A"], view_dim=8, view_attention=False), "view_dim .* needs view_attention=true"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MedBridgeConfig(**kw)


def test_view_attention_bottleneck_starts_as_the_identity_learns_and_keeps_the_full_width_layout():
    from medbridge.methods.medbridge.pooling import ViewPooling

    torch.manual_seed(0)
    dim, width = 32, 8
    full, narrow = ViewPooling(dim, heads=4), ViewPooling(dim, heads=4, width=width)
    keys = {"norm.weight", "norm.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
            "attn.out_proj.bias"}  # adapters saved before view_dim existed load into the default (full width)
    assert set(full.state_dict()) == set(ViewPooling(dim, width=dim).state_dict()) == keys
    count = sum(p.numel() for p in narrow.parameters())
    assert count == 2 * dim + dim * width + (3 * width * width + 3 * width) + (width * width + width) + (
        width * dim + dim) < sum(p.numel() for p in full.parameters())
    tokens = torch.randn(5, 3, dim)
    torch.testing.assert_close(narrow.contextualize(tokens), tokens, atol=0, rtol=0)  # zero-initialised up
    opt = torch.optim.SGD(narrow.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        narrow(tokens)[0].pow(2).sum().backward()
        assert narrow.up.weight.grad.abs().sum() > 0
        assert (narrow.down.weight.grad.abs().sum() > 0) == (step == 1)  # reached once up is no longer zero
        opt.step()
    assert not torch.allclose(narrow.contextualize(tokens), tokens)
    model = _model(num_queries=3, view_dim=width)
    assert model.parameter_report()["trainable"] < _model(num_queries=3).parameter_report()["trainable"]


def test_t1_and_view_shape_errors():
    vision = B["tiny-clip-vit-b-16"]().vision
    with pytest.raises(ValueError, match="t1"):
        QEncoder(vision, t1=vision.depth, num_queries=2)
    model = _model()
    with pytest.raises(ValueError, match=r"\[B, N, 3, 32, 32\]"):
        model([torch.randn(2, 3, 32, 32)])


def test_vision_only_expert_needs_text_source():
    cfg = MedBridgeConfig(labels=LABELS, backbones=["tiny-hf-dinov2"])
    with pytest.raises(ValueError, match="no text"):
        MedBridgeModel(cfg, [B["tiny-hf-dinov2"]()])


def test_views_from_image_feed_the_model():
    model = _model(("tiny-clip-vit-b-16", "tiny-timm-vit"))
    img = np.random.default_rng(0).random((48, 40)).astype(np.float32)
    views = model.views(img)
    assert len(views) == 2 and torch.equal(views[0].boxes, views[1].boxes)
    out = model([v.pixels.unsqueeze(0) for v in views])
    assert out.logits.shape == (1, 3)


@pytest.mark.slow
def test_real_bundled_backbone_on_real_xrays(nih_sample, bundled_backbone):
    from medbridge.data.images import read_image

    cfg = MedBridgeConfig(labels=LABELS, backbones=["dinov2-small+minilm-l6"], num_queries=4,
                          focal=FocalConfig(region_size=512, stride=512))
    model = MedBridgeModel(cfg, [bundled_backbone])
    files = sorted((nih_sample / "images").glob("*.jpg"))[:2]
    views = [model.views(read_image(f))[0] for f in files]
    px = torch.stack([v.pixels for v in views])  # [2, 5, 3, 224, 224]
    out = model([px])
    loss = model.loss(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, float("nan")]]))
    loss.backward()
    assert torch.isfinite(loss) and model.encoders[0].queries.grad.abs().sum() > 0
    report = model.parameter_report()
    assert report["percent_of_all_frozen"] < 4.0  # the paper counts the whole VLM (vision + text towers)


def test_vision_only_expert_with_separate_text_tower():
    from medbridge.backbones.tiny import tiny_bert_text_tower

    cfg = MedBridgeConfig(labels=LABELS, backbones=["tiny-hf-dinov2"], text_source="minilm-l6", t1=1)
    model = MedBridgeModel(cfg, [B["tiny-hf-dinov2"]()], text=tiny_bert_text_tower())
    assert model.text_head.init == "random"  # 48-wide text, 64-wide image: a learnt map
    assert model.standardized  # auto: no aligned text tower, so no zero-shot start to keep
    assert not any(n.startswith("text_head.text.") for n in model.trainable_parameters())  # given tower frozen
    out = model(_pixels(model))
    model.loss(out, torch.ones(2, 3)).backward()
    assert model.text_head.proj.weight.grad is not None
    assert all(p.grad is None for p in model.text_head.text.parameters())
