"""Vision towers of VLMs (LLaVA 1.5/NeXT, Qwen2-VL, Qwen2.5-VL, Gemma 3, PaliGemma, InternVL) as backbones:
tiny random checkpoints saved with ``save_pretrained`` (sharded, with a language model) and loaded through
``local-dir:``; the library's own ``get_image_features`` as reference; query tokens in Qwen's packed/window
layout; vision-only loading; a mixture of three heterogeneous experts; the CLI on real NIH images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tests import test_backbones as interface  # the checks every backbone family passes
from tests.helpers import nih_subset_csv, save_tiny_clip

from medbridge.backbones import BackboneError, create_backbone
from medbridge.backbones.base import HALF_MEAN, IMAGENET_MEAN, OPENAI_CLIP_MEAN
from medbridge.backbones.hf import vision_transformer
from medbridge.backbones.tiny_vlm import TINY_VLM_TYPES, save_tiny_vlm
from medbridge.backbones.vlm import VISION_PREFIXES, create_vlm_backbone

REPO = Path(__file__).resolve().parents[1]
EXPECTED_MEAN = {"llava": OPENAI_CLIP_MEAN, "llava_next": OPENAI_CLIP_MEAN, "qwen2_vl": OPENAI_CLIP_MEAN,
                 "qwen2_5_vl": OPENAI_CLIP_MEAN, "gemma3": HALF_MEAN, "paligemma": HALF_MEAN,
                 "internvl": IMAGENET_MEAN}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Every tiny VLM saved as sharded safetensors (shards of 40 kB: vision, projector and LM tensors spread)."""
    root = tmp_path_factory.mktemp("vlm")
    folders = {}
    for model_type in TINY_VLM_TYPES:
        folders[model_type] = root / model_type
        save_tiny_vlm(folders[model_type], model_type, seed=1, max_shard_size="40kB")
    return folders


@pytest.fixture(scope="module")
def loaded(saved) -> dict:
    return {t: create_backbone(f"local-dir:{folder}") for t, folder in saved.items()}


def _pixels(backbone, n=2, seed=0):
    size = backbone.vision.preprocess.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _library_model(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder)).eval()


def _features(out):
    """``get_image_features``' image tokens: transformers 4.x returns them, 5.x returns them as ``pooler_output``."""
    return getattr(out, "pooler_output", out)


def _library_image_features(model, tower, pixels: torch.Tensor) -> torch.Tensor:
    """Mean over the image tokens of the library's own ``get_image_features`` -> [B, text width]."""
    model_type = model.config.model_type
    b = pixels.shape[0]
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        feats = _features(model.model.get_image_features(tower.patchify(pixels), tower.grid_thw(b)))
        return torch.stack(list(feats)).mean(1)
    if model_type == "llava_next":  # base view first; the any-resolution tiles follow it in the packed output
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = pixels.shape[-1]
        k = image_size_to_num_patches((size, size), model.config.image_grid_pinpoints, size)
        tiles = torch.cat([pixels[:, None], torch.randn(b, k - 1, *pixels.shape[1:])], 1)
        feats = _features(model.model.get_image_features(tiles, image_sizes=torch.tensor([[size, size]] * b)))
        n_base = (size // model.config.vision_config.patch_size) ** 2
        return torch.stack([f[:n_base] for f in feats]).mean(1)
    feats = _features(model.model.get_image_features(pixels))  # LLaVA: a list of [tokens, width] per image
    mean = (torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats).mean(1)
    if model_type == "paligemma" and int(transformers.__version__.split(".")[0]) >= 5:
        # 5.x moved PaliGemma's division by sqrt(text width) out of get_image_features (Gemma's embedding scale
        # now multiplies text tokens only): the language model receives the same; the tower keeps 4.x's values
        mean = mean / model.config.text_config.hidden_size ** 0.5
    return mean


@pytest.mark.parametrize("model_type", TINY_VLM_TYPES)
def test_interface_checks_on_local_dir_load(loaded, model_type):
    backbone = loaded[model_type]
    assert backbone.text is None and not backbone.aligned
    interface.test_blocks_one_by_one_equal_library_forward(backbone)
    interface.test_split_run_blocks_matches_full(backbone)
    interface.test_frozen_and_eval(backbone)
    assert backbone.vision.preprocess.image_size == 32
    assert backbone.vision.preprocess.mean == pytest.approx(EXPECTED_MEAN[model_type])


@pytest.mark.parametrize("model_type", TINY_VLM_TYPES)
def test_tower_equals_the_full_vlm_image_features(saved, loaded, model_type):
    """blocks one by one -> finalize == the full VLM's own get_image_features (loaded by transformers), mean-pooled;
    finalize_tokens maps tokens to the language model's width."""
    backbone = loaded[model_type]
    v = backbone.vision
    x = _pixels(backbone)
    model = _library_model(saved[model_type])
    with torch.no_grad():
        tokens = v.run_blocks(v.embed(x))
        ours = v.finalize(tokens)
        ref = _library_image_features(model, v, x)
        per_token = v.finalize_tokens(tokens[:, :3])
    assert ours.shape == (2, model.config.text_config.hidden_size) == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert per_token.shape == (2, 3, v.embed_dim)


def test_llava_stops_at_its_vision_feature_layer(loaded):
    v = loaded["llava"].vision  # 4 CLIP layers, vision_feature_layer -2 -> hidden_states[3]; the 4th is dropped
    assert v.depth == 3 and len(v.vm.encoder.layers) == 3


def test_qwen_patchify_matches_the_image_processor(saved, loaded):
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor.from_pretrained(str(saved["qwen2_5_vl"]))
    tower = loaded["qwen2_5_vl"].vision
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lib = proc(images=[image], return_tensors="pt")
    assert lib["image_grid_thw"].tolist() == tower.grid_thw(1).tolist()
    mean, std = torch.tensor(tower.preprocess.mean), torch.tensor(tower.preprocess.std)
    ours = tower.patchify(((torch.from_numpy(image).float() / 255 - mean) / std).permute(2, 0, 1)[None])
    torch.testing.assert_close(ours, lib["pixel_values"], atol=1e-5, rtol=1e-5)


def test_qwen_window_blocks_with_queries_equal_per_window_library_calls(loaded):
    """With Q > 0 a windowed block gives each window's patches what the library block gives on the segment
    [window; queries], and the queries what it gives on [all patches; queries] (queries: identity rotation)."""
    tower = loaded["qwen2_5_vl"].vision
    lay = tower.layout
    windowed = [i for i, blk in enumerate(tower.blocks) if not blk.full_attention]
    assert windowed and len(lay.cu_window) - 1 > 1  # several windows in this tiny config
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, lay.num_patches, tower.width, generator=g)  # in the library's (window) order
    queries = torch.randn(2, 3, tower.width, generator=g)
    block = tower.blocks[windowed[0]]
    raster = tokens[:, lay.from_library]  # what the tower's blocks take and return
    with torch.no_grad():
        out = block(torch.cat([raster, queries], 1))
        ours = torch.cat([out[:, : lay.num_patches][:, lay.library_order], out[:, lay.num_patches:]], 1)
        ones, zeros = torch.ones(3, lay.cos.shape[1]), torch.zeros(3, lay.cos.shape[1])
        for b in range(2):
            for s, e in zip(lay.cu_window[:-1].tolist(), lay.cu_window[1:].tolist()):
                seg = torch.cat([tokens[b, s:e], queries[b]])
                pos = (torch.cat([lay.cos[s:e], ones]), torch.cat([lay.sin[s:e], zeros]))
                ref = block.block(seg, cu_seqlens=torch.tensor([0, len(seg)], dtype=torch.int32),
                                  position_embeddings=pos)
                torch.testing.assert_close(ours[b, s:e], ref[: e - s], atol=1e-5, rtol=1e-5)
            seg = torch.cat([tokens[b], queries[b]])
            pos = (torch.cat([lay.cos, ones]), torch.cat([lay.sin, zeros]))
            ref = block.block(seg, cu_seqlens=torch.tensor([0, len(seg)], dtype=torch.int32), position_embeddings=pos)
            torch.testing.assert_close(ours[b, lay.num_patches:], ref[lay.num_patches:], atol=1e-5, rtol=1e-5)
        no_queries = block(raster)
    assert not torch.allclose(out[:, : lay.num_patches], no_queries, atol=1e-4)  # patches do see the queries


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qencoder_on_qwen_q0_is_the_library_forward_and_isolated_queries_leave_it(saved, loaded, model_type):
    from medbridge.methods.medbridge import QEncoder

    tower = loaded[model_type].vision
    x = _pixels(loaded[model_type])
    model = _library_model(saved[model_type])
    with torch.no_grad():
        ref = _library_image_features(model, tower, x)
        frozen0, q0 = QEncoder(tower, t1=1, num_queries=0)(x)
        torch.testing.assert_close(frozen0, ref, atol=1e-5, rtol=1e-5)
        assert q0.shape == (2, 0, tower.embed_dim)
        torch.manual_seed(0)
        frozen, q = QEncoder(tower, t1=1, num_queries=4, attention="isolated")(x)
        torch.testing.assert_close(frozen, ref, atol=1e-5, rtol=1e-5)
        assert q.shape == (2, 4, tower.embed_dim) and q.abs().sum() > 0
        torch.manual_seed(0)
        joint, qj = QEncoder(tower, t1=1, num_queries=4, attention="joint")(x)
    assert not torch.allclose(joint, ref, atol=1e-4)  # joint: patches attend to the queries


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tokens_are_in_raster_order(loaded, model_type):
    """Token r * grid + c is the patch at row r, column c (as for every other tower): heat maps need no reordering."""
    tower = loaded[model_type].vision
    x = _pixels(loaded[model_type])
    p, t = tower.patch, tower.temporal
    with torch.no_grad():
        tokens = tower.embed(x)
        for r, c in [(0, 0), (0, 5), (3, 1), (7, 6)]:
            patch = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].unsqueeze(2).expand(-1, -1, t, -1, -1)
            torch.testing.assert_close(tokens[:, r * tower.grid + c], tower.visual.patch_embed(patch.reshape(2, -1)),
                                       atol=1e-5, rtol=1e-5)


def test_qwen_rejects_other_input_sizes(loaded):
    with pytest.raises(ValueError, match="expects 32x32 inputs, got 48x48"):
        loaded["qwen2_vl"].vision.embed(torch.zeros(1, 3, 48, 48))


def test_vision_only_loading_never_reads_language_tensors(tmp_path, monkeypatch):
    import safetensors

    save_tiny_vlm(tmp_path, "llava", max_shard_size="100kB", text_hidden=64, text_layers=4, vocab=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    lm_only = {s for s in set(index.values()) if all(not k.startswith(("vision_tower.", "multi_modal_projector."))
                                                     for k, v in index.items() if v == s)}
    assert lm_only and len(set(index.values())) > len(lm_only)  # language-only shards exist
    opened = []
    real_open = safetensors.safe_open

    def recording_open(path, *a, **kw):
        opened.append(Path(path).name)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", recording_open)
    log: list[str] = []
    backbone = create_vlm_backbone("llava", tmp_path, read_log=log)
    assert not set(opened) & lm_only
    assert log and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in log)
    assert len(log) == sum(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in index)
    full = _library_model(tmp_path)
    vision_side = sum(p.numel() for p in full.model.vision_tower.parameters()) + \
        sum(p.numel() for p in full.model.multi_modal_projector.parameters())
    unused = sum(p.numel() for p in vision_transformer(full.model.vision_tower).encoder.layers[3:].parameters())
    assert backbone.num_parameters() == vision_side - unused  # no language model held (nor unused CLIP layers)
    assert vision_side < full.num_parameters() // 2


def test_missing_vision_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_vlm(tmp_path, "gemma3")
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith(VISION_PREFIXES)}, tmp_path / "model.safetensors")
    with pytest.raises(BackboneError, match="no vision tower tensors"):
        create_backbone(f"local-dir:{tmp_path}")


def test_older_save_layouts_load(tmp_path, saved, loaded):
    """Saves that carry a position_ids buffer, or whose SigLIP config leaves vision_use_head at its default (True)
    without head weights, load to the same tower."""
    from safetensors.torch import load_file, save_file

    llava = tmp_path / "llava"
    shutil.copytree(saved["llava"], llava)
    index = json.loads((llava / "model.safetensors.index.json").read_text())
    patch = next(k for k in index["weight_map"] if k.endswith("embeddings.patch_embedding.weight"))  # either layout
    position_ids = patch.replace("patch_embedding.weight", "position_ids")
    shard = index["weight_map"][patch]
    sd = load_file(llava / shard)
    sd[position_ids] = torch.arange(17)[None]
    save_file(sd, llava / shard, metadata={"format": "pt"})
    index["weight_map"][position_ids] = shard
    (llava / "model.safetensors.index.json").write_text(json.dumps(index))
    pali = tmp_path / "paligemma"
    shutil.copytree(saved["paligemma"], pali)
    cfg = json.loads((pali / "config.json").read_text())
    cfg["vision_config"].pop("vision_use_head")
    (pali / "config.json").write_text(json.dumps(cfg))
    for model_type, folder in [("llava", llava), ("paligemma", pali)]:
        x = _pixels(loaded[model_type])
        with torch.no_grad():
            torch.testing.assert_close(create_backbone(f"local-dir:{folder}").vision(x), loaded[model_type].vision(x))


@pytest.mark.parametrize("model_type", ["llava", "gemma3"])
def test_checkpoints_of_either_transformers_layout_load(tmp_path, model_type):
    """transformers 4.x saves CLIP / SigLIP towers as ``vision_tower.vision_model.*``, 5.x as ``vision_tower.*``:
    a checkpoint in the other layout than the installed version's loads to the same tower (same features)."""
    from safetensors.torch import load_file, save_file

    folder, other = tmp_path / "saved", tmp_path / "other"
    save_tiny_vlm(folder, model_type)
    shutil.copytree(folder, other)
    sd = load_file(folder / "model.safetensors")
    nested = any(k.startswith("vision_tower.vision_model.") for k in sd)
    renamed = {(k.replace("vision_tower.vision_model.", "vision_tower.") if nested else
                k.replace("vision_tower.", "vision_tower.vision_model.")): v for k, v in sd.items()}
    assert set(renamed) != set(sd)
    save_file(renamed, other / "model.safetensors", metadata={"format": "pt"})
    a, b = create_backbone(f"local-dir:{folder}"), create_backbone(f"local-dir:{other}")
    x = _pixels(a)
    with torch.no_grad():
        torch.testing.assert_close(b.vision(x), a.vision(x), atol=0, rtol=0)


@pytest.mark.slow
def test_vision_only_loading_peak_memory_is_a_fraction_of_the_language_model():
    """The benchmark script in a fresh process: loading the vision tower grows peak RSS by < 15% of the language
    model's bytes; loading the full VLM the same way (control) grows it by at least those bytes."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vlm_vision_only_loading.py"), "--json",
                          "--text-hidden", "512", "--text-layers", "6", "--vocab", "16000", "--shard-size", "50MB"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lm = res["language_bytes"]
    assert lm > 50 * res["vision_bytes"] and res["shards"] > 1
    assert res["vision_only"]["peak_growth_bytes"] < 0.15 * lm
    assert res["full"]["peak_growth_bytes"] > 0.9 * lm


def test_text_classifier_baselines_are_not_applicable_with_a_paired_text_tower(saved):
    from medbridge.methods.baselines import BASELINES, NotApplicableError, build_baseline

    backbone = create_backbone(f"local-dir:{saved['paligemma']}+minilm-l6")
    assert backbone.text is not None and not backbone.aligned
    assert {"zero-shot", "coop", "clip-adapter", "mma", "mmrl"} <= set(BASELINES)
    for method in BASELINES:  # every registered baseline is a text classifier
        with pytest.raises(NotApplicableError, match="not trained with its image tower"):
            build_baseline(method, backbone, ["Effusion"], ["effusion"])


def test_mixture_of_clip_qwen25_and_gemma3_experts_trains_saves_and_loads(tmp_path, saved):
    from medbridge.data.focal import FocalConfig
    from medbridge.methods import load_method, save_method
    from medbridge.methods.medbridge import MedBridgeConfig, MedBridgeMethod
    from medbridge.methods.medbridge.adapter import build_medbridge

    sources = [save_tiny_clip(tmp_path / "clip"), f"local-dir:{saved['qwen2_5_vl']}", f"local-dir:{saved['gemma3']}"]
    torch.manual_seed(0)
    cfg = MedBridgeConfig(labels=["Effusion", "Cardiomegaly"], backbones=sources, t1=1, num_queries=2,
                          attention="joint", focal=FocalConfig(region_size=16, stride=16))
    model = build_medbridge(cfg)
    assert len({b.vision.embed_dim for b in model.backbones} | {b.vision.width for b in model.backbones}) > 1
    g = torch.Generator().manual_seed(0)
    px = [torch.randn(2, 2, 3, p.image_size, p.image_size, generator=g) for p in model.preprocess]
    trainable = model.trainable_parameters()
    before = {n: p.detach().clone() for n, p in trainable.items()}
    frozen_before = [p.detach().clone() for p in model.backbones.parameters()]
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    loss = model.loss(model(px), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.backward()
    for enc in model.encoders:
        assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, model.backbones.parameters()))
    save_method(MedBridgeMethod.from_model(model), tmp_path / "adapter")
    loaded = load_method(tmp_path / "adapter").model  # rebuilds the three experts from their local-dir sources
    with torch.no_grad():
        torch.testing.assert_close(loaded(px).logits, model.eval()(px).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_cli_train_and_eval_with_vlm_experts_on_real_xrays(tmp_path, saved, nih_sample, capsys):
    from medbridge.cli.main import main

    data = nih_subset_csv(nih_sample, tmp_path / "data" / "labels.csv", n=32)
    experts = [f"local-dir:{saved['qwen2_5_vl']}+minilm-l6", f"local-dir:{saved['llava']}",
               f"local-dir:{saved['internvl']}"]
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--quiet",
            "--set", "train.epochs=1", "--set", f"train.cache_dir={tmp_path / 'cache'}", "--set", "train.workers=0",
            "--set", "method_options.medbridge.t1=1", "--set", "method_options.medbridge.num_queries=2",
            "--set", "focal.region_size=512", "--set", "focal.stride=512",
            "--set", "data.fractions=[0.5,0.2,0.3]"]
    for e in experts:
        argv += ["--backbone", e]
    assert main(argv) == 0
    meta = json.loads((out / "medbridge" / "adapter.json").read_text())
    assert [b["name"] for b in meta["backbones"]] == experts
    metrics = json.loads((out / "metrics.json").read_text())["methods"]["medbridge"]
    assert 0 <= metrics["macro"]["auroc"] <= 1
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--cache-dir", str(tmp_path / "cache"),
                 "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == metrics["n"]
    assert res["macro"]["auroc"] == pytest.approx(metrics["macro"]["auroc"], abs=1e-6)


def test_list_backbones_shows_the_vlm_families(capsys):
    from medbridge.cli.main import main

    assert main(["list", "backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, width, depth, size in [("llava-1.5-7b", 1024, 23, 336), ("llava-v1.6-mistral-7b", 1024, 23, 336),
                                     ("qwen2-vl-7b", 1280, 32, 448), ("qwen2.5-vl-7b", 1280, 32, 448),
                                     ("medgemma-4b", 1152, 27, 896), ("paligemma-3b-224", 1152, 27, 224),
                                     ("internvl3-1b", 1024, 24, 448)]:
        r = rows[name]
        assert (r["family"], r["width"], r["depth"], r["input"], r["text"]) == ("vlm", width, depth, size, "no")
        assert r["source"].startswith("hf-hub:") and "B of" in r["description"]
    assert main(["list", "backbones"]) == 0
    table = capsys.readouterr().out
    assert "qwen2.5-vl-7b" in table and "medgemma-4b" in table


def test_registered_vlm_without_hub_says_how_to_load_offline():
    from medbridge.backbones import HubUnreachableError

    with pytest.raises(HubUnreachableError, match="local-dir"):
        create_backbone("qwen2.5-vl-7b")


@pytest.mark.slow
def test_registered_vlm_loads_from_a_hub_cache_holding_only_the_vision_shards(tmp_path, saved):
    """A registered name resolves through the local hub cache (offline) when only config, index and the shards
    with vision tensors were downloaded, which is what medbridge downloads."""
    import os

    index = json.loads((saved["qwen2_5_vl"] / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {v for k, v in index.items() if k.startswith("visual.")}
    assert len(vision_shards) < len(set(index.values()))
    rev = "0" * 40
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in saved["qwen2_5_vl"].iterdir():
        if f.suffix == ".safetensors" and f.name not in vision_shards:
            continue
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    code = ("from medbridge.backbones import availability, create_backbone, get_spec\n"
            "print(availability(get_spec('qwen2.5-vl-7b')))\n"
            "b = create_backbone('qwen2.5-vl-7b')\n"
            "print(b.name, b.vision.depth, b.vision.embed_dim, b.vision.preprocess.image_size)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["yes (hub cache)", "qwen2.5-vl-7b 4 32 32"]
