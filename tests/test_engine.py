"""Engine: metrics vs scikit-learn, the frozen-activation cache, training resume/NaN guard, configs, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.helpers import nih_subset_csv, random_targets, train_medbridge

from medbridge.engine.cache import FeatureCache
from medbridge.engine.config import ConfigError, load_config
from medbridge.engine.features import CacheSpec, build_cache
from medbridge.engine.metrics import auroc, best_f1_threshold, evaluate_scores, f1_acc, pick_thresholds, roc_curve
from medbridge.engine.trainer import TrainingError
from medbridge.methods.medbridge.method import medbridge_cache_values, predict_cached


# --------------------------------------------------------------------------- metrics
def test_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        s = np.round(rng.random(n), 1)  # many ties
        if y.min() == y.max():
            continue
        assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        f1, acc = f1_acc(s, y, best_f1_threshold(s, y))
        assert f1 == pytest.approx(max(f1_score(y, s >= t) for t in np.unique(s)), abs=1e-12)
        assert acc == pytest.approx(((s >= best_f1_threshold(s, y)) == y).mean())
    fpr, tpr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)


def test_evaluate_scores_skips_and_masks():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.3, 0.5], [0.8, 0.9, 0.5], [0.3, 0.1, 0.5]])
    targets = np.array([[1, np.nan, 0], [0, 0, 0], [1, 1, 0], [0, np.nan, 0]], dtype=np.float32)
    res = evaluate_scores(scores, targets, ["a", "b", "c"], pick_thresholds(scores, targets, ["a", "b", "c"]))
    assert res["skipped"] == ["c"] and res["classes"] == 2
    assert res["per_class"]["a"]["auroc"] == 1.0 and res["per_class"]["b"]["n"] == 2
    assert res["macro"]["auroc"] == 1.0 and res["macro"]["f1"] == 1.0


# --------------------------------------------------------------------------- cache
def tiny_model(attention: str = "isolated", labels=("a", "b", "c")):
    from medbridge.backbones.registry import tiny_builders
    from medbridge.methods.medbridge.model import MedBridgeConfig, MedBridgeModel

    torch.manual_seed(0)
    builders = tiny_builders()
    cfg = MedBridgeConfig(labels=list(labels), backbones=["tiny"], num_queries=4, attention=attention, t1=2)
    return MedBridgeModel(cfg, [builders["tiny-hf-dinov2"]()], text=builders["tiny-hf-clip"]().text)


def filled_cache(tmp_path, model, n: int = 12, views: int = 3):
    torch.manual_seed(1)
    size = model.backbones[0].vision.preprocess.image_size
    pixels = torch.randn(n, views, 3, size, size)
    with torch.no_grad():
        values = medbridge_cache_values(model, [pixels])
    shapes = {k: tuple(v.shape[1:]) for k, v in values.items()}
    cache = FeatureCache(tmp_path / "cache", {"test": 1}, n, shapes)
    cache.write(np.arange(n), values)
    cache.mark_done(np.arange(n))
    return cache, pixels


def test_feature_cache_round_trip_and_keys(tmp_path):
    model = tiny_model()
    cache, pixels = filled_cache(tmp_path, model)
    again = FeatureCache(tmp_path / "cache", {"test": 1}, cache.n_rows, cache.shapes)
    assert again.dir == cache.dir and again.done().all()
    rows = np.array([5, 2, 7])
    got = again.read(rows)
    with torch.no_grad():
        ref = medbridge_cache_values(model, [pixels[rows]])
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].half().float())
    other = FeatureCache(tmp_path / "cache", {"test": 2}, cache.n_rows, cache.shapes)
    assert other.dir != cache.dir and not other.done().any()


def test_interrupted_cache_build_resumes(tmp_path, nih_sample):
    from medbridge.data import FocalConfig, load_dataset

    table = load_dataset("csv", nih_subset_csv(nih_sample, tmp_path / "d.csv", n=6))
    calls = []

    def compute(pixels):
        calls.append(pixels[0].shape[0])
        if len(calls) == 2 and not getattr(compute, "resumed", False):
            raise KeyboardInterrupt
        return {"e0.frozen": pixels[0].mean(dim=(2, 3, 4))[..., None]}

    from medbridge.backbones.base import PreprocessConfig

    spec = CacheSpec({"k": 1}, {"e0.frozen": (1, 1)}, compute, FocalConfig(num_crops=0),
                     [PreprocessConfig(16, (0.5,) * 3, (0.5,) * 3)])
    with pytest.raises(KeyboardInterrupt):
        build_cache(spec, table, root=tmp_path / "c", batch_size=2, workers=0, progress=False)
    compute.resumed = True
    calls.clear()
    cache = build_cache(spec, table, root=tmp_path / "c", batch_size=2, workers=0, progress=False)
    assert sum(calls) == 4 and cache.done().all()  # only the 4 rows not done before were computed


def test_cache_needs_a_fixed_number_of_views(tmp_path, nih_sample):
    from PIL import Image

    from medbridge.data import FocalConfig, load_dataset
    from medbridge.data.table import DatasetError
    from medbridge.engine.features import fixed_view_count

    src = sorted((nih_sample / "images").glob("*.jpg"))[:2]
    Image.open(src[1]).resize((512, 1024)).save(tmp_path / "narrow.png")
    import pandas as pd

    pd.DataFrame({"path": [str(src[0]), str(tmp_path / "narrow.png")], "X": [1, 0]}).to_csv(tmp_path / "d.csv",
                                                                                           index=False)
    table = load_dataset("csv", tmp_path / "d.csv")
    with pytest.raises(DatasetError, match=r"different numbers of focal views .*set focal.num_crops"):
        fixed_view_count(table, FocalConfig())
    assert fixed_view_count(table, FocalConfig(region_size=0.5, num_crops=2)) == 3


# --------------------------------------------------------------------------- training
def _train_cfg(**kw):
    from medbridge.engine.config import TrainConfig

    base = dict(lr=1e-2, batch_size=4, epochs=2, checkpoint_every=1, seed=3, workers=0)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_equals_uninterrupted_run(tmp_path):
    model_a = tiny_model()
    cache, _ = filled_cache(tmp_path, model_a)
    targets = random_targets(12, 3)
    rows = np.arange(10)
    train_medbridge(model_a, cache, targets, rows, _train_cfg(), tmp_path / "a", progress_bar=False)
    (tmp_path / "b").mkdir()
    model_b = tiny_model()
    with pytest.raises(KeyboardInterrupt):  # interrupted mid-epoch 1 (3 steps per epoch)
        train_medbridge(model_b, cache, targets, rows, _train_cfg(), tmp_path / "b", progress_bar=False,
                        stop_after=4)
    model_c = tiny_model()  # a fresh process: new model, state from the checkpoint
    hist = train_medbridge(model_c, cache, targets, rows, _train_cfg(), tmp_path / "b", resume=True,
                           progress_bar=False)
    assert len(hist) == 2
    pa, pc = model_a.trainable_parameters(), model_c.trainable_parameters()
    changed = any(not torch.equal(p, tiny_model().trainable_parameters()[n]) for n, p in pa.items())
    assert changed
    for n in pa:
        torch.testing.assert_close(pc[n], pa[n], atol=1e-6, rtol=1e-6, msg=n)
    for p in model_c.backbones[0].parameters():
        assert not p.requires_grad


def test_train_keep_best_and_patience_select_the_best_validation_epoch_for_medbridge(tmp_path):
    from medbridge.engine.config import TrainConfig

    cache, _ = filled_cache(tmp_path, tiny_model())
    targets, rows, val = random_targets(12, 3), np.arange(8), np.arange(8, 12)

    def run(out, **kw):
        torch.manual_seed(0)
        model = tiny_model()
        hist = train_medbridge(model, cache, targets, rows, _train_cfg(**{"lr": 5e-2, "epochs": 4, **kw}),
                               tmp_path / out,
                               val_rows=val, progress_bar=False)
        return model, hist

    last_model, last_hist = run("last")
    assert last_hist[-1]["event"] == "epoch"  # default: the last epoch's weights, no selection
    best_model, hist = run("best", keep_best=True)
    curve = [r["val_macro_auroc"] for r in hist if r["event"] == "epoch"]
    assert curve == [r["val_macro_auroc"] for r in last_hist]  # same training; only the kept weights differ
    chosen = hist[-1]
    assert chosen["event"] == "selected" and chosen["epoch"] == int(np.nanargmax(curve)) + 1
    short_model, _ = run("short", epochs=chosen["epoch"])  # trained only up to the chosen epoch: the same weights
    for n, p in best_model.trainable_parameters().items():
        torch.testing.assert_close(short_model.trainable_parameters()[n], p, atol=0, rtol=0, msg=n)
    _, stopped = run("patience", epochs=8, patience=1)
    assert len([r for r in stopped if r["event"] == "epoch"]) < 8
    for bad, msg in (({"patience": -1}, "train.patience must be an integer >= 0"),
                     ({"keep_best": "yes"}, "train.keep_best must be true or false")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**bad).validate()


def test_training_changes_only_the_adapter_and_stops_on_nan(tmp_path):
    model = tiny_model()
    cache, _ = filled_cache(tmp_path, model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = predict_cached(model, cache, np.arange(4))
    (tmp_path / "r").mkdir()
    train_medbridge(model, cache, random_targets(12, 3), np.arange(12), _train_cfg(epochs=1), tmp_path / "r",
                    progress_bar=False)
    assert not np.allclose(before, predict_cached(model, cache, np.arange(4)))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    train_frozen = cache.read(np.arange(12))["e0.frozen"].float().flatten(0, 1)  # statistics of the train rows
    torch.testing.assert_close(model.feature_norms[0].mean, train_frozen.mean(0), atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        model.text_head.proj.weight.fill_(float("nan"))
    (tmp_path / "n").mkdir()
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1 step 1"):
        train_medbridge(model, cache, random_targets(12, 3), np.arange(12), _train_cfg(), tmp_path / "n",
                        progress_bar=False)


def _ddp_worker(rank, world_size, init_file, cache_dir, out_dir, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = tiny_model()
    if rank == 1:  # different init on rank 1: the broadcast from rank 0 must fix it
        with torch.no_grad():
            for p in model.trainable_parameters().values():
                p.add_(1.0)
    cache = FeatureCache(cache_dir, {"test": 1}, 12, _shapes(cache_dir))
    train_medbridge(model, cache, random_targets(12, 3), np.arange(12), _train_cfg(checkpoint_every=0),
                    out_dir, progress_bar=False)
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.adapter_tensors().items()}, result_file)
    dist.destroy_process_group()


def _shapes(cache_dir):
    import json

    meta = next(cache_dir.glob("*/meta.json"))
    return {k: tuple(v) for k, v in json.loads(meta.read_text())["shapes"].items()}


def test_two_process_data_parallel_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    model = tiny_model()
    cache, _ = filled_cache(tmp_path, model)
    (tmp_path / "single").mkdir()
    train_medbridge(model, cache, random_targets(12, 3), np.arange(12), _train_cfg(checkpoint_every=0),
                    tmp_path / "single", progress_bar=False)
    (tmp_path / "ddp").mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tmp_path / "cache", tmp_path / "ddp",
                                str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = tiny_model()
    assert not torch.equal(ddp["head.bias"], start.trainable_parameters()["head.bias"])  # it trained
    ddp_model = tiny_model()
    with torch.no_grad():
        for n, p in ddp_model.adapter_tensors().items():
            p.copy_(ddp[n])
    # compare what the model computes: parameters whose gradient is structurally zero (e.g. attention key
    # biases) take Adam steps driven by float noise that differs with the reduction order, without effect
    rows = np.arange(12)
    np.testing.assert_allclose(predict_cached(ddp_model, cache, rows), predict_cached(model, cache, rows),
                               atol=1e-4)
    assert not np.allclose(predict_cached(start, cache, rows), predict_cached(model, cache, rows), atol=1e-3)


# --------------------------------------------------------------------------- config
def test_keys_of_medbridge_0_1_still_work_with_a_warning_naming_the_new_key(tmp_path):
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_config("demo", overrides=["train.lr=1e-3", "model.num_queries=16", "model.focal.num_crops=4",
                                             "probe.max_iter=50"])
    assert cfg.train.lr == 1e-3 and cfg.options_for("medbridge")["num_queries"] == 16
    assert cfg.focal["num_crops"] == 4 and cfg.options_for("linear-probe")["max_iter"] == 50
    assert [str(w.message) for w in caught] == [
        "config key 'model.num_queries' is a medbridge 0.1 key: use 'method_options.medbridge.num_queries'",
        "config key 'model.focal.num_crops' is a medbridge 0.1 key: use 'focal.num_crops'",
        "config key 'probe.max_iter' is a medbridge 0.1 key: use 'method_options.linear-probe.max_iter'"]
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  num_queries: 4\n  backbones: [dinov2-small]\nbaseline:\n  epochs: 2\n")
    with pytest.warns(DeprecationWarning, match="'baseline.epochs' is a medbridge 0.1 key: use "
                                                "'method_options.baseline.epochs'"):
        cfg = load_config(None, [str(old)])
    assert cfg.options_for("medbridge")["num_queries"] == 4 and cfg.backbones == ["dinov2-small"]


def test_n_boot_is_a_run_setting_saved_with_the_run(tmp_path):
    import os

    from medbridge.cli.main import build_parser
    from medbridge.cli.run_commands import build_run_config
    from medbridge.engine.config import save_config

    assert load_config().eval.n_boot == 1000
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--n-boot", "7", "--device", "cpu",
                                      "--workers", "0"])
    cfg = build_run_config(args)
    assert (cfg.eval.n_boot, cfg.train.device, cfg.train.workers) == (7, "cpu", 0)
    assert "MEDBRIDGE_N_BOOT" not in os.environ  # no side channel
    save_config(cfg, tmp_path / "config.yaml")
    assert "n_boot: 7" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"eval.n_boot: -1 is not >= 0"):
        load_config(overrides=["eval.n_boot=-1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "run", "--data", "d", "--n-boot", "-3"])


def test_config_errors_name_key_and_allowed_values(tmp_path):
    cfg = load_config("demo", overrides=["method_options.medbridge.num_queries=12", "focal.num_crops=2"])
    assert cfg.options_for("medbridge")["num_queries"] == 12 and cfg.focal["num_crops"] == 2
    with pytest.raises(ConfigError, match=r"train.schedule: 'warm' is not one of constant, cosine"):
        load_config(overrides=["train.schedule=warm"])
    with pytest.raises(ConfigError, match=r"method_options.medbridge.bogus: unknown option; allowed: \["):
        load_config(overrides=["method_options.medbridge.bogus=1"])
    with pytest.raises(ConfigError, match=r"method_options.coop.num_queries: unknown option; allowed: \["):
        load_config(overrides=["method=coop", "method_options.coop.num_queries=1"])
    with pytest.raises(ConfigError, match=r"attention must be 'joint' or 'isolated'"):
        load_config(overrides=["method_options.medbridge.attention=both"])
    with pytest.raises(ConfigError, match=r"train: .*'lrr'.*allowed keys"):
        load_config(overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"preset 'nope' not found; available: \[.*'demo'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["train.lr"])
    with pytest.raises(ConfigError, match=r"train.lr: 'fast' is not a finite number"):
        load_config(overrides=["train.lr=fast"])
    assert load_config(overrides=["method=coop"]).method == "coop"
    with pytest.raises(ConfigError, match="method 'cop' is not registered; did you mean coop"):
        load_config(overrides=["method=cop"])
    with pytest.raises(ConfigError, match="focal mode must be"):
        load_config(overrides=["focal.mode=grid"])


def test_study_settings_become_overrides_that_keep_null_lists_and_booleans():
    from medbridge.engine.ablation import _overrides
    from medbridge.engine.config import load_config

    setting = {"focal.num_crops": None, "focal.stride": 512, "train.lr": 1.0e-3,
               "method_options.medbridge.view_attention": False, "backbones": ["a", "b"], "focal.mode": "sliding"}
    cfg = load_config("demo", None, _overrides(setting))
    assert cfg.focal["num_crops"] is None and cfg.focal["stride"] == 512
    assert cfg.train.lr == 1.0e-3 and cfg.options_for("medbridge")["view_attention"] is False
    assert cfg.backbones == ["a", "b"]


def test_joint_mode_statistics_come_from_the_frozen_path(tmp_path):
    """A joint-attention cache holds only the prefix: the statistics must equal those an isolated cache stores."""
    iso, joint = tiny_model(), tiny_model("joint")
    cache_iso, _ = filled_cache(tmp_path / "i", iso)
    cache_joint, _ = filled_cache(tmp_path / "j", joint)
    rows = np.arange(12)
    for model, cache, name in ((iso, cache_iso, "ri"), (joint, cache_joint, "rj")):
        train_medbridge(model, cache, random_targets(12, 3), rows, _train_cfg(epochs=1), tmp_path / name,
                        progress_bar=False)
    torch.testing.assert_close(joint.feature_norms[0].mean, iso.feature_norms[0].mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(joint.feature_norms[0].std, iso.feature_norms[0].std, atol=1e-3, rtol=1e-3)
