"""Fine-tuning methods (full, last blocks, LoRA): what trains, equivalences at init, exact resume, best-epoch
selection, save/load, augmentation, option errors, and train/eval/predict through the CLI on real NIH images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.helpers import cached, nih_subset_csv, random_targets

from medbridge.backbones.registry import tiny_builders
from medbridge.backbones.tiny import tiny_open_clip
from medbridge.engine.config import TrainConfig
from medbridge.engine.trainer import _best_epoch, _stale_epochs, fit_method
from medbridge.methods import OptionsError, TrainingData, create_method, load_method, save_method
from medbridge.methods.finetune.method import augment_pixels
from medbridge.methods.frozen_features import frozen_embeddings

LABELS = ["Effusion", "Pneumonia", "Cardiomegaly"]
FINETUNES = ["full-finetune", "partial-finetune", "lora-finetune"]


@pytest.fixture(scope="module")
def dinov2():
    return tiny_builders()["tiny-hf-dinov2"]()


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "seed": 0, "checkpoint_every": 1, "workers": 0, **kw})


def fit(method, cache, out, **kw):
    val = np.arange(12, 16)
    return fit_method(method, TrainingData(cache, random_targets(16, 3), np.arange(12), val), cfg(), out,
                      progress_bar=False, **kw)


@pytest.mark.parametrize("name", FINETUNES)
def test_at_init_the_tuned_tower_is_the_pretrained_one_and_the_shared_backbone_is_never_touched(name, dinov2,
                                                                                               tmp_path):
    before = {n: p.clone() for n, p in dinov2.named_parameters()}
    method = create_method(name, {"epochs": 1, "lr": 1e-2, "batch_size": 4}, backbones=[dinov2], labels=LABELS)
    x = torch.randn(3, 1, 3, 32, 32)
    v = method.tower
    with torch.no_grad():  # LoRA's B starts at zero: the adapted tower equals the pretrained one
        pretrained = frozen_embeddings([dinov2], [x])[0][:, 0]
        torch.testing.assert_close(v.finalize(v.run_blocks(v.embed(x[:, 0]))), pretrained)
    fit(method, cached(method), tmp_path / "r")
    with torch.no_grad():
        moved = (v.finalize(v.run_blocks(v.embed(x[:, 0]))) - frozen_embeddings([dinov2], [x])[0][:, 0]).abs().max()
    assert moved > 1e-4  # the tower itself was tuned
    for n, p in dinov2.named_parameters():  # ... on a private copy
        assert torch.equal(p, before[n]) and not p.requires_grad, n


def test_gradients_reach_exactly_the_weights_each_variant_trains(dinov2):
    depth = dinov2.vision.depth
    x, y = torch.randn(2, 3, 32, 32), torch.ones(2, 3)
    grads = {}
    for name, opts in (("full-finetune", {}), ("partial-finetune", {"blocks": 1}), ("lora-finetune", {})):
        m = create_method(name, opts, backbones=[dinov2], labels=LABELS)
        m.head.weight.data.normal_()  # a zero head would send no gradient into the tower
        for n, p in m.named_parameters():
            if "lora_B" in n:  # nor would LoRA's zero B into A
                p.data.normal_(std=0.01)
        torch.nn.functional.binary_cross_entropy_with_logits(m.logits(x), y).backward()
        grads[name] = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads[name] == set(m.trainable_parameters()), name  # every trainable weight, and nothing else
    full = grads["full-finetune"]
    assert any("embeddings.patch_embeddings" in n for n in full) and any(".layer.0." in n for n in full)
    assert not any("mask_token" in n for n in full)  # unused by the forward pass: not trained, not saved
    partial = grads["partial-finetune"]
    assert any(f".layer.{depth - 1}." in n for n in partial) and not any(f".layer.{depth - 2}." in n for n in partial)
    assert any("layernorm" in n and ".layer." not in n for n in partial)  # the final norm trains too
    lora = grads["lora-finetune"]
    assert lora - {"head.weight", "head.bias"} and all("lora_" in n for n in lora - {"head.weight", "head.bias"})
    has = lambda *names: any(any(x in n for x in names) for n in lora)  # noqa: E731 (transformers 4.x or 5.x names)
    assert has("query", "q_proj") and has("value", "v_proj") and not has("key", "k_proj")


def test_layer_decay_gives_each_block_its_learning_rate_and_norms_no_weight_decay(dinov2):
    m = create_method("full-finetune", {"layer_decay": 0.5, "lr": 1e-4, "head_lr": 1e-2}, backbones=[dinov2],
                      labels=LABELS)
    scale = {id(p): g["lr_scale"] for g in m.parameter_groups() for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in m.parameter_groups() for p in g["params"]}
    v, depth = m.tower, m.tower.depth
    for i, block in enumerate(v.blocks):
        assert {scale[id(p)] for p in block.parameters()} == {0.5 ** (depth - i)}
    assert scale[id(v.model.embeddings.patch_embeddings.projection.weight)] == 0.5 ** (depth + 1)
    assert scale[id(v.model.layernorm.weight)] == 1.0 and scale[id(m.head.weight)] == pytest.approx(100.0)
    assert wd[id(v.model.layernorm.weight)] == 0.0 and wd[id(m.head.bias)] == 0.0 and wd[id(m.head.weight)] == 0.05
    grouped = [p for g in m.parameter_groups() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(m.trainable_parameters())


@pytest.mark.parametrize("name", ["full-finetune", "lora-finetune"])
def test_a_resumed_fine_tuning_equals_an_uninterrupted_one(name, dinov2, tmp_path):
    def run(out, **kw):
        torch.manual_seed(0)
        m = create_method(name, {"epochs": 3, "batch_size": 4}, backbones=[dinov2], labels=LABELS)
        fit(m, cached(m), out, **kw)
        return m

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after=5)  # inside epoch 2 of 3 (3 steps per epoch), augmentation on
    resumed = run(tmp_path / "b", resume=True)
    for n, p in whole.state_tensors().items():
        torch.testing.assert_close(resumed.state_tensors()[n], p, atol=0, rtol=0, msg=n)


def test_the_best_validation_epoch_is_kept_and_patience_stops_early(dinov2, tmp_path):
    history = [{"event": "epoch", "val_macro_auroc": v} for v in (0.6, 0.7, float("nan"), 0.65)]
    assert _best_epoch(history) == 2 and _stale_epochs(history) == 2

    def run(out, epochs, fit_kw=None, **opts):
        torch.manual_seed(0)
        opts = {"epochs": epochs, "schedule": "constant", "lr": 5e-2, "blocks": 1, "batch_size": 4, **opts}
        m = create_method("partial-finetune", opts, backbones=[dinov2], labels=LABELS)
        return m, fit(m, cached(m), out, **(fit_kw or {}))

    m4, hist4 = run(tmp_path / "a", 4)
    chosen = hist4[-1]
    curve = [r["val_macro_auroc"] for r in hist4 if r["event"] == "epoch"]
    assert chosen["event"] == "selected" and chosen["epoch"] == int(np.nanargmax(curve)) + 1
    m_short, _ = run(tmp_path / "b", chosen["epoch"])  # training only up to the chosen epoch: the same weights
    for n, p in m4.state_tensors().items():
        torch.testing.assert_close(m_short.state_tensors()[n], p, atol=0, rtol=0, msg=n)
    m_p, hist_p = run(tmp_path / "c", 6, patience=1)
    epochs_run = [r for r in hist_p if r["event"] == "epoch"]
    assert len(epochs_run) < 6 and _stale_epochs(epochs_run) == 1  # stopped after the first epoch without gain
    m_r, hist_r = run(tmp_path / "c", 6, {"resume": True}, patience=1)  # resuming a stopped run trains no more
    assert [r for r in hist_r if r["event"] == "epoch"] == epochs_run
    for n, p in m_p.state_tensors().items():
        torch.testing.assert_close(m_r.state_tensors()[n], p, atol=0, rtol=0, msg=n)


def test_saved_fine_tuned_weights_load_back_with_the_same_scores_and_the_pretrained_fingerprint(dinov2, tmp_path):
    clip = tiny_open_clip("ViT-B-16-quickgelu", layers=4, seed=3)  # nn.MultiheadAttention: LoRA on in_proj
    for name, bb in (("full-finetune", dinov2), ("lora-finetune", clip)):
        m = create_method(name, {"epochs": 1, "batch_size": 4}, backbones=[bb], labels=LABELS)
        cache = cached(m)
        fit(m, cache, tmp_path / name)
        folder = save_method(m, tmp_path / "saved" / name)
        meta = json.loads((folder / "adapter.json").read_text())
        assert meta["trainable_parameters"] == m.num_trainable()
        again = load_method(folder, [bb])  # the pretrained backbone: fingerprint checked against it
        # peft adapts nn.MultiheadAttention by merging B A into the fused weight for each call: float rounding
        np.testing.assert_allclose(again.scores_cached(cache, np.arange(16)), m.scores_cached(cache, np.arange(16)),
                                   atol=0 if name == "full-finetune" else 1e-6, rtol=0)
    size = (tmp_path / "saved" / "lora-finetune" / "adapter.safetensors").stat().st_size
    assert size < 0.2 * sum(p.numel() * 4 for p in clip.vision.parameters())  # LoRA saves adapters, not the tower


def test_augmentation_is_reproducible_mild_and_flips_only_when_asked():
    x = torch.randn(4, 3, 32, 32)
    a = augment_pixels(x, torch.Generator().manual_seed(1), hflip=False)
    b = augment_pixels(x, torch.Generator().manual_seed(1), hflip=False)
    c = augment_pixels(x, torch.Generator().manual_seed(2), hflip=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    # a smooth image stays close to itself (zoom/rotation/shift are small); a mirrored one does not
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    same = augment_pixels(ramp, torch.Generator().manual_seed(3), hflip=False)
    flips = [augment_pixels(ramp, torch.Generator().manual_seed(s), hflip=True) for s in range(6)]
    assert (same[..., :8].mean() < -0.4) and (same[..., -8:].mean() > 0.4)
    assert any((f[:, 0, :, :8].mean(dim=(1, 2)) > 0.4).any() for f in flips)


def test_option_errors_name_the_option(dinov2):
    with pytest.raises(OptionsError, match="blocks must be >= 1"):
        create_method("partial-finetune", {"blocks": 0}, backbones=[dinov2], labels=LABELS)
    with pytest.raises(OptionsError, match="layer_decay"):
        create_method("full-finetune", {"layer_decay": 1.5}, backbones=[dinov2], labels=LABELS)
    with pytest.raises(OptionsError, match=r"targets='nothing'.*their names: .*(query|q_proj)"):
        create_method("lora-finetune", {"targets": "nothing"}, backbones=[dinov2], labels=LABELS)
    with pytest.raises(OptionsError, match="gradient_checkpointing"):
        create_method("full-finetune", {"gradient_checkpointing": "sometimes"}, backbones=[dinov2], labels=LABELS)


def test_gradient_checkpointing_gives_the_same_gradients(dinov2):
    x, y = torch.randn(2, 3, 32, 32), torch.ones(2, 3)
    grads = []
    for mode in ("off", "on"):
        torch.manual_seed(0)
        m = create_method("full-finetune", {"gradient_checkpointing": mode}, backbones=[dinov2], labels=LABELS)
        m.head.weight.data.normal_(generator=torch.Generator().manual_seed(0))
        m.train()
        torch.nn.functional.binary_cross_entropy_with_logits(m.logits(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in m.trainable_parameters().items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


@pytest.mark.slow
def test_fine_tuning_trains_evaluates_and_predicts_through_the_cli(tmp_path, nih_sample, capsys):
    from tests.helpers import save_tiny_clip

    from medbridge.cli.main import main

    data = nih_subset_csv(nih_sample, tmp_path / "data" / "labels.csv", n=40)
    vision = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", vision, "--method", "partial-finetune", "--out",
                 str(out), "--quiet", "--set", "method_options.partial-finetune.epochs=2", "--set", "train.workers=0",
                 "--set", f"train.cache_dir={tmp_path / 'cache'}", "--set", "data.fractions=[0.5,0.2,0.3]",
                 "--with-probe"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"partial-finetune", "linear-probe"}
    saved = json.loads((out / "partial-finetune" / "adapter.json").read_text())
    assert saved["focal"]["num_crops"] == 0 and saved["history"][-1]["event"] == "selected"
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--workers", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "partial-finetune"
    assert res["macro"]["auroc"] == metrics["methods"]["partial-finetune"]["macro"]["auroc"]
    image = sorted((nih_sample / "images").glob("*.jpg"))[0]
    assert main(["predict", str(out), str(image), "--json", "--explain", str(tmp_path / "maps")]) == 0
    probs = json.loads(capsys.readouterr().out)[0]["probabilities"]
    python = load_method(out).predict([image])
    np.testing.assert_allclose(python[0], [probs[k] for k in load_method(out).labels], atol=1e-6)
    assert any((tmp_path / "maps").iterdir())
