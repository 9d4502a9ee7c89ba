"""A quick, real-data sanity check of a backbone's image and text embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.registry import create_backbone
from ..data.images import read_image, to_model_input

TEXT_TRIPLE = ("pleural effusion", "fluid in the pleural space", "normal heart size")


def _embed(backbone, images: list[np.ndarray]) -> torch.Tensor:
    cfg = backbone.vision.preprocess
    x = torch.stack([to_model_input(im, cfg) for im in images])
    with torch.no_grad():
        return F.normalize(backbone.vision(x), dim=-1)


def embedding_sanity_check(backbone_source: str, data_dir: str | Path, n_pairs: int = 8) -> dict:
    """For n images: is an augmented (flipped + 90% centre crop) copy closer than another patient's image?"""
    data_dir = Path(data_dir)
    files = sorted((data_dir / "images").glob("*.*")) if (data_dir / "images").is_dir() else []
    if len(files) < 2:
        raise FileNotFoundError(f"no images found under {data_dir / 'images'} (expected the NIH sample layout)")
    backbone = create_backbone(backbone_source)
    by_patient: dict[str, Path] = {}
    for f in files:  # NIH names: {patient:08d}_{followup:03d}
        by_patient.setdefault(f.stem.split("_")[0], f)
    picks = list(by_patient.values())[: n_pairs + 1]
    images = [read_image(p) for p in picks]
    augmented = []
    for im in images[:-1]:
        h, w = im.shape[:2]
        crop = im[int(0.05 * h): int(0.95 * h), int(0.05 * w): int(0.95 * w)]
        augmented.append(np.ascontiguousarray(crop[:, ::-1]))
    orig = _embed(backbone, images)
    aug = _embed(backbone, augmented)
    same = (orig[:-1] * aug).sum(-1)
    other = (orig[:-1] * orig[1:]).sum(-1)  # each image vs the next patient's image
    image_ok = bool((same > other).all())
    report = {
        "backbone": backbone_source, "images": [p.name for p in picks],
        "cos_augmented_copy": [round(v, 4) for v in same.tolist()],
        "cos_other_patient": [round(v, 4) for v in other.tolist()],
        "image_check_passed": image_ok,
    }
    text_ok = True
    if backbone.text is not None:
        with torch.no_grad():
            t = F.normalize(backbone.text.encode_text(list(TEXT_TRIPLE)).projected, dim=-1)
        syn, unrelated = float(t[0] @ t[1]), float(t[0] @ t[2])
        text_ok = syn > unrelated
        report.update(cos_synonym=round(syn, 4), cos_unrelated=round(unrelated, 4), text_check_passed=text_ok)
    report["passed"] = image_ok and text_ok
    lines = [f"backbone {backbone_source}: {backbone.num_parameters():,} frozen parameters",
             f"image: cos(original, flipped+cropped copy) mean {same.mean():.3f} vs cos(other patient) mean "
             f"{other.mean():.3f} over {len(same)} real X-rays -> {'OK' if image_ok else 'FAILED'}"]
    if backbone.text is not None:
        lines.append(f"text: cos('{TEXT_TRIPLE[0]}', '{TEXT_TRIPLE[1]}') = {report['cos_synonym']:.3f} vs "
                     f"cos(.., '{TEXT_TRIPLE[2]}') = {report['cos_unrelated']:.3f} -> {'OK' if text_ok else 'FAILED'}")
    report["summary"] = "\n".join(lines)
    return report
