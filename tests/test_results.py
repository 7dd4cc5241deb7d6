"""Tests for mclstexp_lite._results: results tables of run_cv folders compared on the
sections every run scored. (The summary tables' shared-sections rule is also checked
with the figures in test_pl.py; ``load_results`` against the written metrics in
test_cv.py.)

Data here are SYNTHETIC (factories.synthetic_sections); the runs are the untrained
``mean`` and ``ridge_color`` baselines.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mclstexp_lite import cv

from .factories import RUN, synthetic_sections, tiny_config


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    torch.set_num_threads(2)
    return synthetic_sections(tmp_path_factory.mktemp("synthetic_images"))


def test_compare_averages_only_the_sections_every_run_has(sections, tmp_path):
    """An interrupted run (ridge_color, fold P only: S1, S2) beside a complete one (mean:
    S1, S2, S3): both rows average S1 and S2, and the table says S3 was left out and why."""
    full, part = tmp_path / "mean", tmp_path / "ridge"
    cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(), out_dir=full,
              **RUN)
    cv.run_cv(sections, scheme="patient", method="ridge_color", config=tiny_config(),
              out_dir=part, folds=["P"], **RUN)
    per_section = cv.compare([full, part], per_section=True)
    table = cv.compare([full, part]).set_index("method")
    assert (table["n_sections"] == 2).all() and (table["n_folds"] == 1).all()
    assert table.loc["mean", "left_out"] == "S3 (not scored for: ridge_color)"
    assert table.loc["ridge_color", "left_out"] == ""
    mean_rows = per_section[(per_section.method == "mean") & (per_section.test_section != "S3")]
    assert table.loc["mean", "mse_mean"] == pytest.approx(mean_rows["mse"].mean())
    md = cv.summary_markdown(table.reset_index())
    assert "S3 (not scored for: ridge_color)" in md and "compared only on the held-out" in md
    unshared = cv.method_summary(per_section, shared=False).set_index("method")
    assert unshared.loc["mean", "n_sections"] == 3 and "left_out" not in unshared.columns
    cv.summarize_results.warned = False  # the former name: warns once, same table
    with pytest.warns(FutureWarning, match="use cv.method_summary"):
        old = cv.summarize_results(per_section, shared=False)
    pd.testing.assert_frame_equal(old, cv.method_summary(per_section, shared=False))


def test_neighbour_shares_counts_where_the_neighbours_come_from(tmp_path):
    """SYNTHETIC embeddings written as a results folder: the held-out section T (patient
    P) has embeddings equal to S1's (patient P, 4 spots), so its top-4 neighbours are
    all S1's; a second held-out section U (patient Q) copies S2 (patient Q, 6 spots)."""
    import json

    import numpy as np

    from mclstexp_lite import _folds as fo
    from mclstexp_lite._results import neighbour_shares

    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(size=(4, 8)) + 5, rng.normal(size=(6, 8)) - 5
    patients = {"S1": "P", "S2": "Q", "T": "P", "U": "Q"}
    fold = fo.Fold(name="f", test=("T", "U"), train=("S1", "S2"), reference=("S1", "S2"))
    fo.save_folds([fold], tmp_path / "folds.json", scheme="section", sections=patients)
    (tmp_path / "config.json").write_text(json.dumps(
        {"scheme": "section", "method": "mclstexp", "top_k": 4, "metric": "l1",
         "sections": patients}))
    (tmp_path / "f").mkdir()
    np.savez(tmp_path / "f" / "embeddings.npz", reference=np.vstack([s1, s2]).astype("f4"),
             reference_sections=np.array(["S1"] * 4 + ["S2"] * 6),
             test__T=s1.astype("f4"), test__U=s2.astype("f4"))
    got = neighbour_shares(tmp_path).set_index("test_section")
    assert got.loc["T", "neighbours_same_patient"] == 1.0
    assert got.loc["T", "bank_same_patient"] == pytest.approx(0.4)
    assert got.loc["T", "top_source"] == "S1" and got.loc["T", "top_source_neighbours"] == 1.0
    assert got.loc["U", "neighbours_same_patient"] == 1.0
    assert got.loc["U", "bank_same_patient"] == pytest.approx(0.6)
    assert got.loc["U", "patient"] == "Q" and (got["top_k"] == 4).all()
    with pytest.raises(FileNotFoundError, match="config.json"):
        neighbour_shares(tmp_path / "f")


def test_load_predictions_reads_every_held_out_section_and_names_a_missing_one(sections,
                                                                               tmp_path):
    from mclstexp_lite import _results as results

    out = tmp_path / "mean"
    table = cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(),
                      out_dir=out, **RUN)
    preds = results.load_predictions(out)
    assert list(preds) == list(table["test_section"].astype(str))
    for s, pred in preds.items():
        assert pred.n_obs == sections[s].n_obs
        assert list(pred.var_names) == list(sections[s].var_names)
    victim = next(out.glob("*/pred_S3.h5ad"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="pred_S3.h5ad.*rerun cv.run_cv"):
        results.load_predictions(out)
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        results.load_predictions(tmp_path / "nothing")


def test_workflow_paths_and_checkpoint(tmp_path, capsys):
    from mclstexp_lite import workflow

    assert workflow.training_run_dir(tmp_path) == tmp_path / "02_training" / "run"
    assert workflow.cv_dir(tmp_path, "patient", "mclstexp") == (
        tmp_path / "03_evaluation" / "cv_patient_mclstexp")
    with pytest.raises(ValueError, match="scheme"):
        workflow.cv_dir(tmp_path, "donor", "mclstexp")
    workflow.checkpoint(True, "loss fell")
    assert "checkpoint passed: loss fell" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="checkpoint failed: loss fell. What to check: LR"):
        workflow.checkpoint(False, "loss fell", hint="LR")
