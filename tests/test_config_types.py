"""Typed config validation: every field of every config section and every method's options rejects a wrong-typed
value with one line naming the key; ranges, YAML files and MEDBRIDGE_PLUGINS fail the same way (exit 2, no
traceback); config.yaml loading is fuzzed."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medbridge.cli.main import main
from medbridge.data.focal import FocalConfig
from medbridge.engine.config import ConfigError, DataConfig, RunConfig, TrainConfig, load_config
from medbridge.fieldcheck import FieldTypeError, check_value
from medbridge.methods.api import option_fields
from medbridge.methods.registry import get_method, list_methods

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("MEDBRIDGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MEDBRIDGE_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow])


def wrong_value(annotation: str):
    """A value of none of the annotation's types: a list where no list is allowed, else a mapping."""
    kinds = {k.strip().split("[")[0] for k in str(annotation).split("|")}
    return {"x": 1} if kinds & {"list", "tuple"} or not kinds & {"dict"} else [1, 2]


def every_field() -> list[tuple[str, str, str]]:
    """(method, key, annotation) for every config field and every registered method's option."""
    out = []
    for section, cls in (("data", DataConfig), ("train", TrainConfig), ("focal", FocalConfig)):
        out += [("medbridge", f"{section}.{f.name}", str(f.type)) for f in dataclasses.fields(cls)]
    for name in list_methods():
        out += [(name, f"method_options.{name}.{f.name}", str(f.type))
                for f in option_fields(get_method(name).options_class)]
    return out


def test_every_field_of_every_config_dataclass_rejects_a_wrong_typed_value():
    fields = every_field()
    assert len(fields) > 100 and not [k for _, k, t in fields if "Any" in t]  # nothing unchecked
    for method, key, annotation in fields:
        value = wrong_value(annotation)
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[f"method={method}", f"{key}={yaml.safe_dump(value, default_flow_style=True)}"])
        message = str(err.value)
        assert key.rsplit(".", 1)[1] in message and repr(value) in message and "\n" not in message, (key, message)


@pytest.mark.parametrize("override, message", [
    ("train.amp=maybe", "train.amp: 'maybe' is not true or false"),
    ("train.epochs=2.5", "train.epochs: 2.5 is not a whole number"),
    ("train.epochs=1.5", "train.epochs: 1.5 is not a whole number"),
    ("train.device=gpu0", "train.device: 'gpu0' is not one of auto, cpu, cuda, cuda:N"),
    ("train.lr=[1,2]", "train.lr: [1, 2] is not a finite number"),
    ("train.lr=nan", "train.lr: nan is not a finite number"),
    ("train.lr=inf", "train.lr: inf is not a finite number"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1"),
    ("data.fractions=[0.5, 0.5]", "data.fractions: [0.5, 0.5] is not three numbers"),
    ("focal.num_crops=x", "focal.num_crops: 'x' is not a whole number or null"),
    ("backbones=[]", "backbones: empty list; give at least one backbone source"),
    ("data.unit=patient", "data.unit: 'patient' is not one of auto, image, case"),
    ("data.case_image_labels=eye", "data.case_image_labels: 'eye' is not one of case, own"),
    ("method_options.medbridge.case_views=2", "method_options.medbridge.case_views: 2 is not true or false"),
    ("method_options.medbridge.view_attention=sometimes",
     "method_options.medbridge.view_attention: 'sometimes' is not true or false"),
])
def test_wrong_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        load_config(overrides=[override])


@pytest.mark.parametrize("option, message", [("lr=-1", "lr must be > 0, got -1"), ("n_ctx=-3", "n_ctx must be > 0"),
                                             ("epochs=0", "epochs must be > 0, got 0"),
                                             ("weight_decay=-0.1", "weight_decay must be >= 0")])
def test_baseline_options_are_range_checked(option, message):
    with pytest.raises(ConfigError, match=f"method_options.coop: {message}"):
        load_config(overrides=["method=coop", f"method_options.coop.{option}"])
    with pytest.raises(ConfigError, match=message):  # the group key reaches every baseline
        load_config(overrides=["method=coop", f"method_options.baseline.{option}"])


def test_values_given_as_text_are_cast_and_right_values_pass():
    cfg = load_config(overrides=["train.lr=1e-3", "train.epochs=1e1", "train.amp=no", "train.device=cuda:1",
                                 "method_options.medbridge.num_queries='16'"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.amp, cfg.train.device) == (0.001, 10, False, "cuda:1")
    assert cfg.options_for("medbridge")["num_queries"] == 16 and isinstance(cfg.train.epochs, int)
    assert check_value("k", 0, "int | str") == 0 and check_value("k", "x", "int | str") == "x"
    with pytest.raises(FieldTypeError, match="k: True is not a whole number"):
        check_value("k", True, "int")


def test_cli_wrong_type_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "train.lr=[1,2]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "medbridge: error: train.lr: [1, 2] is not a finite number"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("train: !!python/object/apply:os.system ['echo hacked']\n", "could not determine a constructor for the tag"),
    ("train: {lr: [\n", "not a valid YAML config at line 2"),
    ("- a\n- b\n", "expected a mapping of config sections"),
    ("train: 3\n", "train: expected a mapping of train settings, got 3"),
    ("companions: [1]\n", r"companions\[0\]: 1 is not a name"),
    ("method_options: {medbridge: null}\n", "method_options.medbridge: expected a mapping of options, got None"),
])
def test_bad_yaml_config_files_are_one_line_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(files=[str(path)])
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- plugins
def run_cli(*args: str, plugins: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDBRIDGE_PLUGINS": plugins, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "medbridge", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_plugins_load_after_parsing_and_fail_with_one_line():
    from medbridge.methods import registry

    with pytest.raises(registry.OptionsError, match="cannot load 'nope'.*No module named 'nope'"):
        registry.load_plugins("nope")
    with pytest.raises(registry.OptionsError, match="'sys:exit' failed: SystemExit"):
        registry.load_plugins("sys:exit")
    with pytest.raises(registry.OptionsError, match="'gc:collect' registered nothing"):
        registry.load_plugins("gc:collect")
    with pytest.raises(registry.OptionsError, match="'os:sep' is not a function"):
        registry.load_plugins("os:sep")
    assert run_cli("--help", plugins="nope").returncode == 0  # parsing never runs plugins
    done = run_cli("list", "methods", plugins="sys:exit")
    assert done.returncode == 2 and done.stderr.strip().startswith("medbridge: error: MEDBRIDGE_PLUGINS: 'sys:exit'")
    assert "Traceback" not in done.stderr and done.stdout == ""


# --------------------------------------------------------------------------- fuzzing config.yaml
FIELD_NAMES = sorted({k.split(".", 1)[1] for _, k, _ in every_field() if not k.startswith("method_options")})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda:0", "medbridge", "coop", "1e-3",
                                                           "nan", "-inf", "yes", "2.5", "", "none"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(FIELD_NAMES), inner,
                                                                        max_size=3)), max_leaves=6)
SECTIONS = st.fixed_dictionaries({}, optional={
    "method": st.one_of(st.sampled_from(list_methods()), VALUES),
    "data": st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(DataConfig)]), VALUES, max_size=3),
    "train": st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), VALUES,
                             max_size=3),
    "focal": st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(FocalConfig)]), VALUES,
                             max_size=2),
    "method_options": st.dictionaries(st.sampled_from(["medbridge", "coop", "baseline", "nope"]), VALUES,
                                      max_size=2),
    "backbones": VALUES, "companions": VALUES, "nope": VALUES,
})


@FUZZ
@given(doc=st.one_of(SECTIONS, VALUES))
def test_fuzzed_config_files_load_or_fail_with_a_config_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(files=[str(path)])
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    else:
        assert isinstance(cfg, RunConfig) and cfg.train.lr > 0 and isinstance(cfg.train.epochs, int)


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzzed_config_text_loads_or_fails_with_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_bytes(text.encode("utf-8", "replace"))
    with contextlib.suppress(ConfigError):  # anything else (a YAMLError, TypeError, ...) fails the test
        load_config(files=[str(path)])


def test_resume_names_a_group_option_as_written_once_and_a_method_option_by_its_method(tmp_path):
    from medbridge.engine.config import save_config
    from medbridge.engine.run import check_resume_config

    def cfg(**options):
        c = RunConfig(method="coop", companions=["cocoop", "kgcoop"], method_options=options)
        c.validate()
        return c

    save_config(cfg(baseline={"epochs": 3}), tmp_path / "config.yaml")
    check_resume_config(cfg(baseline={"epochs": 3}), tmp_path)  # unchanged: accepted
    with pytest.raises(ConfigError) as group_change:
        check_resume_config(cfg(baseline={"epochs": 5}), tmp_path)
    message = str(group_change.value)
    assert message.count("method_options.baseline.epochs: saved 3, now 5") == 1, message
    assert "method_options.coop.epochs" not in message and "method_options.kgcoop.epochs" not in message
    with pytest.raises(ConfigError) as own_change:  # set on one member only: named under that member
        check_resume_config(cfg(baseline={"epochs": 3}, kgcoop={"epochs": 4}), tmp_path)
    assert "method_options.kgcoop.epochs: saved 3, now 4" in str(own_change.value)
    assert "baseline.epochs" not in str(own_change.value)


def test_run_presets_and_study_files_are_listed_apart_and_a_study_is_no_preset(capsys):
    from medbridge.defaults import list_presets, list_studies
    from medbridge.engine.ablation import read_study

    presets, studies = list_presets(), list_studies()
    assert "odir" in presets and "demo" in presets and "ablations" in studies and not set(presets) & set(studies)
    for name in presets:  # every listed preset is a run config
        load_config(preset=name)
    for name in studies:
        assert "studies" in read_study(name)
    assert main(["train", "--preset", "ablations", "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'ablations'" in err and "is an ablation study (medbridge ablate --study ablations)" in err
    assert len(err.splitlines()) == 1
