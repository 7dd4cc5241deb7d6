"""Tests for mclstexp_lite.results: results tables of run_cv folders compared on the
sections every run scored. (The summary tables' shared-sections rule is also checked
with the figures in test_pl.py; ``load_results`` against the written metrics in
test_cv.py.)

Data here are SYNTHETIC (factories.synthetic_sections); the runs are the untrained
``mean`` and ``ridge_color`` baselines.
"""

from __future__ import annotations

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
    unshared = cv.summarize_results(per_section, shared=False).set_index("method")
    assert unshared.loc["mean", "n_sections"] == 3 and "left_out" not in unshared.columns
