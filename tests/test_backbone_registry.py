"""The backbone registry: source strings parsed once, families registered beside their code (and by plugins), the
medical towers loaded from their saved forms, the documented example family run through the command line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import nih_subset_csv

from medbridge.backbones import (
    BackboneError,
    BackboneSpec,
    create_backbone,
    create_text_tower,
    list_backbone_families,
    parse_source,
    register_backbone,
    register_backbone_family,
)
from medbridge.backbones import registry as bb_registry
from medbridge.backbones.tiny import TINY_SAVERS

REPO = Path(__file__).resolve().parents[1]


def _pixels(backbone, n=2):
    size = backbone.vision.preprocess.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("text, kind, fields", [
    ("clip-vit-b-16", "name", {"name": "clip-vit-b-16", "checkpoint": None}),
    (" chexzero@/data/best.pt ", "name", {"name": "chexzero", "checkpoint": "/data/best.pt"}),
    ("bundled:dinov2-small", "bundled", {"name": "dinov2-small"}),
    ("hf-hub:microsoft/rad-dino", "hf-hub", {"location": "microsoft/rad-dino"}),
    ("local-dir:/models/x", "local-dir", {"location": "/models/x"}),
    ("chexzero@C:/weights.pt", "name", {"name": "chexzero", "checkpoint": "C:/weights.pt"}),
])
def test_a_source_string_is_parsed_once_into_its_parts(text, kind, fields):
    src = parse_source(text)
    assert src.kind == kind and src.raw == text.strip()
    assert {k: getattr(src, k) for k in fields} == fields


def test_a_pair_parses_both_halves_and_home_is_expanded():
    src = parse_source("local-dir:~/rad-dino+minilm-l6")
    assert src.kind == "pair" and src.vision.kind == "local-dir" and src.text.name == "minilm-l6"
    assert src.vision.location == str(Path.home() / "rad-dino") and src.vision.uri.startswith("local-dir:/")
    with pytest.raises(BackboneError, match="empty backbone source"):
        parse_source("  ")


def test_no_module_dispatches_on_a_family_name():
    """Families are looked up in the registry, never compared by name in if-chains; prefixes are parsed in one
    place (source.py)."""
    src = REPO / "src" / "medbridge"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"family\s*[!=]=\s*[\"']", text), path
        if path.name != "source.py":
            assert not re.search(r"startswith\([\"'](hf-hub|local-dir|bundled):", text), path


def test_default_backbone_fingerprint_and_cache_key_are_unchanged():
    """The default backbone's fingerprint (saved with every trained method) and its frozen-embedding cache key (the
    folder of the on-disk cache) as computed before the registry was refactored (main at 6266bcd)."""
    from medbridge.backbones.base import backbone_fingerprint
    from medbridge.data.focal import FocalConfig
    from medbridge.engine.cache import cache_key
    from medbridge.methods.frozen_features import embedding_cache_spec

    bb = create_backbone()
    assert backbone_fingerprint(bb) == {"name": "dinov2-small+minilm-l6", "width": 384, "depth": 12,
                                        "embed_dim": 384, "image_size": 224, "checksum": 168.89}
    assert bb.vision.preprocess.to_dict() == {"image_size": 224, "mean": [0.485, 0.456, 0.406],
                                              "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
    assert cache_key(embedding_cache_spec([bb], FocalConfig(), 1).parts) == "94f34049170485819ca8"
    assert not bb.aligned and bb.text.embed_dim == 384
    assert float(bb.text.encode_text(["pleural effusion"]).projected.abs().sum()) == pytest.approx(84.24513, abs=1e-3)
    assert backbone_fingerprint(create_backbone("bundled:dinov2-small"))["name"] == "dinov2-small"


def test_medical_towers_are_listed_with_hub_id_licence_and_text(capsys):
    from medbridge.cli.main import main

    assert main(["list", "backbones", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    expect = {"biomedclip": ("open_clip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", 224, "MIT",
                             "yes", "yes"),
              "rad-dino": ("transformers", "microsoft/rad-dino", 518, "MSRLA", "no", "no"),
              "medsiglip": ("transformers", "google/medsiglip-448", 448, "HAI-DEF terms of use", "yes", "yes"),
              "chexzero": ("open_clip", None, 224, None, "yes", "yes")}
    for name, (family, hub, size, licence, text, aligned) in expect.items():
        r = rows[name]
        assert (r["family"], r["hub"], r["input"], r["licence"], r["text"], r["aligned"]) == \
            (family, hub, size, licence, text, aligned), name
    assert main(["list", "backbones"]) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in ("biomedclip", "rad-dino", "medsiglip"))
    assert all(f.name in table.split("families:")[1] for f in list_backbone_families())


@pytest.mark.parametrize("kind, family, size, mean, text_width", [
    ("biomedclip", "open_clip", 224, (0.48145466, 0.4578275, 0.40821073), 48),
    ("rad-dino", "transformers", 56, (0.5307,) * 3, None),
    ("medsiglip", "transformers", 56, (0.5,) * 3, 64),
])
def test_medical_tower_loads_from_its_saved_form(tmp_path, kind, family, size, mean, text_width):
    """A tiny random model of the tower's architecture, saved the way its hub repo is laid out, loads through
    local-dir: with its own preprocessing, runs block by block like the library, and encodes text where it has
    an aligned text tower."""
    folder = TINY_SAVERS[kind](tmp_path / kind)
    source = f"local-dir:{folder}"
    assert bb_registry.detect_family(parse_source(source))[0].name == family
    bb = create_backbone(source)
    v = bb.vision
    assert bb.name == source and (v.preprocess.image_size, v.preprocess.mean) == (size, mean)
    x = _pixels(bb)
    with torch.no_grad():
        torch.testing.assert_close(v.finalize(v.run_blocks(v.embed(x))), v.reference_forward(x), atol=1e-5,
                                   rtol=1e-5)
    if text_width is None:
        assert bb.text is None and not bb.aligned
        with pytest.raises(BackboneError, match="no text tower"):
            create_text_tower(source)
        paired = create_backbone(f"{source}+minilm-l6")  # what MedBridge's label prompts use with a vision-only tower
        assert paired.text.width == 384 and not paired.aligned
        return
    assert bb.aligned and bb.text.width == text_width
    tokens = bb.text.tokenize(["a chest x-ray with pleural effusion", "no finding"])
    with torch.no_grad():
        feats = bb.text.encode(tokens)
        torch.testing.assert_close(feats.projected, bb.text.reference_encode(tokens), atol=1e-5, rtol=1e-5)
    assert feats.projected.shape == (2, bb.text.embed_dim) == (2, v.embed_dim)
    assert create_text_tower(source).width == text_width


def test_a_folder_no_family_recognises_names_the_families(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackboneError, match="no backbone family recognises it.*open_clip"):
        create_backbone(f"local-dir:{tmp_path}")


def test_registration_errors_are_explicit():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone_family(name="open_clip", build=lambda spec, ckpt: None)
    with pytest.raises(ValueError, match="detect and load go together"):
        register_backbone_family(name="half", build=lambda spec, ckpt: None, detect=lambda files: True)
    with pytest.raises(ValueError, match="family 'nope' is not registered"):
        register_backbone(BackboneSpec("x", "nope", "-", 1, 1, 1, None, None, False, "x"))
    with pytest.raises(BackboneError, match="did you mean open_clip"):
        bb_registry.get_family("open-clip")


@pytest.fixture
def restore_registry():
    families, specs = dict(bb_registry._FAMILIES), dict(bb_registry._REGISTRY)
    yield
    bb_registry._FAMILIES.clear()
    bb_registry._FAMILIES.update(families)
    bb_registry._REGISTRY.clear()
    bb_registry._REGISTRY.update(specs)


def test_a_plugin_that_registers_only_a_family_counts(tmp_path, monkeypatch, restore_registry):
    from medbridge.methods import registry

    (tmp_path / "only_family.py").write_text(
        "from medbridge import register_backbone_family\n"
        "def register():\n"
        "    register_backbone_family(name='plugin-family', build=lambda spec, ckpt: None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "only_family", raising=False)
    registry.load_plugins("only_family:register")
    assert "plugin-family" in [f.name for f in list_backbone_families()]


def example_code() -> str:
    text = (REPO / "docs" / "adding-a-backbone.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _save_tiny_torchvision_vit(folder: Path) -> str:
    import torchvision
    from safetensors.torch import save_file

    args = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(**args)
    folder.mkdir(parents=True)
    (folder / "torchvision_vit.json").write_text(json.dumps(args))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return f"local-dir:{folder}"


def test_the_documented_example_backbone_runs_end_to_end_through_the_cli(tmp_path, nih_sample, capsys,
                                                                          monkeypatch, restore_registry):
    from medbridge.cli.main import main
    from medbridge.methods import load_method, registry

    (tmp_path / "my_backbones.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_backbones", raising=False)
    registry.load_plugins("my_backbones:register")  # what MEDBRIDGE_PLUGINS=my_backbones:register does
    vision = _save_tiny_torchvision_vit(tmp_path / "tv-vit")
    bb = create_backbone(vision)
    v, x = bb.vision, _pixels(bb)
    with torch.no_grad():
        torch.testing.assert_close(v.finalize(v.run_blocks(v.embed(x))), v.reference_forward(x), atol=1e-5,
                                   rtol=1e-5)
    assert main(["list", "backbones"]) == 0
    table = capsys.readouterr().out
    assert "tv-vit-b-16" in table and "torchvision (torchvision VisionTransformer" in table
    data = nih_subset_csv(nih_sample, tmp_path / "data" / "labels.csv", n=40)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--backbone", vision, "--method", "linear-probe", "--out", str(out),
                 "--quiet", "--set", "train.workers=0", "--set", f"train.cache_dir={tmp_path / 'cache'}",
                 "--set", "data.fractions=[0.5,0.2,0.3]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"linear-probe"}
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--workers", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["macro"]["auroc"] == metrics["methods"]["linear-probe"]["macro"]["auroc"]
    image = sorted((nih_sample / "images").glob("*.jpg"))[0]
    assert main(["predict", str(out), str(image), "--json"]) == 0
    probs = json.loads(capsys.readouterr().out)[0]["probabilities"]
    method = load_method(out)
    np.testing.assert_allclose(method.predict([image])[0], [probs[k] for k in method.labels], atol=1e-6)
    assert method.backbones[0].name == vision
