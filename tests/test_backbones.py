"""The backbone interface, on a tiny random model of every family and every registered architecture."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from medbridge.backbones import (
    BackboneError,
    HubUnreachableError,
    create_backbone,
    read_state_dict,
    tiny_builders,
)
from medbridge.backbones.loading import load_checkpoint_into
from medbridge.backbones.tiny import tiny_bert_text_tower, tiny_open_clip

BUILDERS = tiny_builders()


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    return BUILDERS[request.param]()


def _pixels(backbone, n=2, seed=0):
    size = backbone.vision.preprocess.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_open_clip_architecture_has_a_tiny_builder():
    from medbridge.backbones import list_backbones

    for spec in list_backbones():
        if spec.family == "open_clip":
            assert f"tiny-{spec.name}" in BUILDERS


def test_blocks_one_by_one_equal_library_forward(tiny):
    v = tiny.vision
    x = _pixels(tiny)
    with torch.no_grad():
        tokens = v.embed(x)
        assert tokens.shape[0] == 2 and tokens.shape[2] == v.width
        assert tokens.shape[1] >= v.num_prefix_tokens + 1
        for block in v.blocks:
            tokens = block(tokens)
        ours = v.finalize(tokens)
        ref = v.reference_forward(x)
    assert len(v.blocks) == v.depth
    assert ours.shape == (2, v.embed_dim)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        per_token = v.finalize_tokens(tokens)
    assert per_token.shape == (2, tokens.shape[1], v.embed_dim)


def test_split_run_blocks_matches_full(tiny):
    v = tiny.vision
    x = _pixels(tiny)
    with torch.no_grad():
        t = v.embed(x)
        half = v.run_blocks(v.run_blocks(t, 0, v.depth // 2), v.depth // 2)
        torch.testing.assert_close(half, v.run_blocks(t), atol=1e-6, rtol=0)


def test_text_pooling_equals_library_encode_text(tiny):
    if tiny.text is None:
        pytest.skip("vision-only backbone")
    texts = ["a radiology image with pleural effusion", "no finding", "cardiomegaly"]
    tokens = tiny.text.tokenize(texts)
    with torch.no_grad():
        feats = tiny.text.encode(tokens)
        ref = tiny.text.reference_encode(tokens)
        from_emb = tiny.text.encode_embeddings(tiny.text.token_embeddings(tokens), tokens)
    assert feats.pooled.shape == (3, tiny.text.width)
    assert feats.projected.shape == (3, tiny.text.embed_dim)
    torch.testing.assert_close(feats.projected, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_emb.projected, feats.projected, atol=0, rtol=0)
    pw = tiny.text.projection_weight()
    if pw is not None:
        w, b = pw
        manual = feats.pooled @ w.t() + (0 if b is None else b)
        torch.testing.assert_close(manual, feats.projected, atol=1e-5, rtol=1e-5)


def test_text_embeddings_path_reacts_to_edits(tiny):
    """Prompt learners replace word embeddings: changing one must change the pooled output."""
    if tiny.text is None:
        pytest.skip("vision-only backbone")
    tokens = tiny.text.tokenize(["a radiology image with edema"])
    emb = tiny.text.token_embeddings(tokens)
    edited = emb.clone()
    edited[:, 1] += 1.0
    with torch.no_grad():
        a = tiny.text.encode_embeddings(emb, tokens).projected
        b = tiny.text.encode_embeddings(edited, tokens).projected
    assert (a - b).abs().max() > 0  # tiny random inits mix weakly, but the edit must reach the pooled output


def test_frozen_and_eval(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())


def test_bert_text_tower_mean_pooling_ignores_padding():
    tower = tiny_bert_text_tower()
    one = tower.encode_text(["pleural effusion"]).pooled
    padded = tower.encode_text(["pleural effusion", "a much longer sentence about the heart size"]).pooled[:1]
    torch.testing.assert_close(one, padded, atol=1e-5, rtol=1e-5)


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(BackboneError, match="clip-vit-b-16"):
        create_backbone("clip-vit-b16")


def test_text_only_backbone_explains_pairing():
    with pytest.raises(BackboneError, match=r"dinov2-small\+minilm-l6"):
        create_backbone("minilm-l6")


def test_hub_unreachable_message():
    with pytest.raises(HubUnreachableError, match="local-dir"):
        create_backbone("hf-hub:openai/clip-vit-base-patch16")


def test_checkpoint_needed_for_chexzero():
    with pytest.raises(BackboneError, match=r"chexzero@"):
        create_backbone("chexzero")


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    src = tiny_open_clip("ViT-B-32-quickgelu", seed=1)
    dst = tiny_open_clip("ViT-B-32-quickgelu", seed=2)
    x = _pixels(src)
    assert not torch.allclose(src.vision(x), dst.vision(x))
    ckpt = tmp_path / "clip.pt"
    full_sd = {k: v for k, v in src.text._model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in full_sd.items()}}, ckpt)
    load_checkpoint_into(dst.text._model, ckpt)
    torch.testing.assert_close(dst.vision(x), src.vision(x))
    other = tiny_open_clip("ViT-B-32-quickgelu", layers=2)  # fewer blocks: the extra ones are unexpected
    with pytest.raises(BackboneError, match=r"unexpected keys \(\d+\): transformer.resblocks.2"):
        load_checkpoint_into(other.text._model, ckpt)


def test_untrusted_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(BackboneError, match="weights_only") as err:
        read_state_dict(path)
    assert "will likely succeed" not in str(err.value) and "\n" not in str(err.value)  # torch's unsafe advice (#27)


def test_local_dir_round_trip_open_clip(tmp_path):
    from safetensors.torch import save_file

    src = tiny_open_clip("ViT-B-16-quickgelu", seed=3)
    model = src.text._model
    import open_clip

    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    cfg["vision_cfg"].update(width=64, layers=4, head_width=32, image_size=32, patch_size=8)
    cfg["text_cfg"].update(width=48, heads=2, layers=4)
    cfg.update(embed_dim=32, quick_gelu=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    loaded = create_backbone(f"local-dir:{tmp_path}")
    x = _pixels(src)
    torch.testing.assert_close(loaded.vision(x), src.vision(x))
    tok = src.text.tokenize(["edema"])
    torch.testing.assert_close(loaded.text.encode(tok).projected, src.text.encode(tok).projected)


@pytest.mark.parametrize("model_type", ["dinov2", "clip", "siglip"])
def test_local_dir_round_trip_transformers(tmp_path, model_type):
    from medbridge.backbones.hf import wrap_transformers
    from medbridge.backbones.tiny import tiny_hf_model

    model, tokenizer = tiny_hf_model(model_type, seed=5)
    model.save_pretrained(tmp_path)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path)
    src = wrap_transformers("src", model, tokenizer, image_size=32)
    loaded = create_backbone(f"local-dir:{tmp_path}")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.vision(x), src.vision(x))
    if tokenizer is not None:
        tok = src.text.tokenize(["edema", "no finding"])
        torch.testing.assert_close(loaded.text.encode(tok).projected, src.text.encode(tok).projected)


def test_timm_local_dir_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = BUILDERS["tiny-timm-vit"]()
    m = src.vision.model
    cfg = {"architecture": "vit_base_patch16_224", "num_classes": 0,
           "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2},
           "pretrained_cfg": {"input_size": [3, 32, 32]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = create_backbone(f"local-dir:{tmp_path}")
    x = _pixels(src)
    torch.testing.assert_close(loaded.vision(x), src.vision(x))
