"""A results folder's bookkeeping: what config.json records, the same-run check, and
preparing a folder (refusing another run's results, clearing only what is replaced).

SYNTHETIC: hand-written config dicts and empty fold folders; no training.
"""

from __future__ import annotations

import json

import pytest

from mclstexp_lite import _run_folder as rf
from mclstexp_lite._folds import Fold

from .factories import tiny_config

FOLDS = [Fold("A", ("A1",), ("B1",), ("B1",)), Fold("B", ("B1",), ("A1",), ("A1",))]


def _cfg(**over):
    d = {"scheme": "patient", "method": "mean", "train_config": tiny_config().to_dict(),
         "top_k": None, "package_version": "0.1.0", "created": "2026-11-30T00:00:00",
         "device": "cpu"}
    d.update(over)
    return d


def test_folder_identity_ignores_volatile_keys_and_device():
    a = _cfg()
    b = _cfg(package_version="9.9", created="later", device="cuda")
    b["train_config"] = dict(b["train_config"], device="cuda")
    assert rf.folder_identity(a) == rf.folder_identity(b)
    assert rf.config_diff(rf.folder_identity(a), rf.folder_identity(b)) == []


def test_config_diff_names_each_changed_key_with_its_path():
    a, b = _cfg(), _cfg(top_k=50)
    b["train_config"] = dict(b["train_config"], lr=0.5)
    diff = rf.config_diff(rf.folder_identity(a), rf.folder_identity(b))
    assert "top_k: null -> 50" in diff
    assert any(d.startswith("train_config.lr: ") and d.endswith("-> 0.5") for d in diff)


def test_prepare_out_dir_writes_config_and_refuses_other_runs(tmp_path):
    out = tmp_path / "run"
    assert rf.prepare_out_dir(out, _cfg(), FOLDS, FOLDS, overwrite=False) is False
    assert json.loads((out / rf.CONFIG_FILE).read_text())["method"] == "mean"
    with pytest.raises(ValueError, match=r"different configuration \(top_k: null -> 5\)"):
        rf.prepare_out_dir(out, _cfg(top_k=5), FOLDS, FOLDS, overwrite=False)
    # complete folds are never silently recomputed: reported complete, nothing written
    for f in FOLDS:
        (out / f.name).mkdir()
        (out / f.name / rf.METRICS_FILE).write_text("{}")
    before = (out / rf.CONFIG_FILE).read_bytes()
    assert rf.prepare_out_dir(out, _cfg(created="later"), FOLDS, FOLDS, overwrite=False) is True
    assert (out / rf.CONFIG_FILE).read_bytes() == before
    # overwrite of one fold clears that fold only
    rf.prepare_out_dir(out, _cfg(), FOLDS, FOLDS[:1], overwrite=True)
    assert not (out / "A").exists() and (out / "B" / rf.METRICS_FILE).exists()


def test_a_folder_that_is_not_a_results_folder_is_left_alone(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a run_cv results folder"):
        rf.prepare_out_dir(other, _cfg(), FOLDS, FOLDS, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_stain_config_validates_and_records():
    assert rf.stain_config(None) is None
    assert rf.stain_config("macenko")["method"] == "macenko"
    with pytest.raises(TypeError, match="stain must be None, 'macenko', 'reinhard'"):
        rf.stain_config(3)
