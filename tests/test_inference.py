"""Batched device inference (``predict/serve/eval --device``, ``Method.predict``): the device path on ``cpu`` gives
the per-image direct scores whatever the batch size and worker count, in input order, with unreadable files
reported in place; workers come from the machine; the CLI and the service accept ``--device``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.helpers import save_tiny_clip

from medbridge.backbones import create_backbone
from medbridge.cli.main import main
from medbridge.data.focal import focal_views, read_view_image
from medbridge.methods import create_method, inference, save_method
from medbridge.methods.inference import default_workers, iter_scored, resolve_workers

LABELS = ["Effusion", "Pneumonia", "Cardiomegaly"]


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    source = save_tiny_clip(tmp_path_factory.mktemp("inference") / "tiny-clip")  # loadable again by predict/serve
    torch.manual_seed(0)  # untrained adapters: the scores only have to be the same function of the image
    return create_method("medbridge", {"num_queries": 2, "t1": 1}, backbones=[create_backbone(source)],
                         labels=LABELS, focal={"region_size": 512, "stride": 512})


@pytest.fixture(scope="module")
def images(nih_sample):
    return sorted((nih_sample / "images").glob("*.jpg"))[:7]


def direct(method, image) -> np.ndarray:
    """One image (file or array) at a time through ``scores_views`` (what predict did before batching)."""
    x, full = (image, None) if isinstance(image, np.ndarray) else read_view_image(image, method.focal,
                                                                                   method.preprocess)
    views = focal_views(x, method.focal, method.preprocess, full_size=full)
    with torch.no_grad():
        return method.scores_views([v.pixels.unsqueeze(0) for v in views])[0][0]


def test_batched_device_path_equals_per_image_scoring_for_any_batch_and_workers(method, images):
    expected = np.stack([direct(method, p) for p in images])
    for batch_size, workers in ((1, 0), (3, 1), (16, 0), (2, 2)):
        got = method.predict(images, batch_size=batch_size, device="cpu", workers=workers)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"batch {batch_size}, workers {workers}")
    arrays = [read_view_image(p, method.focal, method.preprocess)[0] for p in images[:2]]
    np.testing.assert_allclose(method.predict(arrays, device="cpu"), [direct(method, a) for a in arrays], atol=1e-5)


def test_images_with_different_view_counts_share_a_batch_in_input_order(method, images):
    small = np.random.default_rng(0).random((300, 300)).astype(np.float32)  # fewer views than a 1024 px X-ray
    mixed = [images[0], small, images[1]]
    got = [s for s in iter_scored(method, mixed, batch_size=3, device="cpu", workers=0)]
    assert [s.index for s in got] == [0, 1, 2]
    sizes = [s.boxes.shape[0] for s in got]
    assert sizes[0] == sizes[2] == 5 and sizes[1] < 5
    for s, x in zip(got, mixed):
        np.testing.assert_allclose(s.scores, direct(method, x), atol=1e-5)


def test_unreadable_files_are_reported_in_place_or_raised_naming_the_file(method, images, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"x" * 50)
    got = list(iter_scored(method, [images[0], bad, images[1]], batch_size=2, device="cpu", workers=1,
                           skip_unreadable=True))
    assert [s.index for s in got] == [0, 1, 2] and got[1].scores is None and "corrupt.jpg" in got[1].error
    with pytest.raises(Exception, match="corrupt.jpg"):
        list(iter_scored(method, [bad, images[0]], batch_size=2, device="cpu", workers=0))


def test_workers_come_from_the_machine_and_can_be_overridden(monkeypatch):
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda _: set(range(2)), raising=False)
    assert default_workers() == 1 and resolve_workers(None) == 1
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert default_workers() == 8
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert default_workers() == 0 and resolve_workers(3) == 3
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        resolve_workers(-1)


def test_predict_cli_device_flag_gives_the_python_numbers_and_refuses_a_missing_gpu(method, images, tmp_path,
                                                                                    capsys):
    folder = save_method(method, tmp_path / "medbridge")
    assert main(["predict", str(folder), *map(str, images[:3]), "--device", "cpu", "--workers", "1",
                 "--batch-size", "2", "--json", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cli = np.array([[r["probabilities"][lab] for lab in LABELS] for r in rows])
    np.testing.assert_allclose(cli, method.predict(images[:3], device="cpu"), atol=1e-6)
    assert [r["image"] for r in rows] == list(map(str, images[:3])) and len(rows[0]["views"]) == 5
    if not torch.cuda.is_available():
        assert main(["predict", str(folder), str(images[0]), "--device", "cuda", "--quiet"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_serve_scores_on_the_requested_device(method, images, tmp_path):
    from medbridge.serve.cli import _settings, add_serve_command
    from medbridge.serve.predictor import Predictor

    folder = save_method(method, tmp_path / "medbridge")
    pred = Predictor(folder, device="cpu")
    x = read_view_image(images[0], method.focal, method.preprocess)[0]
    probs, _ = pred.score([x])
    np.testing.assert_allclose(probs[0], method.predict([x], device="cpu")[0], atol=1e-6)
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", str(folder), "--device", "cuda:1"])
    assert _settings(args)["DEVICE"] == "cuda:1"
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="no CUDA GPU is visible"):
            Predictor(folder, device="cuda")
