"""Per-label heat maps for any trained method: gradient x activation on the frozen tower's patch tokens.

For each label, the label's logit is differentiated with respect to the vision tokens entering block ``layer`` of
the frozen tower; per patch, ``relu(sum_channels(gradient * (token - reference token)))`` says how much that patch's
current content pushes the label up compared with the same image filled with its mean (the reference; plain gradient
x activation with ``reference="zero"``). Every view (the whole image and, for MedBridge, its focal crops)
contributes its patch grid pasted into its box on the image, so crops the model pooled from show up where they are.
The forward pass is the method's own (the backbone's ``embed``/``run_blocks``/``finalize``, the adapter's
``forward_cached``, the probe, the baseline module), run with gradients; all labels are explained in one batched
backward pass (one copy of the views per label). Faithfulness is checked by a deletion test (docs/serve.md).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.focal import focal_views
from ..methods.api import Explainable, Method, require

#: Default explained layer: None = the deepest block input every path of the method still runs through (MedBridge's
#: T1, where its queries join; the last block for a probe or pooled-feature baseline; a prefix-caching baseline's
#: prefix). Chosen by the deletion test in docs/serve.md (deeper was more faithful than the patch embedding).
DEFAULT_LAYER: int | None = None
#: Relevance relative to the tokens of the image filled with its "mean" (gradient x (activation - reference): the
#: first-order estimate of what blanking a region does), or to "zero" tokens (plain gradient x activation). "mean"
#: passed the deletion test in docs/serve.md where "zero" did not.
DEFAULT_REFERENCE = "mean"


def _towers(method: Method) -> list:
    return [b.vision for b in method.backbones]


def explained_layers(method: Method, layer: int | None = DEFAULT_LAYER) -> list[int]:
    """The block index whose input tokens are explained, per expert (``layer`` clamped to what the method runs;
    None: the deepest); refused for a method without explanations (not :class:`Explainable`)."""
    require(method, Explainable, "explanations (predict --explain, the service's heat maps)")
    tops = [method.explain_top_block(k) for k in range(len(method.backbones))]
    return [top if layer is None else max(0, min(layer, top)) for top in tops]


def _logits_from_tokens(method: Method, tokens: list[Tensor], layers: list[int], b: int, n: int) -> Tensor:
    """The method's logits [b, labels] from the frozen tokens entering block ``layers[k]`` ([b*n, T, width] per
    expert), differentiable with respect to those tokens (each method's ``logits_from_tokens``)."""
    return method.logits_from_tokens(tokens, layers, b, n)


def token_relevance(method: Method, pixels: list[Tensor], labels: list[int],
                    layer: int | None = DEFAULT_LAYER, reference: list[Tensor] | None = None
                    ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Views of ONE image (per expert [1, N, 3, S, S]) and label indices -> (their probabilities [k], per expert
    patch relevance [k, N, g, g]: relu of gradient x activation, summed over channels). ``reference``: views of a
    reference image (same shapes): gradient x (activation - the reference's activation) instead."""
    k = len(labels)
    layers = explained_layers(method, layer)
    tokens, offsets = [], []
    dev = next(method.parameters()).device  # the method's device (serve/predict --device)
    with torch.no_grad():
        for e, (v, px, start) in enumerate(zip(_towers(method), pixels, layers)):
            x = v.run_blocks(v.embed(px.flatten(0, 1).to(dev)), 0, start)
            offsets.append(0 if reference is None else v.run_blocks(v.embed(reference[e].flatten(0, 1).to(dev)), 0,
                                                                    start))
            tokens.append(x.repeat(k, 1, 1).requires_grad_(True))  # one copy of the views per explained label
    n = pixels[0].shape[1]
    with torch.enable_grad():
        logits = _logits_from_tokens(method, tokens, layers, k, n)[torch.arange(k), torch.as_tensor(labels)]
        logits.sum().backward()  # copy j backpropagates its own label only
    probs = torch.sigmoid(logits.detach().float()).cpu().numpy()
    maps = []
    for v, x, ref in zip(_towers(method), tokens, offsets):
        delta = x.detach() - (ref.repeat(k, 1, 1) if torch.is_tensor(ref) else ref)
        rel = (x.grad * delta).sum(-1)[:, v.num_prefix_tokens:].clamp_min(0)
        g = int(round(rel.shape[-1] ** 0.5))
        if g * g != rel.shape[-1]:
            raise ValueError(f"{rel.shape[-1]} patch tokens do not form a square grid")
        maps.append(rel.view(k, n, g, g).float().cpu().numpy())
    return probs, maps


def heat_maps(method: Method, image: np.ndarray, labels: list[int] | None = None,
              layer: int | None = DEFAULT_LAYER, max_side: int = 128, reference: str = DEFAULT_REFERENCE) -> dict:
    """One image (H x W [x 3], [0, 1]) and label indices (default: all) -> {"labels": the indices,
    "probabilities": [k], "maps": [k, h, w] in [0, 1] (each scaled by its own maximum), "scale": [k] the maximum
    before scaling, "boxes": the views' boxes, "size": (h, w)}. ``h, w``: the image's aspect, long side
    ``max_side``."""
    labels = list(range(len(method.labels))) if labels is None else list(labels)
    views = focal_views(image, method.focal, method.preprocess)
    pixels = [v.pixels.unsqueeze(0) for v in views]
    ref = None
    if reference == "mean":  # relevance relative to the image filled with its mean (what deleting a region does)
        flat = np.broadcast_to(image.mean(axis=(0, 1)), image.shape).astype(np.float32)
        ref = [v.pixels.unsqueeze(0) for v in focal_views(flat, method.focal, method.preprocess)]
    elif reference != "zero":
        raise ValueError(f"reference must be 'zero' or 'mean', got {reference!r}")
    probs, maps = token_relevance(method, pixels, labels, layer, ref)
    h0, w0 = image.shape[:2]
    s = max_side / max(h0, w0)
    h, w = max(1, round(h0 * s)), max(1, round(w0 * s))
    total = torch.zeros(len(labels), h, w)
    boxes = views[0].boxes.tolist()
    for rel in maps:  # experts
        rel = torch.from_numpy(rel)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            a, b_ = int(round(y0 * s)), max(int(round(y1 * s)), int(round(y0 * s)) + 1)
            c, d = int(round(x0 * s)), max(int(round(x1 * s)), int(round(x0 * s)) + 1)
            patch = F.interpolate(rel[:, k:k + 1], size=(b_ - a, d - c), mode="bilinear", align_corners=False)
            total[:, a:b_, c:d] += patch[:, 0] * (rel.shape[-1] * rel.shape[-2]) / ((b_ - a) * (d - c))
    scale = total.flatten(1).amax(1)
    maps_out = (total / scale.clamp_min(1e-12)[:, None, None]).clamp(0, 1)
    return {"labels": labels, "probabilities": probs, "maps": maps_out.numpy(), "scale": scale.numpy(),
            "boxes": boxes, "size": (h, w)}


def hottest_box(heat: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """The ``side`` x ``side`` square (x0, y0, x1, y1) with the largest summed heat (heat at image resolution)."""
    h, w = heat.shape
    side = min(side, h, w)
    c = np.pad(heat, ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # summed-area table
    sums = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x), int(y), int(x) + side, int(y) + side


def deletion_test(method: Method, images: list[np.ndarray], labels_per_image: int = 3,
                  region_fraction: float = 0.25, n_random: int = 3, layer: int | None = DEFAULT_LAYER, seed: int = 0,
                  reference: str = DEFAULT_REFERENCE) -> list[dict]:
    """Faithfulness by deletion: for each image's ``labels_per_image`` most probable labels, fill the square of side
    ``region_fraction`` x the short side where the label's heat map is hottest with the image's mean, and (as the
    control) ``n_random`` squares of the same size at uniformly random positions; rows with the label's
    probability before, after deleting the hottest square, and the mean after the random squares."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, image in enumerate(images):
        px = [v.pixels.unsqueeze(0) for v in focal_views(image, method.focal, method.preprocess)]
        top = np.argsort(-method.scores_views(px)[0][0])[:labels_per_image].tolist()
        res = heat_maps(method, image, top, layer, reference=reference)
        h, w = image.shape[:2]
        side = max(1, int(round(region_fraction * min(h, w))))
        fill = image.mean(axis=(0, 1))
        views = []
        for k in range(len(top)):
            heat = F.interpolate(torch.from_numpy(res["maps"][k])[None, None], size=(h, w), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
            boxes = [hottest_box(heat, side)]
            for _ in range(n_random):
                x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                boxes.append((x0, y0, x0 + side, y0 + side))
            for x0, y0, x1, y1 in boxes:
                masked = image.copy()
                masked[y0:y1, x0:x1] = fill
                views.append(focal_views(masked, method.focal, method.preprocess))
        pixels = [torch.stack([v[e].pixels for v in views]) for e in range(len(method.preprocess))]
        probs = method.scores_views(pixels)[0].reshape(len(top), n_random + 1, -1)
        for k, c in enumerate(top):
            rows.append({"image": i, "label": method.labels[c], "p": float(res["probabilities"][k]),
                         "p_hot": float(probs[k, 0, c]), "p_random": float(probs[k, 1:, c].mean())})
    return rows


HEAT_STOPS = np.array([[0, 0, 255], [0, 192, 255], [64, 255, 64], [255, 255, 0], [255, 32, 0]], dtype=np.float32)


def overlay_png(image: np.ndarray, heat: np.ndarray, boxes: list | None = None, votes: list[float] | None = None,
                opacity: float = 0.6, max_side: int = 1024) -> bytes:
    """The image (long side ``max_side``) with ``heat`` ([h, w] in [0, 1]) blended on top in the page's colours
    (blue -> red, more opaque where hotter) and, for MedBridge, the focal boxes with their votes; PNG bytes."""
    from PIL import Image, ImageDraw

    grey = np.clip(image if image.ndim == 2 else image.mean(-1), 0, 1)
    base = Image.fromarray((grey * 255).round().astype(np.uint8)).convert("RGB")
    base.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    w, h = base.size
    v = F.interpolate(torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None], size=(h, w),
                      mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
    x = v * (len(HEAT_STOPS) - 1)
    i = np.minimum(x.astype(int), len(HEAT_STOPS) - 2)
    t = (x - i)[..., None]
    colour = HEAT_STOPS[i] * (1 - t) + HEAT_STOPS[i + 1] * t
    alpha = (opacity * np.clip(0.15 + v, 0, 1) * (v >= 0.02))[..., None]
    out = Image.fromarray((np.asarray(base, dtype=np.float32) * (1 - alpha) + colour * alpha).round()
                          .astype(np.uint8))
    if boxes and len(boxes) > 1:
        draw = ImageDraw.Draw(out)
        s = w / image.shape[1]
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            if k == 0 and (x0, y0) == (0, 0) and (x1, y1) == (image.shape[1], image.shape[0]):
                continue  # the whole image
            vote = votes[k] if votes else 0.0
            draw.rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=(255, 212, 0),
                           width=max(1, round(2 + 6 * vote)))
            draw.text((x0 * s + 4, y0 * s + 4), f"vote {vote:.2f}", fill=(255, 212, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def write_explanations(method: Method, rows: list[dict], folder: Path, top: int = 3,
                       overwrite: bool = False, layer: int | None = DEFAULT_LAYER) -> list[Path]:
    """For each predicted image (rows of :func:`medbridge.engine.evaluate.predict_images`), overlays of its
    positive labels and its ``top`` most probable ones: ``folder/<n>_<image stem>_<label>.png``. Existing files
    are refused unless ``overwrite``."""
    from ..data.images import read_image
    from ..io import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n, row in enumerate(rows):
        if "error" in row:
            continue
        probs = np.array([row["probabilities"][lab] for lab in method.labels])
        chosen = sorted(set(np.argsort(-probs)[:top].tolist()) | {method.labels.index(x) for x in row["labels"]})
        image = read_image(row["image"])
        res = heat_maps(method, image, chosen, layer)
        votes = [v["vote"] for v in row["views"]] if "views" in row else None
        for k, c in enumerate(chosen):
            label = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in method.labels[c])
            target = folder / f"{n:04d}_{Path(row['image']).stem}_{label}.png"
            if target.exists() and not overwrite:
                raise FileExistsError(f"--explain: {target} exists: choose another folder or pass --overwrite")
            atomic_write_bytes(target, overlay_png(image, res["maps"][k], res["boxes"], votes))
            written.append(target)
    return written
