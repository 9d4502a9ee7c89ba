"""Regression tests of issue 18's engine defects: nothing lost, nothing silently wrong (each failed before its fix)."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from tests.helpers import nih_subset_csv, save_tiny_clip

from medbridge.cli.main import main
from medbridge.io import CorruptFileError, check_finite, load_tensors, tensor_digest
from medbridge.methods.registry import config_digest


@pytest.fixture(scope="module")
def run(tmp_path_factory, nih_sample):
    """A MedBridge run + linear probe trained through the CLI on 40 real NIH images: a tiny CLIP vision tower with
    the bundled MiniLM text tower (real weights, 19 dropout layers at p = 0.1)."""
    root = tmp_path_factory.mktemp("rel")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=40)
    vision = save_tiny_clip(root / "tiny-clip")
    out = root / "run"
    argv = ["train", "--data", str(data), "--backbone", f"{vision}+minilm-l6", "--out", str(out), "--with-probe",
            "--quiet", "--set", "train.epochs=1", "--set", f"train.cache_dir={root / 'cache'}",
            "--set", "train.workers=0", "--set", "focal.num_crops=0", "--set", "data.fractions=[0.5,0.2,0.3]"]
    assert main(argv) == 0
    return {"root": root, "data": data, "out": out, "argv": argv, "cache": str(root / "cache")}


def _eval_json(run, target, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(target), "--data", str(run["data"]), "--json", "--cache-dir", run["cache"],
                 "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_frozen_text_tower_stays_in_eval_mode(bundled_backbone):
    """model.train() used to switch the frozen MiniLM's dropout on, and label features were cached with it."""
    from medbridge.methods.medbridge.adapter import build_medbridge
    from medbridge.methods.medbridge.model import MedBridgeConfig

    cfg = MedBridgeConfig(labels=["Effusion", "Pneumonia"], backbones=["dinov2-small+minilm-l6"], num_queries=2)
    model = build_medbridge(cfg, [bundled_backbone]).train()
    towers = [m for m in model.modules() if m.__class__.__name__.endswith("Tower")]
    assert towers and all(not m.training for t in towers for m in t.modules())
    names = ["effusion", "pneumonia"]
    first = model.text_head.frozen_features(model.text_head.prompts(names)).clone()
    model.text_head._cache.clear()
    assert torch.equal(first, model.text_head.frozen_features(model.text_head.prompts(names)))


def test_saved_methods_reproduce_the_run_metrics_exactly(run, capsys):
    metrics = json.loads((run["out"] / "metrics.json").read_text())["methods"]
    for method, folder in (("medbridge", run["out"]), ("linear-probe", run["out"] / "linear_probe")):
        res = _eval_json(run, folder, capsys)
        assert res["macro"]["auroc"] == metrics[method]["macro"]["auroc"], method
        assert res["macro"]["f1"] == metrics[method]["macro"]["f1"], method


def test_predict_never_overwrites_an_input_or_an_existing_file(run, tmp_path, nih_sample, capsys):
    image = tmp_path / "xray.jpg"
    shutil.copy(sorted((nih_sample / "images").glob("*.jpg"))[0], image)
    before = image.read_bytes()
    assert main(["predict", str(run["out"]), str(image), "--out", str(image)]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err and image.read_bytes() == before
    assert main(["predict", str(run["out"]), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["predict", str(run["out"]), str(image), "--out", str(tmp_path / "p.csv")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["predict", str(run["out"]), str(image), "--out", str(tmp_path / "p.csv"), "--overwrite"]) == 0
    (tmp_path / "d.json").mkdir()
    assert main(["predict", str(run["out"]), str(image), "--out", str(tmp_path / "d.json")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_skipped_images_are_not_counted_as_predictions(run, tmp_path, nih_sample, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40)
    good = sorted((nih_sample / "images").glob("*.jpg"))[0]
    capsys.readouterr()
    assert main(["predict", str(run["out"]), str(bad), str(good), "--skip-unreadable",
                 "--out", str(tmp_path / "p.csv")]) == 0
    assert "1 predictions written" in capsys.readouterr().out


def _copy_method(run, tmp_path, name: str):
    dst = tmp_path / name
    shutil.copytree(run["out"] / name, dst)
    return dst


def _flip(path, offset_from_end: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= mask
    path.write_bytes(bytes(raw))


def test_flipped_weight_bits_are_detected(run, tmp_path, nih_sample, capsys):
    image = str(sorted((nih_sample / "images").glob("*.jpg"))[0])
    for name, weights in (("linear_probe", "adapter.safetensors"), ("medbridge", "adapter.safetensors")):
        folder = _copy_method(run, tmp_path, name)
        _flip(folder / weights, 3, 0x01)  # a mantissa bit of the last tensor
        assert main(["predict", str(folder), image, "--json"]) == 2
        assert "digest" in capsys.readouterr().err
        shutil.copy(run["out"] / name / weights, folder / weights)
        _flip(folder / weights, 1, 0x40)  # an exponent bit: inf/NaN probabilities before the fix
        assert main(["predict", str(folder), image, "--json"]) == 2
        assert "digest" in capsys.readouterr().err


def test_non_finite_scores_are_an_error_never_an_empty_cell(run, tmp_path, nih_sample, capsys):
    folder = _copy_method(run, tmp_path, "linear_probe")
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "adapter.safetensors"))
    t["weight"][0, 0] = float("nan")  # what an exponent flip can give
    save_file(t, str(folder / "adapter.safetensors"))
    cfg = json.loads((folder / "adapter.json").read_text())
    cfg["weights_sha256"] = tensor_digest(t)  # digests re-signed: the scores themselves are checked
    cfg["config_sha256"] = config_digest(cfg)
    (folder / "adapter.json").write_text(json.dumps(cfg))
    image = str(sorted((nih_sample / "images").glob("*.jpg"))[0])
    assert main(["predict", str(folder), image, "--out", str(tmp_path / "p.csv")]) == 2
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    with pytest.raises(CorruptFileError, match="1 non-finite"):
        check_finite(np.array([[0.1, np.nan], [0.2, 0.3]]), "scores")


def test_probe_with_fewer_labels_than_weights_is_refused(run, tmp_path, nih_sample, capsys):
    folder = _copy_method(run, tmp_path, "linear_probe")
    cfg = json.loads((folder / "adapter.json").read_text())
    cfg["labels"], cfg["prompt_names"] = cfg["labels"][:-1], cfg["prompt_names"][:-1]
    cfg["config_sha256"] = config_digest(cfg)  # re-signed: the shapes are checked too
    (folder / "adapter.json").write_text(json.dumps(cfg))
    assert main(["predict", str(folder), str(sorted((nih_sample / "images").glob("*.jpg"))[0])]) == 2
    assert "shapes do not fit this linear-probe with 2 labels" in capsys.readouterr().err


def test_damaged_or_foreign_weight_files_give_one_line(run, tmp_path, nih_sample, capsys):
    image = str(sorted((nih_sample / "images").glob("*.jpg"))[0])
    folder = _copy_method(run, tmp_path, "linear_probe")
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert main(["predict", str(folder), image]) == 2
    err = capsys.readouterr().err
    assert "adapter.safetensors: not a readable safetensors file" in err and "Traceback" not in err
    weights.write_bytes(pickle.dumps({"weight": [1, 2]}))  # a pickle renamed .safetensors: never unpickled
    assert main(["predict", str(folder), image]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (folder / "adapter.json").write_text("{not json")
    assert main(["predict", str(folder), image]) == 2
    assert "adapter.json: invalid method config" in capsys.readouterr().err
    good = {"a": torch.ones(2)}
    with pytest.raises(CorruptFileError, match="digest"):
        from safetensors.torch import save_file

        save_file(good, str(tmp_path / "w.safetensors"))
        load_tensors(tmp_path / "w.safetensors", tensor_digest({"a": torch.zeros(2)}))


def test_overwrite_replaces_the_previous_run_and_refuses_foreign_folders(run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run["out"], out)
    argv = [a if a != str(run["out"]) else str(out) for a in run["argv"] if a != "--with-probe"]
    argv += ["--method", "linear-probe"]
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "medbridge").exists() and not (out / "predictions_medbridge.csv").exists()
    assert set(json.loads((out / "metrics.json").read_text())["methods"]) == {"linear-probe"}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("important")
    argv = [a if a != str(out) else str(foreign) for a in argv]
    assert main(argv + ["--overwrite"]) == 2
    assert "not made by medbridge" in capsys.readouterr().err and (foreign / "thesis.tex").is_file()
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a if a != str(foreign) else str(afile) for a in argv]
    assert main(argv) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_resume_refuses_a_changed_config(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    shutil.copytree(run["out"], out)
    argv = [a if a != str(run["out"]) else str(out) for a in run["argv"]]
    assert main(argv + ["--resume", "--set", "train.lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: saved 0.0005, now 0.05" in err
    assert "lr: 0.0005" in (out / "config.yaml").read_text()
    assert main(argv + ["--resume", "--set", "train.workers=1"]) == 0  # where it runs may change
    # method options compare as the options the methods get: a default given explicitly is the same run
    assert main(argv + ["--resume", "--set", "method_options.medbridge.case_views=true"]) == 0
    assert main(argv + ["--resume", "--set", "method_options.medbridge.num_queries=3"]) == 2
    assert "method_options.medbridge.num_queries: saved 8, now 3" in capsys.readouterr().err
    monkeypatch.chdir(run["data"].parent)  # the same dataset named by a relative path (issue 27)
    relative = [a if a != str(run["data"]) else run["data"].name for a in argv]
    assert main(relative + ["--resume"]) == 0, capsys.readouterr().err


def test_malicious_checkpoint_on_resume_is_refused_without_unsafe_advice(run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run["out"], out)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (out / "checkpoint.pt").write_bytes(pickle.dumps({"trainable": Evil()}))
    argv = [a if a != str(run["out"]) else str(out) for a in run["argv"]]
    assert main(argv + ["--resume"]) == 2
    captured = capsys.readouterr()
    assert "checkpoint.pt: not a medbridge checkpoint that can be read safely" in captured.err
    assert "weights_only=False" not in captured.err and "executed" not in captured.out


def test_failed_run_leaves_no_files(run, tmp_path, capsys):
    out = tmp_path / "r"
    argv = [a if a != str(run["out"]) else str(out) for a in run["argv"]]
    argv[argv.index("--backbone") + 1] = f"local-dir:{tmp_path / 'missing'}"  # fails after config.yaml is written
    assert main(argv) == 2
    assert "missing" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_registered_hub_backbone_offline_fails_fast_before_the_library_retries(monkeypatch):
    """One request decides (as for the hf-hub: form); open_clip's minute of retries is never entered."""
    import huggingface_hub
    import open_clip

    from medbridge.backbones import create_backbone
    from medbridge.backbones.loading import HubUnreachableError

    def unreachable(*args, **kwargs):
        raise ConnectionError("huggingface.co unreachable")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the library's own download (with retries) was entered")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    monkeypatch.setattr(open_clip, "create_model", must_not_run)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", must_not_run)
    monkeypatch.setattr("medbridge.backbones.registry._hf_cached", lambda repo: False)
    with pytest.raises(HubUnreachableError, match=r"clip-vit-b-16 \(hf-hub:timm/.*unreachable from this machine"):
        create_backbone("clip-vit-b-16")


def test_image_errors_inside_dataloader_workers_are_one_line(run, tmp_path, nih_sample, capsys):
    """A corrupt image decoded in a worker process: exit 2, one line naming the file, no worker traceback."""
    import pandas as pd

    frame = pd.read_csv(run["data"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    frame.loc[3, "path"] = str(bad)
    frame.to_csv(tmp_path / "labels.csv", index=False)
    argv = [a if a != str(run["data"]) else str(tmp_path / "labels.csv") for a in run["argv"]]
    argv = [a if a != str(run["out"]) else str(tmp_path / "out") for a in argv]
    argv[argv.index("train.workers=0")] = "train.workers=1"
    argv[argv.index(f"train.cache_dir={run['root'] / 'cache'}")] = f"train.cache_dir={tmp_path / 'cache'}"
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("medbridge: error")]
    assert len(errors) == 1 and "broken.jpg" in errors[0] and "corrupt image" in errors[0]
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_an_out_folder_that_cannot_be_written_is_one_line(run, tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root writes anywhere: a path under a file stands in for an unwritable place
        target = tmp_path / "afile" / "run"
        (tmp_path / "afile").write_text("x")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "run"
    argv = [a if a != str(run["out"]) else str(target) for a in run["argv"]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write there" in err[0] and str(target) in err[0]
