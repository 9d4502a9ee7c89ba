"""Issue 27 item 3/4: a saved method's adapter.json cannot silently change what the weights mean (labels swapped,
digests deleted, focal keys unknown); each test failed on 3ec5e49."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medbridge.backbones.tiny import tiny_open_clip
from medbridge.io import CorruptFileError
from medbridge.methods import create_method, load_method, save_method
from medbridge.methods.registry import AdapterMismatchError, OptionsError, config_digest

LABELS = ["Atelectasis", "Pneumonia", "Effusion"]
LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip("ViT-B-16-quickgelu", layers=2, seed=3)


@pytest.fixture(scope="module")
def saved(clip, tmp_path_factory):
    """A linear probe with distinct per-label weights, saved once (no training needed to test loading)."""
    import torch

    method = create_method("linear-probe", {"C": [0.1]}, backbones=[clip], labels=LABELS, focal={"num_crops": 0})
    tensors = method.state_tensors()
    with torch.no_grad():
        for t in tensors.values():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)))
    method.load_state_tensors(tensors)
    return save_method(method, tmp_path_factory.mktemp("saved") / "linear_probe")


def edited(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    meta = json.loads((folder / "adapter.json").read_text())
    edit(meta)
    (folder / "adapter.json").write_text(json.dumps(meta))
    return folder


def test_deleting_a_digest_is_an_error_not_a_switch(saved, clip, tmp_path):
    for key in ("weights_sha256", "config_sha256"):
        folder = edited(saved, tmp_path / key, lambda m, key=key: m.pop(key))
        with pytest.raises(CorruptFileError, match=key if key == "weights_sha256" else "config_sha256"):
            load_method(folder, [clip])

    def drop_checksum(meta):  # even with the config digest re-signed, the fingerprint must be whole
        del meta["backbones"][0]["checksum"]
        meta["config_sha256"] = config_digest(meta)

    with pytest.raises(CorruptFileError, match=r"lacks \['checksum'\]"):
        load_method(edited(saved, tmp_path / "fp", drop_checksum), [clip])
    meta = json.loads((saved / "adapter.json").read_text())
    meta["backbones"][0]["checksum"] += 1.0
    meta["config_sha256"] = config_digest(meta)
    with pytest.raises(AdapterMismatchError, match="checksum"):
        load_method(edited(saved, tmp_path / "fp2", lambda m: m.update(meta)), [clip])


def test_swapped_or_repeated_labels_are_refused(saved, clip, tmp_path):
    def swap(meta):
        meta["labels"][0], meta["labels"][1] = meta["labels"][1], meta["labels"][0]

    with pytest.raises(CorruptFileError, match="does not match config_sha256"):
        load_method(edited(saved, tmp_path / "swap", swap), [clip])

    def repeat(meta):  # re-signed: the label list itself must still be valid
        meta["labels"][2] = meta["labels"][0]
        meta["config_sha256"] = config_digest(meta)

    with pytest.raises(CorruptFileError, match=r"\['Atelectasis'\] appear more than once"):
        load_method(edited(saved, tmp_path / "rep", repeat), [clip])
    for change in ({"focal": {**json.loads((saved / "adapter.json").read_text())["focal"], "num_crops": 4}},
                   {"options": {"C": [10.0]}}):
        with pytest.raises(CorruptFileError, match="does not match config_sha256"):
            load_method(edited(saved, tmp_path / next(iter(change)), lambda m, c=change: m.update(c)), [clip])
    assert load_method(saved, [clip]).labels == LABELS  # the untouched file still loads


def test_empty_backbones_is_one_line(saved, clip, tmp_path):
    def empty(meta):  # was "max() arg is an empty sequence"
        meta["backbones"] = []
        meta["config_sha256"] = config_digest(meta)

    with pytest.raises(CorruptFileError, match="backbones must be one or more fingerprints"):
        load_method(edited(saved, tmp_path, empty))


def test_probe_features_that_do_not_fit_name_the_file(saved, clip, tmp_path):
    """Focal views changed (and re-signed): scoring was a bare "size of tensor a (64) must match ... b (32)"."""
    import torch

    def crops(meta):
        meta["focal"]["num_crops"] = None
        meta["config_sha256"] = config_digest(meta)

    method = load_method(edited(saved, tmp_path, crops), [clip])
    with pytest.raises(CorruptFileError, match=r"m/adapter.safetensors: these images give 64 features "
                                               r"\(features='whole\+mean'.*weights take 32"):
        method.scores_views([torch.rand(1, 3, 3, 32, 32)])


def test_unknown_focal_key_is_one_line(saved, clip, tmp_path):
    def unknown(meta):
        meta["focal"]["zoom"] = 2
        meta["config_sha256"] = config_digest(meta)

    with pytest.raises(CorruptFileError, match=r"focal: unknown key\(s\) \['zoom'\]; expected some of"):
        load_method(edited(saved, tmp_path, unknown), [clip])


def test_previous_formats_load_with_a_warning(saved, clip, tmp_path, caplog):
    def as_v1(meta):
        meta["format"] = "medbridge-method/1"
        meta.pop("config_sha256")

    caplog.set_level(logging.WARNING)
    method = load_method(edited(saved, tmp_path / "v1", as_v1), [clip])
    assert method.labels == LABELS and "no digest of its labels and options" in caplog.text
    caplog.clear()
    legacy = tmp_path / "legacy"
    shutil.copytree(LEGACY / "linear_probe", legacy)
    meta = json.loads((legacy / "probe_config.json").read_text())
    meta.pop("weights_sha256")
    (legacy / "probe_config.json").write_text(json.dumps(meta))
    load_method(legacy, [tiny_open_clip("ViT-B-16-quickgelu", seed=3)])
    assert "no weights_sha256 beside it" in caplog.text


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


@settings(max_examples=40, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(["format", "method", "options", "labels", "prompt_names", "focal", "backbones", "info",
                            "ensemble", "weights_sha256"]), value=JSON_VALUES, resign=st.booleans())
def test_fuzz_adapter_json_fields_give_only_medbridge_errors(saved, clip, tmp_path_factory, key, value, resign):
    """Any field of adapter.json set to any JSON value (re-signed or not): the method loads unchanged in meaning
    or the load fails with medbridge's own one-line errors, never TypeError/KeyError/AttributeError."""
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(saved, folder)
    meta = json.loads((folder / "adapter.json").read_text())
    unchanged = meta.get(key) == value
    meta[key] = value
    if resign:
        meta["config_sha256"] = config_digest(meta)
    (folder / "adapter.json").write_text(json.dumps(meta))
    try:
        method = load_method(folder, [clip])
    except (CorruptFileError, AdapterMismatchError, OptionsError, FileNotFoundError) as exc:
        assert "\n" not in str(exc).strip()
        return
    assert method.labels == LABELS and (resign or unchanged)  # an unsigned edit never loads
