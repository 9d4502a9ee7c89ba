"""The commands users run: train / eval / predict / demo through ``main(argv)`` on real NIH images."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from tests.helpers import nih_subset_csv, rg1_dicom, save_tiny_clip

from medbridge.cli.main import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, nih_sample):
    """A MedBridge run (plus linear probe) trained through the CLI on 48 real NIH images with a tiny CLIP."""
    root = tmp_path_factory.mktemp("cli")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=48)
    backbone = save_tiny_clip(root / "tiny-clip")
    out = root / "run"
    argv = ["train", "--data", str(data), "--backbone", backbone, "--out", str(out), "--with-probe", "--quiet",
            "--set", "train.epochs=2", "--set", f"train.cache_dir={root / 'cache'}", "--set", "train.workers=0",
            "--set", "focal.region_size=512", "--set", "focal.stride=512",
            "--set", "data.fractions=[0.5,0.2,0.3]"]
    assert main(argv) == 0
    return {"root": root, "data": data, "out": out, "argv": argv, "backbone": backbone}


def test_train_writes_a_complete_run_folder(tiny_run):
    out = tiny_run["out"]
    for name in ("config.yaml", "split.json", "log.jsonl", "metrics.json", "per_class.csv", "roc_curves.png",
                 "report.md", "predictions_medbridge.csv", "predictions_linear-probe.csv",
                 "medbridge/adapter.safetensors", "medbridge/adapter.json", "linear_probe/adapter.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"medbridge", "linear-probe"}
    med = metrics["methods"]["medbridge"]
    assert 0 <= med["macro"]["auroc"] <= 1 and med["thresholds"] and med["per_class"]
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]
    preds = pd.read_csv(out / "predictions_medbridge.csv")
    assert len(preds) == metrics["split"]["test"] and "p_Pneumonia" in preds and "y_Pneumonia" in preds


def test_existing_run_folder_is_not_overwritten_and_resume_finishes(tiny_run, capsys):
    assert main(tiny_run["argv"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    before = json.loads((tiny_run["out"] / "metrics.json").read_text())["methods"]["medbridge"]["macro"]
    assert main(tiny_run["argv"] + ["--resume"]) == 0  # already complete: evaluates the same adapter again
    after = json.loads((tiny_run["out"] / "metrics.json").read_text())["methods"]["medbridge"]["macro"]
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-9)


def test_eval_json_matches_the_run_and_cross_dataset_alignment(tiny_run, capsys, nih_sample):
    cache = str(tiny_run["root"] / "cache")
    assert main(["eval", str(tiny_run["out"]), "--data", str(tiny_run["data"]), "--json", "--cache-dir", cache,
                 "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    run = json.loads((tiny_run["out"] / "metrics.json").read_text())["methods"]["medbridge"]
    assert res["split"] == "test" and res["n"] == run["n"]
    assert res["macro"]["auroc"] == pytest.approx(run["macro"]["auroc"], abs=1e-6)
    assert res["macro"]["f1"] == pytest.approx(run["macro"]["f1"], abs=1e-6)
    # another dataset (the NIH folder, 14 NIH labels): aligned onto the run's 3 labels; first 40 images only
    other = tiny_run["root"] / "other.csv"
    frame = pd.read_csv(tiny_run["data"]).rename(columns={"Effusion": "Pleural Effusion"})
    frame.drop(columns=["Infiltration"]).assign(Fracture=0).to_csv(other, index=False)
    assert main(["eval", str(tiny_run["out"] / "linear_probe"), "--data", str(other), "--format", "csv", "--json",
                 "--cache-dir", cache, "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "all" and res["n"] == 48 and res["method"] == "linear-probe"
    assert res["alignment"]["sources"] == {"Pneumonia": ["Pneumonia"], "Infiltration": [],
                                           "Effusion": ["Pleural Effusion"]}
    assert res["alignment"]["missing"] == ["Infiltration"] and "Infiltration" in res["skipped"]
    # MedBridge can instead score the other dataset's own label names through its text prompts
    assert main(["eval", str(tiny_run["out"]), "--data", str(other), "--format", "csv", "--json", "--label-space",
                 "data", "--cache-dir", cache, "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["per_class"]) | set(res["skipped"]) == {"Pneumonia", "Pleural Effusion", "Fracture"}
    assert res["alignment"] is None and "Fracture" in res["skipped"]
    assert main(["eval", str(tiny_run["out"] / "linear_probe"), "--data", str(other), "--format", "csv",
                 "--label-space", "data", "--cache-dir", cache, "--workers", "0"]) == 2  # a probe has no prompts


def test_predict_png_and_real_dicom(tiny_run, tmp_path, capsys, nih_sample):
    dicom = rg1_dicom()
    png = sorted((nih_sample / "images").glob("*.jpg"))[0]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run["out"]), str(png), str(dicom), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame["image"]) == [str(png), str(dicom)]
    assert {"p_Pneumonia", "p_Infiltration", "p_Effusion", "labels", "gate", "views"} <= set(frame.columns)
    assert frame["p_Pneumonia"].between(0, 1).all()
    views = json.loads(frame["views"][0])
    assert len(views) == 5 and views[0]["box"] == [0, 0, 1024, 1024]
    capsys.readouterr()
    assert main(["predict", str(tiny_run["out"] / "linear_probe"), str(png), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[0]["probabilities"]) == {"Pneumonia", "Infiltration", "Effusion"}
    assert main(["predict", str(tiny_run["out"]), str(tmp_path / "missing.png")]) == 2
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 40)
    assert main(["predict", str(tiny_run["out"]), str(bad), str(png)]) == 2
    assert main(["predict", str(tiny_run["out"]), str(bad), str(png), "--skip-unreadable", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "corrupt.png" in rows[0]["error"] and rows[1]["image"] == str(png) and rows[1]["probabilities"]


def test_demo_without_data_says_where_to_point(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no NIH ChestX-ray14 data" in capsys.readouterr().err


def test_train_config_error_exit_code(tmp_path, capsys, nih_sample):
    assert main(["train", "--data", str(nih_sample), "--out", str(tmp_path / "r"), "--set",
                 "train.schedule=warm"]) == 2
    assert "train.schedule" in capsys.readouterr().err


def test_benchmark_and_ablate_commands(tiny_run, tmp_path, capsys):
    common = ["--data", str(tiny_run["data"]), "--set", "train.epochs=1", "--set",
              f"train.cache_dir={tiny_run['root'] / 'cache'}", "--set", "train.workers=0",
              "--set", "focal.stride=512", "--set", "data.fractions=[0.5,0.2,0.3]", "--quiet"]
    out = tmp_path / "bench"
    assert main(["benchmark", *common, "--backbone", tiny_run["backbone"], "--methods",
                 "medbridge,zero-shot,coop,mma,mmrl", "--seeds", "0,1", "--set", "method_options.baseline.epochs=1",
                 "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    for m in ("medbridge", "zero-shot", "coop"):
        assert f"| {m} | 2 |" in text
    assert "- mma: mma adapts blocks 5..end; the towers have 4 / 4 blocks" in text  # the tiny CLIP is 4 deep
    assert "- mmrl: mmrl needs an open_clip" in text and not (out / "mmrl-s0").exists()
    assert (out / "results.png").is_file()
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 6 and set(frame["seed"]) == {0, 1}
    capsys.readouterr()
    runs = [str(out / "medbridge-s0"), str(out / "medbridge-s1")]
    assert main(["collect", *runs, "--csv", str(tmp_path / "c.csv")]) == 0
    table = capsys.readouterr().out
    mean = 100 * frame[frame["method"] == "medbridge"]["auroc"].mean()
    assert "| medbridge | 2 |" in table and f"{mean:.2f} ±" in table and len(pd.read_csv(tmp_path / "c.csv")) == 2
    # MMA end to end on the 4-block tiny CLIP (adapters from block 2): train, save, evaluate, predict
    mma = tmp_path / "mma"
    assert main(["train", *common, "--backbone", tiny_run["backbone"], "--method", "mma",
                 "--set", "method_options.baseline.first=2", "--set", "method_options.baseline.epochs=1",
                 "--out", str(mma)]) == 0
    assert (mma / "mma" / "adapter.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", str(mma), "--data", str(tiny_run["data"]), "--json", "--workers", "0",
                 "--cache-dir", str(tiny_run["root"] / "cache")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = json.loads((mma / "metrics.json").read_text())["methods"]["mma"]
    assert res["method"] == "mma" and res["macro"]["auroc"] == pytest.approx(run["macro"]["auroc"], abs=1e-6)
    study = tmp_path / "study.yaml"
    study.write_text("base: demo\nseeds: [0]\nbaselines: [linear-probe]\nstudies:\n  alpha:\n"
                     "    - {name: a0, set: {method_options.medbridge.frozen_weight: 0.0}}\n"
                     "    - {name: a1, set: {method_options.medbridge.frozen_weight: 1.0}}\n")
    abl = tmp_path / "abl"
    assert main(["ablate", "--study", str(study), *common, "--set", "data.format=csv", "--set",
                 f"backbones=[\"{tiny_run['backbone']}\"]", "--out", str(abl)]) == 0
    md = (abl / "ablations.md").read_text()
    assert "**(best val)**" in md and "| a0" in md and "| a1" in md and (abl / "ablation_alpha.png").is_file()
    assert main(["ablate", "--study", str(study), "--data", str(tiny_run["data"]), "--out", str(abl),
                 "--no-train", "--quiet"]) == 0  # summarising again reuses the finished runs


def test_every_verb_takes_the_shared_options_the_same_way():
    """-v/--quiet on every verb; --device, --workers, --set and --n-boot, where a verb has them, with one meaning."""
    import argparse

    from medbridge.cli.main import build_parser

    def verbs(p: argparse.ArgumentParser, path: tuple = ()):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, p
        for a in subs:
            for name, sub in a.choices.items():
                yield from verbs(sub, (*path, name))

    shared = {"verbose", "quiet", "device", "workers", "set", "n_boot"}
    found: dict[str, set] = {}
    seen = dict(verbs(build_parser()))
    assert {("collect",), ("eval",), ("cache", "ls"), ("serve",), ("train",), ("demo",)} <= set(seen)
    for path, p in seen.items():
        dests = {a.dest: a for a in p._actions}
        assert {"verbose", "quiet"} <= set(dests), path
        for dest in shared & set(dests):
            a = dests[dest]
            found.setdefault(dest, set()).add((tuple(a.option_strings), a.help, a.type, a.default))
    assert all(len(v) == 1 for v in found.values()), {k: v for k, v in found.items() if len(v) > 1}
    assert {"device", "workers", "set", "n_boot"} <= set(found)
    args = build_parser().parse_args(["collect", "runs/a", "-v", "--n-boot", "0"])
    assert args.verbose and args.n_boot == 0
    assert build_parser().parse_args(["eval", "runs/a", "--data", "d", "--quiet"]).quiet
    serve = build_parser().parse_args(["serve", "runs/a", "--workers", "2"])  # serve's --workers: processes
    assert serve.server_workers == 2 and serve.device is None


def test_cli_help_teaches_only_current_config_keys(capsys):
    from medbridge.cli.main import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for a in parser._actions:
        if hasattr(a, "choices") and isinstance(a.choices, dict):
            texts += [sub.format_help() for sub in a.choices.values()]
    legacy = re.compile(r"(?<![\w.])(model|probe|baseline)\.[a-z_]+")
    assert not [m.group(0) for t in texts for m in legacy.finditer(t)]
