"""The frozen-activation cache under damage, full disks, concurrent builders and disk budgets (issues 16, 18)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from collections import namedtuple

import numpy as np
import pytest
import torch
from tests.helpers import nih_subset_csv, random_targets

from medbridge.backbones.base import PreprocessConfig
from medbridge.data import FocalConfig, load_dataset
from medbridge.engine.cache import CacheError, CacheSpaceError, FeatureCache, format_size, parse_size
from medbridge.engine.features import CacheSpec, ComputedFeatures, build_cache

ONE_VIEW = FocalConfig(num_crops=0)
PREPROCESS = [PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3)]


@pytest.fixture
def table(tmp_path, nih_sample):
    return load_dataset("csv", nih_subset_csv(nih_sample, tmp_path / "d.csv", n=6))


def pixel_spec(calls: list | None = None, sleep: float = 0.0) -> CacheSpec:
    """A cache of per-image pixel statistics of the real images (8 numbers per view): cheap and image-specific."""

    def compute(pixels):
        if calls is not None:
            calls.append(pixels[0].shape[0])
        if sleep:
            import time

            time.sleep(sleep)
        px = pixels[0]
        return {"e0.frozen": torch.stack([px.mean((2, 3, 4)), px.std((2, 3, 4))] * 4, -1)}

    return CacheSpec({"what": "pixel-stats"}, {"e0.frozen": (1, 8)}, compute, ONE_VIEW, PREPROCESS)


def build(spec, table, root, **kw):
    return build_cache(spec, table, root=root, batch_size=2, workers=0, progress=False, **kw)


# --------------------------------------------------------------------------- issue 18 item 3: damage is detected
def test_rows_overwritten_with_noise_are_detected_and_rebuilt(tmp_path, table, caplog):
    calls = []
    cache = build(pixel_spec(calls), table, tmp_path / "c")
    good = cache.read(np.arange(6))["e0.frozen"].clone()
    data = cache.dir / "e0.frozen.f16"
    raw = bytearray(data.read_bytes())
    row = len(raw) // 6
    rng = np.random.default_rng(0)
    for r in (1, 4):  # a careless tool writes noise over two rows
        raw[r * row:(r + 1) * row] = rng.integers(0, 256, row, dtype=np.uint8).tobytes()
    data.write_bytes(bytes(raw))

    calls.clear()
    cache = build(pixel_spec(calls), table, tmp_path / "c")  # a later run: the rows are marked done
    assert not calls
    caplog.set_level(logging.WARNING)
    got = cache.read(np.array([5, 4, 1, 0]))["e0.frozen"]  # e.g. the trainer's first batch
    torch.testing.assert_close(got, good[[5, 4, 1, 0]], rtol=0, atol=0)
    assert sum(calls) == 2  # only the damaged rows were recomputed
    assert f"{data}: 2 row(s) fail their checksum (damaged on disk): rebuilding them" in caplog.text
    torch.testing.assert_close(cache.read(np.arange(6))["e0.frozen"], good, rtol=0, atol=0)

    data.write_bytes(bytes(raw))  # damaged again; read without a builder to rebuild the rows
    fresh = FeatureCache(tmp_path / "c", {"what": "pixel-stats", "images": cache_images(table)}, 6,
                         {"e0.frozen": (1, 8)})
    assert fresh.dir == cache.dir
    with pytest.raises(CacheError, match=r"2 row\(s\) damaged on disk .*medbridge cache rm"):
        fresh.read(np.arange(6))  # an error, never the noise
    assert not fresh.done()[[1, 4]].any() and fresh.done().sum() == 4  # ... and the next build recomputes them


def cache_images(table):
    from medbridge.engine.cache import image_keys

    return image_keys(table.paths)


def test_truncated_cache_file_is_detected_and_its_rows_rebuilt(tmp_path, table, caplog):
    calls = []
    cache = build(pixel_spec(calls), table, tmp_path / "c")
    good = cache.read(np.arange(6))["e0.frozen"].clone()
    data = cache.dir / "e0.frozen.f16"
    size = data.stat().st_size
    os.truncate(data, size // 2 - 5)  # rows 0..1 whole, row 2 cut, rows 3..5 gone
    calls.clear()
    caplog.set_level(logging.WARNING)
    cache = build(pixel_spec(calls), table, tmp_path / "c")
    assert data.stat().st_size == size
    assert f"cache file {data} has {size // 2 - 5} bytes, expected {size}" in caplog.text
    assert "4 row(s) rebuilt" in caplog.text and sum(calls) == 4
    torch.testing.assert_close(cache.read(np.arange(6))["e0.frozen"], good, rtol=0, atol=0)


# --------------------------------------------------------------------------- issue 18 item 10: full disk, two builders
def fake_disk(monkeypatch, free: int):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free + 1, 9 * free, free))


def test_not_enough_space_is_refused_before_any_file_is_made(tmp_path, table, monkeypatch):
    fake_disk(monkeypatch, free=100)
    with pytest.raises(CacheSpaceError) as info:
        FeatureCache(tmp_path / "c", {"k": 1}, 1000, {"e0.states": (5, 6, 257, 384)})
    msg = str(info.value)
    assert str(tmp_path / "c") in msg and "needs 5.5 GiB" in msg and "only 100 B is free" in msg
    assert not list((tmp_path / "c").glob("*/*.f16"))


def test_enospc_while_reserving_or_writing_is_a_cache_space_error(tmp_path, table, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(CacheSpaceError, match=r"no space left for the frozen-activation cache in .*c/"):
            build(pixel_spec(), table, tmp_path / "c", mode="pooled")
    cache = FeatureCache(tmp_path / "d", {"k": 1}, 6, {"e0.frozen": (1, 8)})
    assert all(os.stat(cache.dir / f).st_blocks > 0 for f in ("e0.frozen.f16", "e0.frozen.crc32"))  # reserved
    cache.write(np.arange(2), {"e0.frozen": torch.ones(2, 1, 8)})
    monkeypatch.setattr("medbridge.engine.cache.atomic_write_bytes", no_space)
    with pytest.raises(CacheSpaceError, match=str(cache.dir)):
        cache.mark_done(np.arange(2))


def test_two_runs_filling_the_same_cache_compute_each_row_once(tmp_path, table):
    calls: list[int] = []
    start = threading.Barrier(2)
    results, errors = [], []

    def run():
        try:
            start.wait()
            results.append(build(pixel_spec(calls, sleep=0.2), table, tmp_path / "c"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    assert sum(calls) == 6  # the second builder waited for the first and found every row done
    torch.testing.assert_close(results[0].read(np.arange(6))["e0.frozen"], results[1].read(np.arange(6))["e0.frozen"])


# --------------------------------------------------------------------------- issue 16: modes, budget, ls / rm
def tiny_method():
    from medbridge.backbones.registry import tiny_builders
    from medbridge.methods.medbridge.method import MedBridgeMethod
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    builders = tiny_builders()
    cfg = MedBridgeConfig(labels=["a", "b", "c"], backbones=["tiny"], num_queries=4, attention="isolated", t1=1,
                          focal=FocalConfig(region_size=0.5, stride=1.0, num_crops=2))
    model = MedBridgeModel(cfg, [builders["tiny-hf-dinov2"]()], text=builders["tiny-hf-clip"]().text)
    return MedBridgeMethod.from_model(model)


@pytest.mark.slow
def test_cache_modes_give_the_same_scores_and_auto_fits_the_budget(tmp_path, table, capsys):
    from tests.helpers import train_medbridge

    method = tiny_method()
    spec = method.cache_spec(3)
    assert list(spec.alternatives) == ["prefix"]
    caches = {m: build(spec, table, tmp_path / "c", mode=m) for m in ("full", "prefix", "none")}
    err = capsys.readouterr().err
    full, prefix = caches["full"], caches["prefix"]
    assert isinstance(caches["none"], ComputedFeatures) and prefix.dir != full.dir
    assert prefix.bytes < full.bytes
    assert f"mode full, {format_size(full.bytes)} for 6 images" in err and "free" in err and "budget" in err
    rows = np.arange(6)
    ref = method.scores_cached(full, rows)
    for mode in ("prefix", "none"):
        np.testing.assert_allclose(method.scores_cached(caches[mode], rows), ref, atol=2e-3, err_msg=mode)
    # training reads the modes through the same interface
    from medbridge.engine.config import TrainConfig

    cfg = TrainConfig(lr=1e-2, batch_size=3, epochs=1, checkpoint_every=0, workers=0)
    for mode in ("prefix", "none"):
        train_medbridge(method.model, caches[mode], random_targets(6, 3), rows, cfg, tmp_path / mode,
                        progress_bar=False)

    # auto: the fastest mode within the budget; an old cache of that mode is found again and not rebuilt
    between = f"{(prefix.bytes + full.bytes) // 2}"
    calls = []
    spec.alternatives["prefix"].compute = lambda px, f=spec.alternatives["prefix"].compute: calls.append(1) or f(px)
    again = build(spec, table, tmp_path / "c", budget=between)
    assert again.dir == prefix.dir and not calls
    assert "frozen-activation cache" not in capsys.readouterr().err  # complete: nothing to build, nothing printed
    # a named mode that does not fit is refused, naming the modes that do
    with pytest.raises(CacheSpaceError, match=r"train.cache=full: .* budget is .*modes that fit: prefix .*, none"):
        build(spec, table, tmp_path / "other", mode="full", budget=between)
    assert not (tmp_path / "other").exists()
    assert isinstance(build(spec, table, tmp_path / "other", budget="1K"), ComputedFeatures)  # auto: only none fits


def test_train_refuses_a_cache_over_budget_in_one_line(tmp_path, nih_sample, capsys):
    from tests.helpers import save_tiny_clip

    from medbridge.cli.main import main

    data = nih_subset_csv(nih_sample, tmp_path / "d.csv", n=12)
    argv = ["train", "--data", str(data), "--backbone", save_tiny_clip(tmp_path / "clip"), "--out",
            str(tmp_path / "run"), "--quiet", "--set", f"train.cache_dir={tmp_path / 'cache'}", "--set",
            "train.workers=0", "--set", "focal.num_crops=0", "--cache", "full", "--cache-budget", "40K"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medbridge: error: train.cache=full: the cache needs")
    assert "budget is 40.0 KiB" in err[0] and "modes that fit: prefix" in err[0]
    assert not any((tmp_path / "cache").glob("*/*.f16"))


def test_config_cache_modes_and_old_boolean_files(tmp_path):
    from medbridge.engine.config import ConfigError, config_from_dict, load_config

    assert config_from_dict({"train": {"cache": True}}).train.cache == "auto"
    assert config_from_dict({"train": {"cache": False}}).train.cache == "none"
    assert load_config(overrides=["train.cache=prefix", "train.cache_budget=20G"]).train.cache_budget == "20G"
    modes = "auto, full, prefix, pooled, pixels, none"
    with pytest.raises(ConfigError, match=rf"train.cache: 'fast' is not one of {modes}"):
        load_config(overrides=["train.cache=fast"])
    with pytest.raises(ConfigError, match=r"train.cache_budget: 'lots' is not a size"):
        load_config(overrides=["train.cache_budget=lots"])
    assert parse_size("1.5G") == 3 * 2**29 and parse_size("500MB") == 5 * 10**8 and parse_size(7) == 7


def test_cache_ls_and_rm(tmp_path, table, capsys):
    from medbridge.cli.main import main

    cache = build(pixel_spec(), table, tmp_path / "c")
    capsys.readouterr()
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert cache.key in out and "pixel-stats" in out and "6/6" in out and "1 cache(s)" in out
    assert main(["cache", "rm", "nomatch", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "matches 0 caches" in capsys.readouterr().err
    assert main(["cache", "rm", cache.key[:6], "--cache-dir", str(tmp_path / "c")]) == 0
    assert f"removed {cache.key}" in capsys.readouterr().out and not cache.dir.exists()
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "no frozen-activation caches" in capsys.readouterr().out


# --------------------------------------------------------------------------- issue 16: input pipeline
@pytest.mark.slow
def test_reduced_jpeg_decode_matches_the_full_decode_and_keeps_the_boxes(tmp_path, nih_sample):
    from PIL import Image

    from medbridge.data.focal import focal_views, read_view_image
    from medbridge.data.images import read_image

    src = sorted((nih_sample / "images").glob("*.jpg"))[0]
    big = tmp_path / "mimic-sized.jpg"  # MIMIC-CXR-JPG's size, from a real image
    Image.open(src).convert("L").resize((2544, 3056), Image.BICUBIC).save(big, quality=95)
    pre = PreprocessConfig(224, (0.5,) * 3, (0.25,) * 3)
    five_views = FocalConfig(region_size=0.5, stride=1.0)
    for path, focal, scale in ((src, ONE_VIEW, 2), (big, ONE_VIEW, 4), (big, five_views, 2)):
        image, full = read_view_image(path, focal, pre)
        ref_image = read_image(path)
        assert full == (ref_image.shape[1], ref_image.shape[0])
        assert image.shape == tuple(-(-n // scale) for n in ref_image.shape)  # the decoder's 1/scale decode
        got, ref = focal_views(image, focal, pre, full_size=full), focal_views(ref_image, focal, pre)
        assert torch.equal(got.boxes, ref.boxes)  # boxes in original pixels
        diff = ((got.pixels - ref.pixels) * 0.25).abs()  # in [0, 1] pixel units
        assert got.pixels.shape == ref.pixels.shape and diff.mean() < 2e-3 and diff.max() < 0.06
    # 512-px regions of a 1024-px image would fall under 2 x 224 px: full decode; so for a PNG
    assert read_view_image(src, FocalConfig(), pre)[1] is None
    Image.open(src).save(tmp_path / "a.png")
    image, full = read_view_image(tmp_path / "a.png", ONE_VIEW, pre)
    assert full is None and image.shape == (1024, 1024)


# --------------------------------------------------------------------------- issue 27: cache rm removes only caches
def test_cache_rm_removes_only_folders_medbridge_made(tmp_path, table, capsys):
    """A thesis beside the caches survives ``--all`` and a matching prefix; a symbolic link (even to a real
    cache) is named and skipped; a cache being built is reported while --all removes the rest."""
    from medbridge.cli.main import main
    from medbridge.engine.cache import build_lock

    root = tmp_path / "v"
    cache = build(pixel_spec(), table, root)
    other = build(pixel_spec(), table, tmp_path / "elsewhere")
    (root / "thesis").mkdir()
    (root / "thesis" / "ch1.tex").write_text("x")
    fake = root / ("a" * 20)  # named like a key, but no medbridge meta.json
    fake.mkdir()
    (fake / "meta.json").write_text('{"format": "mine"}')
    (root / ("b" * 20)).symlink_to(other.dir, target_is_directory=True)
    capsys.readouterr()
    assert main(["cache", "rm", "th", "--cache-dir", str(root)]) == 2
    assert "matches 0 caches" in capsys.readouterr().err
    assert main(["cache", "ls", "--cache-dir", str(root)]) == 0
    listed = capsys.readouterr().out
    assert "thesis" not in listed and "1 cache(s)" in listed
    with build_lock(cache.dir):
        assert main(["cache", "rm", "--all", "--cache-dir", str(root)]) == 2
    captured = capsys.readouterr()
    assert "not removed" in captured.err and cache.dir.exists()
    assert main(["cache", "rm", "--all", "--cache-dir", str(root)]) == 0
    captured = capsys.readouterr()
    assert f"removed {cache.key}" in captured.out and not cache.dir.exists()
    assert "skipped thesis" in captured.err and "skipped " + "b" * 20 + ": a symbolic link" in captured.err
    assert (root / "thesis" / "ch1.tex").read_text() == "x" and (fake / "meta.json").is_file()
    assert other.dir.is_dir() and (root / ("b" * 20)).is_symlink()
