"""Tests for mclstexp_lite.pl: figures compare methods only on what they share.

SYNTHETIC metrics tables (made-up numbers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

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
                     "left out ['C2']"]
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
