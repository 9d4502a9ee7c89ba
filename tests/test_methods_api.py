"""Methods as plug-ins: every registered method builds tiny, fits, saves and loads through the one format; files of
the previous formats still load; baselines get resume and data parallelism from the shared loop; the engine never
names a method; a new method is one class plus one register_method call (the documented example, end to end)."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import cached, nih_subset_csv, random_targets

from medbridge.backbones.tiny import tiny_open_clip
from medbridge.engine.config import TrainConfig
from medbridge.engine.trainer import fit_method
from medbridge.methods import (
    NotApplicableError,
    OptionsError,
    TrainingData,
    create_method,
    list_methods,
    load_method,
    save_method,
)

REPO = Path(__file__).resolve().parents[1]
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
LABELS, NAMES = ["Effusion", "Pneumonia", "Cardiomegaly"], ["pleural effusion", "pneumonia", "cardiomegaly"]
TINY_OPTIONS = {"medbridge": {"num_queries": 2, "t1": 6}, "linear-probe": {"C": [0.1], "max_iter": 200},
                "lp-text": {"epochs": 3}, "mma": {"epochs": 1}, "mmrl": {"epochs": 1}}


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip("ViT-B-16-quickgelu", layers=12, seed=3)


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "seed": 0, "checkpoint_every": 1, "workers": 0, **kw})


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_fits_saves_and_loads_the_same_scores(name, clip, tmp_path):
    method = create_method(name, {"epochs": 1} if name not in TINY_OPTIONS and name != "zero-shot" else
                           TINY_OPTIONS.get(name), backbones=[clip], labels=LABELS, prompt_names=NAMES,
                           focal={"num_crops": 0})
    cache = cached(method)
    rows, val = np.arange(12), np.arange(12, 16)
    fit_method(method, TrainingData(cache, random_targets(16, 3), rows, val), train_cfg(epochs=1), tmp_path / "r",
               progress_bar=False)
    folder = save_method(method, tmp_path / method.folder())
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == name and meta["labels"] == LABELS and meta["weights_sha256"]
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    again = load_method(folder, [clip])
    assert type(again) is type(method) and again.labels == LABELS
    np.testing.assert_array_equal(again.scores_cached(cache, np.arange(16)), method.scores_cached(cache,
                                                                                                  np.arange(16)))
    assert not any(p.requires_grad for p in clip.parameters())


@pytest.mark.parametrize("name", ["medbridge", "linear_probe", "coop"])
def test_files_of_the_previous_formats_still_load_and_score_the_same(name):
    """Fixtures written by medbridge 0.1's per-kind formats (tests/fixtures/legacy/make_legacy.py)."""
    expected = json.loads((LEGACY / "expected_scores.json").read_text())
    clip = tiny_open_clip("ViT-B-16-quickgelu", seed=3)
    with pytest.warns(DeprecationWarning, match=r"a medbridge 0\.1 file .*writes it as adapter\.json"):
        method = load_method(LEGACY / name, [clip])
    size = expected["image_size"]
    px = [torch.randn(2, 1, 3, size, size, generator=torch.Generator().manual_seed(expected["pixels_seed"]))]
    scores, _ = method.scores_views(px)
    np.testing.assert_allclose(scores, np.array(expected["scores"][name]), atol=1e-6)
    if name == "medbridge":  # the only legacy kind that recorded backbone fingerprints
        with pytest.raises(Exception, match="backbone 0"), pytest.warns(DeprecationWarning):
            load_method(LEGACY / name, [tiny_open_clip("ViT-B-16-quickgelu", seed=4)])


def test_a_baseline_resumes_exactly_and_refuses_an_unaligned_backbone(clip, tmp_path):
    def run(out, **kw):
        m = create_method("coop", {"epochs": 3, "batch_size": 4}, backbones=[clip], labels=LABELS, prompt_names=NAMES)
        fit_method(m, TrainingData(cache, targets, np.arange(16), np.arange(0)), train_cfg(), out,
                   progress_bar=False, **kw)
        return m

    probe = create_method("coop", {}, backbones=[clip], labels=LABELS, prompt_names=NAMES)
    cache, targets = cached(probe), random_targets(16, 3)
    full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after=6)  # mid-epoch 2 of 3 (4 steps per epoch)
    resumed = run(tmp_path / "b", resume=True)
    for n, p in full.state_tensors().items():
        torch.testing.assert_close(resumed.state_tensors()[n], p, atol=0, rtol=0, msg=n)
    assert not torch.equal(full.state_tensors()["prompt.ctx"], probe.state_tensors()["prompt.ctx"])
    from medbridge.backbones.registry import tiny_builders

    with pytest.raises(NotApplicableError, match="coop needs a CLIP-style backbone"):
        create_method("coop", {}, backbones=[tiny_builders()["tiny-hf-dinov2"]()], labels=LABELS)


def _ddp_worker(rank, world_size, init_file, out_dir, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    clip = tiny_open_clip("ViT-B-16-quickgelu", layers=12, seed=3)
    m = create_method("coop", {"epochs": 2, "batch_size": 4}, backbones=[clip], labels=LABELS, prompt_names=NAMES)
    fit_method(m, TrainingData(cached(m), random_targets(16, 3), np.arange(16), np.arange(0)),
               train_cfg(checkpoint_every=0), out_dir, progress_bar=False)
    if rank == 0:
        torch.save({n: p.detach() for n, p in m.state_tensors().items()}, result_file)
    dist.destroy_process_group()


def test_a_baseline_under_two_gloo_processes_equals_one_process(clip, tmp_path):
    import torch.multiprocessing as mp

    m = create_method("coop", {"epochs": 2, "batch_size": 4}, backbones=[clip], labels=LABELS, prompt_names=NAMES)
    fit_method(m, TrainingData(cached(m), random_targets(16, 3), np.arange(16), np.arange(0)),
               train_cfg(checkpoint_every=0), tmp_path / "one", progress_bar=False)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), tmp_path / "ddp", str(tmp_path / "ddp.pt")), nprocs=2,
             join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    start = create_method("coop", {}, backbones=[clip], labels=LABELS, prompt_names=NAMES)
    assert not torch.allclose(ddp["prompt.ctx"], start.state_tensors()["prompt.ctx"])  # it trained
    for n, p in m.state_tensors().items():
        torch.testing.assert_close(ddp[n], p.detach(), atol=1e-5, rtol=1e-4, msg=n)


def _method_classes() -> set[str]:
    """Names of the classes methods/ defines deriving from Method (the interface and its capabilities excepted)."""
    from medbridge.methods.api import Method

    found, todo = set(), [Method]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return {c.__name__ for c in found if c.__module__.startswith("medbridge.methods.")
            and c.__module__ != "medbridge.methods.api"}


def names_of_methods(tree: ast.AST, names: set[str], classes: set[str]) -> list[str]:
    """What a module names of the methods: string literals equal to a method's name or folder, and isinstance /
    issubclass checks against a method class."""
    found = sorted({f"{n.value!r} (line {n.lineno})" for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names})
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "issubclass") \
                and len(n.args) == 2:
            used = {x.id for x in ast.walk(n.args[1]) if isinstance(x, ast.Name)} | {
                x.attr for x in ast.walk(n.args[1]) if isinstance(x, ast.Attribute)}
            found += [f"{n.func.id}(..., {c}) (line {n.lineno})" for c in sorted(used & classes)]
    return found


def test_the_engine_names_no_method_and_methods_never_import_the_engine():
    from medbridge.methods.registry import get_method

    names = set(list_methods()) | {get_method(m).method_class.folder() for m in list_methods()}
    classes = _method_classes()
    assert {"MedBridgeMethod", "LinearProbe", "SeedEnsemble", "CoOpMethod"} <= classes  # the scan sees them
    src = REPO / "src" / "medbridge"
    for path in sorted(p for d in ("engine", "serve", "cli") for p in (src / d).rglob("*.py")):
        tree = ast.parse(path.read_text())
        assert not names_of_methods(tree, names, classes), f"{path.relative_to(src)} names methods"
        imports = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imports if re.search(r"methods\.(medbridge|linear_probe|baselines|ensemble)", m)], path
    for path in (REPO / "src" / "medbridge" / "methods").rglob("*.py"):
        assert "engine" not in {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                                if isinstance(n, ast.ImportFrom) and n.level >= 2}, path


def test_the_method_scan_catches_isinstance_and_folder_names():
    """The scan above on code that names methods the three ways it must catch."""
    code = ("from medbridge.methods.ensemble import SeedEnsemble\n"
            "def f(m, folder):\n"
            "    if isinstance(m, SeedEnsemble) or issubclass(type(m), (int, medbridge.LinearProbe)):\n"
            "        return folder / 'linear_probe'\n"
            "    return 'medbridge'\n")
    found = names_of_methods(ast.parse(code), {"medbridge", "linear_probe"}, {"SeedEnsemble", "LinearProbe"})
    assert found == ["'linear_probe' (line 4)", "'medbridge' (line 5)", "isinstance(..., SeedEnsemble) (line 3)",
                     "issubclass(..., LinearProbe) (line 3)"]


def test_a_method_missing_a_required_hook_fails_at_registration_naming_it():
    from medbridge.methods.api import REQUIRED_HOOKS, ClosedFormFit, Method
    from medbridge.methods.registry import _REGISTRY, register_method

    assert sorted(Method.__abstractmethods__) == sorted(REQUIRED_HOOKS)

    class NoViews(Method):
        def cache_spec(self, n_views): ...
        def scores_cached(self, cache, rows, device="cpu"): ...
        def read_batch(self, cache, rows, device): ...
        def training_loss(self, batch, targets, reports): ...

    with pytest.raises(TypeError, match=r"^register_method\('no-views'\): NoViews does not implement scores_views$"):
        register_method("no-views", object, NoViews)
    with pytest.raises(TypeError, match="abstract method 'scores_views'|abstract method scores_views"):
        NoViews(None, [], ["a"], ["a"], None)  # and it cannot be built either

    class NoLoop(Method):
        def cache_spec(self, n_views): ...
        def scores_cached(self, cache, rows, device="cpu"): ...
        def scores_views(self, pixels): ...

    with pytest.raises(TypeError, match=r"NoLoop does not implement read_batch, training_loss \(.*ClosedFormFit"):
        register_method("no-loop", object, NoLoop)

    class ClosedForm(ClosedFormFit, NoLoop):
        def fit_closed_form(self, data): ...

    try:
        assert register_method("closed-form", object, ClosedForm) is ClosedForm
    finally:
        _REGISTRY.pop("closed-form", None)
    assert not {"no-views", "no-loop"} & set(_REGISTRY)


def test_capabilities_are_declared_and_ensembles_have_their_members(clip):
    from medbridge.methods.api import ClosedFormFit, Explainable, FitsMembers, TextPrompted

    mb = create_method("medbridge", TINY_OPTIONS["medbridge"], backbones=[clip], labels=LABELS, ensemble=2)
    probe = create_method("linear-probe", {}, backbones=[clip], labels=LABELS)
    coop = create_method("coop", {}, backbones=[clip], labels=LABELS, ensemble=2)
    assert isinstance(mb, FitsMembers) and isinstance(mb, TextPrompted) and isinstance(mb, Explainable)
    assert mb.text_prompted and type(mb).__name__ == "SeedEnsemble"
    assert isinstance(coop, FitsMembers) and isinstance(coop, Explainable) and not isinstance(coop, TextPrompted)
    assert isinstance(probe, ClosedFormFit) and not isinstance(probe, (TextPrompted, FitsMembers))
    assert isinstance(mb.with_label_names(["Edema"], ["edema"]), TextPrompted)
    # one readable-name rule: the one dataset runs use (Effusion prompts "pleural effusion")
    assert probe.prompt_names == NAMES and mb.prompt_names == NAMES


def test_registry_builtin_and_legacy_import_no_cycle_and_the_registry_not_the_package_root():
    src = REPO / "src" / "medbridge" / "methods"

    def imports(name: str) -> set[tuple[int, str | None]]:
        tree = ast.parse((src / f"{name}.py").read_text())
        return {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    assert (2, None) not in imports("registry")  # `from .. import x`: the package root
    assert not {(1, "registry")} & (imports("builtin") | imports("legacy"))  # only the registry imports them


def test_medbridge_method_takes_the_base_signature_and_wraps_a_model_by_from_model(clip):
    from medbridge.methods.medbridge.method import MedBridgeMethod

    built = create_method("medbridge", TINY_OPTIONS["medbridge"], backbones=[clip], labels=LABELS)
    again = MedBridgeMethod(built.options, [clip], LABELS, NAMES, built.focal)  # Method's own signature
    assert again.saved_options() == built.saved_options() and again.prompt_names == NAMES
    wrapped = MedBridgeMethod.from_model(built.model)
    assert wrapped.model is built.model and wrapped.labels == LABELS and wrapped.score_labels is None
    with pytest.warns(DeprecationWarning, match=r"MedBridgeMethod\(model\) is deprecated: use "
                                                r"MedBridgeMethod.from_model\(model\)"):
        old = MedBridgeMethod(built.model)
    assert old.model is built.model and old.labels == LABELS


def test_options_are_validated_by_the_registered_dataclass():
    with pytest.raises(OptionsError, match=r"method_options.linear-probe.Cs: unknown option; allowed: \['C', "):
        create_method("linear-probe", {"Cs": [1]}, labels=LABELS)
    with pytest.raises(OptionsError, match=r"features must be one of"):
        create_method("linear-probe", {"features": "all"}, labels=LABELS)
    with pytest.raises(OptionsError, match=r"method 'linear_probe' is not registered; did you mean linear-probe"):
        create_method("linear_probe", {}, labels=LABELS)
    with pytest.raises(OptionsError, match=r"method_options.medbridge.num_queries: 'many' is not a whole number"):
        create_method("medbridge", {"num_queries": "many"}, labels=LABELS)


def example_code() -> str:
    text = (REPO / "docs" / "adding-a-method.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_documented_example_is_about_thirty_lines():
    code = [line for line in example_code().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 45


def test_the_documented_example_method_trains_end_to_end_through_the_cli(tmp_path, nih_sample, capsys,
                                                                        monkeypatch):
    from medbridge.cli.main import main
    from medbridge.methods import registry

    (tmp_path / "my_methods.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_methods", raising=False)
    registry.load_plugins("my_methods:register")  # what MEDBRIDGE_PLUGINS=my_methods:register does
    try:
        data = nih_subset_csv(nih_sample, tmp_path / "data" / "labels.csv", n=40)
        vision = f"local-dir:{tmp_path / 'clip'}"
        from tests.helpers import save_tiny_clip

        save_tiny_clip(tmp_path / "clip")
        out = tmp_path / "run"
        assert main(["list", "methods"]) == 0
        assert "mlp-head" in capsys.readouterr().out
        assert main(["train", "--data", str(data), "--backbone", vision, "--method", "mlp-head", "--out", str(out),
                     "--quiet", "--set", "method_options.mlp-head.hidden=16", "--set", "train.workers=0",
                     "--set", f"train.cache_dir={tmp_path / 'cache'}", "--set", "data.fractions=[0.5,0.2,0.3]",
                     "--with-probe"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"mlp-head", "linear-probe"}
        assert metrics["trainable_parameters"]["mlp-head"] == sum(
            p.numel() for p in load_method(out / "mlp-head").trainable_parameters().values())
        capsys.readouterr()
        assert main(["eval", str(out), "--data", str(data), "--json", "--workers", "0",
                     "--cache-dir", str(tmp_path / "cache")]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["method"] == "mlp-head" and res["macro"]["auroc"] == metrics["methods"]["mlp-head"]["macro"]["auroc"]
        image = sorted((nih_sample / "images").glob("*.jpg"))[0]
        assert main(["predict", str(out), str(image), "--json"]) == 0
        probs = json.loads(capsys.readouterr().out)[0]["probabilities"]
        assert set(probs) == {"Pneumonia", "Infiltration", "Effusion"}
        explain = tmp_path / "explain"  # the example is Explainable: per-label heat-map overlays
        assert main(["predict", str(out), str(image), "--explain", str(explain), "--quiet"]) == 0
        assert sorted(explain.rglob("*.png"))
        python = load_method(out).predict([image])  # the Python API gives the CLI's numbers
        np.testing.assert_allclose(python[0], [probs[k] for k in load_method(out).labels], atol=1e-6)
    finally:
        registry._REGISTRY.pop("mlp-head", None)
