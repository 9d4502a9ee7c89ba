"""Seed ensembles (``train.ensemble``): member i is exactly a single run with seed + i, the ensemble scores the
mean of its members' probabilities, saves as one file that loads back to the same scores, resumes bit-exactly
after an interruption inside a member, and leaves seed-independent fits single."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tests.helpers import cached, nih_subset_csv, random_targets, save_tiny_clip

from medbridge.backbones.tiny import tiny_open_clip
from medbridge.engine.config import ConfigError, TrainConfig, load_config
from medbridge.engine.trainer import fit_method
from medbridge.methods import TrainingData, create_method, load_method, save_method
from medbridge.methods.ensemble import SeedEnsemble
from medbridge.methods.registry import config_digest

LABELS, NAMES = ["Effusion", "Pneumonia", "Cardiomegaly"], ["pleural effusion", "pneumonia", "cardiomegaly"]
OPTIONS = {"num_queries": 2, "t1": 6}


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip("ViT-B-16-quickgelu", layers=12, seed=3)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "seed": 7, "checkpoint_every": 1, "workers": 0, **kw})


def build(clip, init_seed: int, **kw):
    torch.manual_seed(init_seed)
    return create_method("medbridge", OPTIONS, backbones=[clip], labels=LABELS, prompt_names=NAMES,
                         focal={"num_crops": 0}, **kw)


def data_for(method) -> TrainingData:
    return TrainingData(cached(method), random_targets(16, 3), np.arange(12), np.arange(12, 16))


@pytest.mark.slow
def test_each_member_is_exactly_a_single_run_with_its_seed_and_scores_are_their_mean(clip, tmp_path):
    ens = build(clip, 7, ensemble=3, seed=7)
    assert isinstance(ens, SeedEnsemble) and ens.size == 3 and ens.name == "medbridge"
    data = data_for(ens)
    history = fit_method(ens, data, cfg(), tmp_path / "ens", progress_bar=False)
    assert [r["member"] for r in history if r["event"] == "epoch"] == [0, 0, 1, 1, 2, 2]
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == ["member-0", "member-1", "member-2"]
    singles = []
    for i in range(3):  # member 0: the run's own random state; member i: initialised after manual_seed(7 + i)
        single = build(clip, 7 + i)
        fit_method(single, data, cfg(seed=7 + i), tmp_path / f"single-{i}", progress_bar=False)
        for k, t in single.state_tensors().items():
            torch.testing.assert_close(ens.members[i].state_tensors()[k], t, rtol=0, atol=0)
        singles.append(single.scores_cached(data.cache, np.arange(16)))
    assert not np.allclose(singles[0], singles[1])  # the members differ: an ensemble, not three copies
    np.testing.assert_allclose(ens.scores_cached(data.cache, np.arange(16)), np.mean(singles, 0), rtol=1e-6)
    size = ens.preprocess[0].image_size
    px = [torch.randn(2, 1, 3, size, size, generator=torch.Generator().manual_seed(1))]
    scores, details = ens.scores_views(px)
    np.testing.assert_allclose(scores, np.mean([m.scores_views(px)[0] for m in ens.members], 0), rtol=1e-6)
    assert details["gate"].shape == (2, 1)


def test_an_ensemble_saves_as_one_file_and_loads_back_to_the_same_scores(clip, tmp_path):
    ens = build(clip, 0, ensemble=2, seed=0)
    data = data_for(ens)
    fit_method(ens, data, cfg(epochs=1), tmp_path / "r", progress_bar=False)
    folder = save_method(ens, tmp_path / ens.folder())
    assert folder.name == "medbridge"
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == "medbridge" and meta["ensemble"] == 2 and len(meta["info"]["members"]) == 2
    single = build(clip, 0)
    assert meta["trainable_parameters"] == 2 * single.num_trainable()
    again = load_method(folder, [clip])
    assert isinstance(again, SeedEnsemble) and again.size == 2
    np.testing.assert_array_equal(again.scores_cached(data.cache, np.arange(16)),
                                  ens.scores_cached(data.cache, np.arange(16)))
    meta["ensemble"] = 0
    meta["config_sha256"] = config_digest(meta)  # re-signed: the value itself is checked too
    (folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="ensemble 0, expected a number of members >= 1"):
        load_method(folder, [clip])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 7])  # inside member 0; inside member 1 (member 0 takes 2 x 3 = 6 steps)
def test_an_interrupted_ensemble_resumes_to_the_uninterrupted_result(clip, tmp_path, stop):
    ens = build(clip, 1, ensemble=2, seed=1)
    data = data_for(ens)
    fit_method(ens, data, cfg(seed=1), tmp_path / "full", progress_bar=False)
    cut = build(clip, 1, ensemble=2, seed=1)
    with pytest.raises(KeyboardInterrupt):
        fit_method(cut, data, cfg(seed=1), tmp_path / "cut", progress_bar=False, stop_after=stop)
    assert (tmp_path / "cut" / f"member-{stop // 6}" / "checkpoint.pt").is_file()
    resumed = build(clip, 1, ensemble=2, seed=1)
    fit_method(resumed, data, cfg(seed=1), tmp_path / "cut", progress_bar=False, resume=True)
    for k, t in ens.state_tensors().items():
        torch.testing.assert_close(resumed.state_tensors()[k], t, rtol=0, atol=0)


def test_seed_independent_fits_stay_single_and_the_size_is_checked(clip):
    probe = create_method("linear-probe", {"C": [0.1]}, backbones=[clip], labels=LABELS, prompt_names=NAMES,
                          ensemble=3)
    assert not isinstance(probe, SeedEnsemble)
    for name, seeded in (("zero-shot", False), ("lp-text", False), ("coop", True)):
        method = create_method(name, None, backbones=[clip], labels=LABELS, prompt_names=NAMES, ensemble=2)
        assert isinstance(method, SeedEnsemble) is seeded, name
    with pytest.raises(ConfigError, match=r"train.ensemble must be a whole number >= 1"):
        load_config(overrides=["train.ensemble=0"])
    with pytest.raises(ConfigError, match=r"train.ensemble.medbridge must be a whole number >= 1 .*, got 'x'"):
        load_config(overrides=["train.ensemble={medbridge: x}"])
    with pytest.raises(ConfigError, match=r"train.ensemble.medbrige: not a registered method"):
        load_config(overrides=["train.ensemble={medbrige: 3}"])
    demo = load_config("demo")  # the demo ensembles MedBridge only; other methods run with its preset stay single
    assert demo.train.ensemble_for("medbridge") == 3 and demo.train.ensemble_for("full-finetune") == 1
    assert load_config("demo", overrides=["train.ensemble=1"]).train.ensemble_for("medbridge") == 1
    assert load_config(overrides=["train.ensemble=2"]).train.ensemble_for("coop") == 2
    with pytest.raises(ValueError, match="at least 2 members"):
        SeedEnsemble([probe])


@pytest.mark.slow
def test_an_ensemble_trains_evaluates_and_predicts_through_the_cli(tmp_path, nih_sample, capsys):
    from medbridge.cli.main import main

    data = nih_subset_csv(nih_sample, tmp_path / "data" / "labels.csv", n=40)
    out = tmp_path / "run"
    common = ["--set", f"train.cache_dir={tmp_path / 'cache'}", "--set", "train.workers=0"]
    assert main(["train", "--data", str(data), "--backbone", save_tiny_clip(tmp_path / "clip"), "--out", str(out),
                 "--with-probe", "--quiet", "--set", "train.epochs=1", "--set", "train.ensemble=2",
                 "--set", "data.fractions=[0.5,0.2,0.3]", *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "medbridge" / "adapter.json").read_text())["ensemble"] == 2
    assert "ensemble" not in json.loads((out / "linear_probe" / "adapter.json").read_text())
    assert (out / "member-1" / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--cache-dir", str(tmp_path / "cache"),
                 "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["macro"]["auroc"] == metrics["methods"]["medbridge"]["macro"]["auroc"]
    image = sorted((nih_sample / "images").glob("*.jpg"))[0]
    assert main(["predict", str(out), str(image), "--json", "--explain", str(tmp_path / "maps")]) == 0
    probs = json.loads(capsys.readouterr().out)[0]["probabilities"]
    trained = load_method(out)
    assert isinstance(trained, SeedEnsemble)
    np.testing.assert_allclose(trained.predict([image])[0], [probs[k] for k in trained.labels], atol=1e-6)
    assert any((tmp_path / "maps").iterdir())
    from medbridge.engine.report import collect_runs, paper_table

    frame = collect_runs([out])
    assert dict(zip(frame["method"], frame["ensemble"])) == {"medbridge": 2, "linear-probe": 1}
    single = frame[frame["method"] == "medbridge"].assign(ensemble=1, run="other", auroc=0.5)
    table = paper_table(pd.concat([frame, single]))  # an ensemble and a single model: two lines, never averaged
    assert "| medbridge (ensemble of 2) | 1 |" in table and "| medbridge | 1 |" in table


def test_an_ensemble_of_tuned_towers_refuses_explanations_it_cannot_give(clip):
    """Fine-tuning members run their own towers: member 0's tokens would silently mix the members."""
    from medbridge.methods import NotApplicableError

    ens = create_method("partial-finetune", {"blocks": 1}, backbones=[clip], labels=LABELS, prompt_names=NAMES,
                        ensemble=2)
    assert ens.members[0].backbones[0] is not ens.members[1].backbones[0]
    with pytest.raises(NotApplicableError, match="members run their own tuned towers"):
        ens.logits_from_tokens([torch.zeros(1, 5, 48)], [0], 1, 1)
