"""Tests for mclstexp_lite.pl: figures compare methods only on what they share.

SYNTHETIC metrics tables (made-up numbers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mclstexp_lite import cv, pl  # noqa: E402


def _per_fold():
    rows = []
    for method, sections in (("mclstexp", ["A1", "B4", "C2"]), ("ridge_color", ["A1", "B4"])):
        for i, s in enumerate(sections):
            rows.append({"method": method, "scheme": "section", "fold": s, "test_section": s,
                         "pcc_acg": 0.1 * i, "pcc_heg": 0.2, "mse": 0.3, "mae": 0.4})
    return pd.DataFrame(rows)


def test_methods_are_compared_on_the_sections_they_share():
    kept, notes = pl.shared_sections(_per_fold())
    assert sorted(set(kept["test_section"])) == ["A1", "B4"] and len(kept) == 4
    assert notes == ["section: compared on the 2 held-out section(s) every method has; "
                     "left out ['C2'] (not scored for C2: ridge_color)"]
    fig = pl.metric_bars(_per_fold())
    assert any("left out ['C2']" in t.get_text() for t in fig.texts)
    full = _per_fold()
    full = full[full.test_section != "C2"]
    assert pl.shared_sections(full)[1] == []


def test_undefined_correlations_are_explained_in_the_summary():
    df = _per_fold()
    df.loc[df.method == "ridge_color", ["pcc_acg", "pcc_heg"]] = float("nan")
    md = cv.summary_markdown(cv.summarize_results(df))
    assert "undefined*" in md and "nan ± nan" not in md
    assert "same at every spot" in md


def test_summary_tables_use_the_same_shared_sections_rule():
    """summarize_results drops what metric_bars drops, and says which rows lost what."""
    table = cv.summarize_results(_per_fold()).set_index("method")
    kept, _ = pl.shared_sections(_per_fold())
    assert (table["n_sections"] == 2).all()
    assert table.loc["mclstexp", "pcc_acg_mean"] == pytest.approx(
        kept[kept.method == "mclstexp"]["pcc_acg"].mean())
    assert table.loc["mclstexp", "left_out"] == "C2 (not scored for: ridge_color)"
    assert table.loc["ridge_color", "left_out"] == ""
    md = cv.summary_markdown(table.reset_index())
    assert "C2 (not scored for: ridge_color)" in md and "compared only on the held-out" in md


def test_a_method_with_no_section_in_common_keeps_an_empty_row():
    df = _per_fold()
    df = df[~((df.method == "ridge_color") & df.test_section.isin(["A1", "B4"]))]
    df = pd.concat([df, df.iloc[:1].assign(method="ridge_color", test_section="Z9", fold="Z9")])
    table = cv.summarize_results(df).set_index("method")
    assert table.loc["ridge_color", "n_sections"] == 0
    assert table.loc["mclstexp", "n_sections"] == 0
    md = cv.summary_markdown(table.reset_index())
    assert "undefined*" not in md and "nan" not in md


def test_pred_vs_true_says_why_a_correlation_is_undefined():
    """SYNTHETIC section: a constant prediction has no correlation; the title says so."""
    import anndata as ad
    import numpy as np

    rng = np.random.default_rng(0)
    true = ad.AnnData(rng.random((6, 2)).astype(np.float32))
    true.var_names = ["g0", "g1"]
    true.obsm["spatial"] = rng.uniform(10, 90, (6, 2))
    true.uns["spatial"] = {"S": {"images": {"hires": np.full((100, 100, 3), 200, np.uint8)},
                                 "scalefactors": {"tissue_hires_scalef": 1.0,
                                                  "spot_diameter_fullres": 10.0},
                                 "metadata": {}}}
    pred = true.copy()
    pred.X = np.ones_like(true.X)
    fig = pl.pred_vs_true(pred, true, ["g0"])
    titles = [ax.get_title() for ax in fig.axes]
    assert any("r undefined: constant" in t for t in titles)
    assert not any("nan" in t for t in titles)
