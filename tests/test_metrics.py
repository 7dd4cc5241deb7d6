"""Tests for :mod:`mclstexp_lite.metrics`.

All data are synthetic (seeded random matrices standing in for spots x genes); each
metric is compared with a plain per-gene loop over ``scipy.stats.pearsonr`` and
``sklearn.metrics`` as used in the published mclSTExp evaluation.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, mean_squared_error

from mclstexp_lite import metrics


def loop_pearson(pred, true):
    """Per-gene scipy.stats.pearsonr, NaN for constant genes (as scipy returns)."""
    r, p = [], []
    for g in range(true.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = pearsonr(pred[:, g], true[:, g])
        r.append(float(res[0]))
        p.append(float(res[1]))
    return np.array(r), np.array(p)


@pytest.fixture(scope="module")
def data():
    """Synthetic 80 spots x 120 genes with 3 genes constant in truth, 2 in prediction.

    Gene means are spread so that the 50 highest-mean genes are known in advance:
    gene g has mean ``offset[g]`` with offsets 0.5 apart and noise of sd 0.05.
    """
    rng = np.random.default_rng(42)
    n_spots, n_genes = 80, 120
    offset = rng.permutation(n_genes) * 0.5
    true = offset + 0.05 * rng.normal(size=(n_spots, n_genes))
    pred = true + 0.05 * rng.normal(size=(n_spots, n_genes)) * rng.uniform(0.2, 3, n_genes)
    const_true = [3, 50, 77]
    const_pred = [10, 100]
    # constants whose mean is not exactly representable (0.1 * 80 / 80 != 0.1), so
    # centring leaves round-off instead of exact zeros
    true[:, const_true] = offset[const_true] + 0.1
    pred[:, const_pred] = 0.1
    top50 = np.argsort(-offset)[:50]
    return {
        "pred": pred,
        "true": true,
        "const": sorted(const_true + const_pred),
        "top50": top50,
        "genes": [f"G{g:03d}" for g in range(n_genes)],
    }


def test_gene_pearson_matches_scipy(data):
    df = metrics.gene_pearson(data["pred"], data["true"])
    r_ref, p_ref = loop_pearson(data["pred"], data["true"])
    assert list(df.columns) == ["r", "p_value", "constant"]
    assert df.index.name == "gene" and list(df.index) == list(range(120))
    np.testing.assert_allclose(df["r"], r_ref, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(df["p_value"], p_ref, rtol=0, atol=1e-8, equal_nan=True)
    assert np.flatnonzero(df["constant"]).tolist() == data["const"]
    assert df.loc[df["constant"], ["r", "p_value"]].isna().all().all()
    assert df.loc[~df["constant"], ["r", "p_value"]].notna().all().all()


@pytest.mark.parametrize("n_spots", [3, 4, 7, 500])
def test_pvalues_small_and_large_samples(n_spots):
    """Synthetic: p-values at the extremes of sample size, including strong correlation."""
    rng = np.random.default_rng(n_spots)
    true = rng.normal(size=(n_spots, 30))
    pred = true * np.linspace(0, 5, 30) + rng.normal(size=(n_spots, 30))
    df = metrics.gene_pearson(pred, true)
    r_ref, p_ref = loop_pearson(pred, true)
    np.testing.assert_allclose(df["r"], r_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(df["p_value"], p_ref, rtol=0, atol=1e-8)


def test_perfect_correlation_has_zero_pvalue():
    true = np.arange(12.0).reshape(6, 2)
    df = metrics.gene_pearson(2 * true + 1, true)
    np.testing.assert_allclose(df["r"], [1.0, 1.0])
    np.testing.assert_allclose(df["p_value"], [0.0, 0.0], atol=1e-12)


def test_gene_names(data):
    df = metrics.gene_pearson(data["pred"], data["true"], genes=data["genes"])
    assert list(df.index) == data["genes"]
    with pytest.raises(ValueError, match=r"`genes` has 3 names but the data have 120 genes"):
        metrics.gene_pearson(data["pred"], data["true"], genes=["a", "b", "c"])


def test_pcc_acg(data):
    r_ref, _ = loop_pearson(data["pred"], data["true"])
    expected = np.mean(r_ref[~np.isnan(r_ref)])
    assert metrics.pcc_acg(data["pred"], data["true"]) == pytest.approx(expected, abs=1e-12)


def test_pcc_heg_selects_known_genes(data):
    pred, true = data["pred"].copy(), data["true"]
    top50 = data["top50"]
    # make one highly expressed gene constant in the prediction: it must be excluded
    pred[:, top50[7]] = 0.0
    r_ref, _ = loop_pearson(pred[:, top50], true[:, top50])
    already = len(set(data["const"]) & set(top50.tolist()))
    assert top50[7] not in data["const"]
    assert np.isnan(r_ref[7]) and np.isnan(r_ref).sum() == already + 1
    expected = np.mean(r_ref[~np.isnan(r_ref)])
    assert metrics.pcc_heg(pred, true) == pytest.approx(expected, abs=1e-12)
    # a smaller panel: top 10 by mean
    r10, _ = loop_pearson(data["pred"][:, top50[:10]], true[:, top50[:10]])
    mean10 = np.mean(r10[~np.isnan(r10)])
    assert metrics.pcc_heg(data["pred"], true, n=10) == pytest.approx(mean10, abs=1e-12)
    # selection uses the truth only: inflating other genes in the prediction is ignored
    inflated = data["pred"].copy()
    others = np.setdiff1d(np.arange(true.shape[1]), top50[:10])
    inflated[:, others] += 1000.0
    assert metrics.pcc_heg(inflated, true, n=10) == pytest.approx(mean10, abs=1e-12)


def test_pcc_heg_differs_from_acg(data):
    assert metrics.pcc_heg(data["pred"], data["true"]) != pytest.approx(
        metrics.pcc_acg(data["pred"], data["true"]), abs=1e-6
    )


def test_heg_ties_go_to_lower_index():
    """Synthetic: many genes with exactly equal means; lower column index ranks first."""
    rng = np.random.default_rng(0)
    n_spots, n_genes = 12, 400
    levels = rng.integers(0, 4, size=n_genes)
    profiles = rng.normal(size=(n_spots, 4)) + np.arange(4) * 10.0
    true = profiles[:, levels]  # identical columns within a level -> identical means
    pred = true + rng.normal(size=true.shape)
    means = true.mean(axis=0)
    expected = sorted(range(n_genes), key=lambda g: (-means[g], g))[:150]
    out = metrics.section_metrics(pred, true, n_heg=150)
    assert out["heg_genes"] == expected


def test_mse_mae_match_sklearn(data):
    pred, true = data["pred"], data["true"]
    assert metrics.mse(pred, true) == pytest.approx(mean_squared_error(true, pred), rel=1e-12)
    assert metrics.mae(pred, true) == pytest.approx(mean_absolute_error(true, pred), rel=1e-12)
    assert metrics.mse(pred, true) == pytest.approx(np.mean((pred - true) ** 2), rel=1e-12)


def test_summarize(data):
    pred, true = data["pred"], data["true"]
    out = metrics.section_metrics(pred, true, genes=data["genes"])
    json.dumps(out)  # JSON-serialisable, plain Python values
    assert {
        "pcc_acg", "pcc_heg", "mse", "mae", "n_genes", "n_spots",
        "n_constant_genes", "heg_genes",
    } <= set(out)
    assert out["pcc_acg"] == pytest.approx(metrics.pcc_acg(pred, true), abs=1e-15)
    assert out["pcc_heg"] == pytest.approx(metrics.pcc_heg(pred, true), abs=1e-15)
    assert out["mse"] == pytest.approx(mean_squared_error(true, pred), rel=1e-12)
    assert out["mae"] == pytest.approx(mean_absolute_error(true, pred), rel=1e-12)
    assert (out["n_spots"], out["n_genes"], out["n_constant_genes"]) == (80, 120, 5)
    assert out["heg_genes"] == [data["genes"][g] for g in data["top50"]]
    expected_const_heg = len(set(data["const"]) & set(data["top50"].tolist()))
    assert out["n_heg"] == 50 and out["n_constant_heg"] == expected_const_heg
    for key in ("pcc_acg", "pcc_heg", "mse", "mae"):
        assert type(out[key]) is float
    for key in ("n_spots", "n_genes", "n_constant_genes", "n_heg", "n_constant_heg"):
        assert type(out[key]) is int
    # without names, positions as plain ints
    plain = metrics.section_metrics(pred, true, n_heg=5)
    assert plain["heg_genes"] == data["top50"][:5].tolist()
    assert all(type(g) is int for g in plain["heg_genes"])


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(torch.from_numpy, id="torch"),
        pytest.param(lambda x: torch.from_numpy(x).float(), id="torch-float32"),
        pytest.param(sp.csr_matrix, id="csr"),
        pytest.param(lambda x: ad.AnnData(sp.csr_matrix(x)), id="anndata-sparse"),
        pytest.param(lambda x: ad.AnnData(x), id="anndata-dense"),
    ],
)
def test_input_types(data, convert):
    pred, true = data["pred"], data["true"]
    ref = metrics.section_metrics(pred, true)
    out = metrics.section_metrics(convert(pred), convert(true))
    tol = 1e-6 if "float" in str(getattr(convert(pred), "dtype", "")) else 1e-12
    for key in ("pcc_acg", "pcc_heg", "mse", "mae"):
        assert out[key] == pytest.approx(ref[key], rel=tol, abs=tol)
    assert out["n_constant_genes"] == ref["n_constant_genes"]


def test_anndata_gene_names(data):
    true = ad.AnnData(data["true"])
    true.var_names = data["genes"]
    pred = ad.AnnData(data["pred"])
    pred.var_names = data["genes"]
    assert list(metrics.gene_pearson(pred, true).index) == data["genes"]
    assert metrics.section_metrics(pred, true)["heg_genes"][0] == data["genes"][data["top50"][0]]
    pred.var_names = data["genes"][::-1]
    with pytest.raises(ValueError, match=r"different var_names"):
        metrics.gene_pearson(pred, true)


def test_validation_errors(data):
    pred, true = data["pred"], data["true"]
    with pytest.raises(ValueError, match=r"`pred` has shape \(80, 119\) but `true` has shape"):
        metrics.section_metrics(pred[:, 1:], true)
    with pytest.raises(ValueError, match=r"`true` must be 2-D"):
        metrics.mse(pred, true[:, 0])
    bad = true.copy()
    bad[[1, 2, 3], 4] = np.nan
    with pytest.raises(ValueError, match=r"`true` contains 3 NaN and 0 infinite"):
        metrics.pcc_acg(pred, bad)
    bad = pred.copy()
    bad[0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"`pred` contains 0 NaN and 1 infinite"):
        metrics.mae(bad, true)
    with pytest.raises(ValueError, match=r"at least 3 spots"):
        metrics.gene_pearson(pred[:2], true[:2])
    with pytest.raises(ValueError, match=r"`n_heg`=121 must be between 1 and .*120"):
        metrics.section_metrics(pred, true, n_heg=121)
    with pytest.raises(ValueError, match=r"`n`=0 must be between 1"):
        metrics.pcc_heg(pred, true, n=0)
    with pytest.raises(TypeError, match=r"`pred` must hold real numbers"):
        metrics.mse(np.full(true.shape, "x"), true)


def test_all_constant_gives_nan_with_warning():
    true = np.ones((5, 3))
    pred = np.arange(15.0).reshape(5, 3)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(metrics.pcc_acg(pred, true))


@pytest.fixture()
def per_fold():
    """Synthetic per-fold table: 2 methods x 2 schemes x 4 folds, one NaN value."""
    rng = np.random.default_rng(3)
    rows = []
    for method in ("mclstexp", "knn"):
        for scheme in ("loso", "lopo"):
            for fold in range(4):
                rows.append({
                    "method": method, "scheme": scheme, "fold": fold,
                    "pcc_acg": rng.random(), "pcc_heg": rng.random(),
                    "mse": rng.random(), "mae": rng.random(), "note": "x",
                })
    df = pd.DataFrame(rows)
    df.loc[5, "pcc_heg"] = np.nan
    return df


def test_mean_sd_table(per_fold):
    table = metrics.mean_sd_table(per_fold)
    assert list(table.columns) == [
        "method", "scheme", "n_folds",
        "pcc_acg_mean", "pcc_acg_sd", "pcc_heg_mean", "pcc_heg_sd",
        "mse_mean", "mse_sd", "mae_mean", "mae_sd",
    ]
    assert len(table) == 4
    for _, row in table.iterrows():
        sel = per_fold[(per_fold.method == row.method) & (per_fold.scheme == row.scheme)]
        assert row.n_folds == 4
        for m in ("pcc_acg", "pcc_heg", "mse", "mae"):
            values = sel[m].to_numpy()
            values = values[~np.isnan(values)]
            assert row[f"{m}_mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
            sd = np.sqrt(np.sum((values - values.mean()) ** 2) / (len(values) - 1))
            assert row[f"{m}_sd"] == pytest.approx(sd, rel=1e-12)


def test_mean_sd_table_options(per_fold):
    one = metrics.mean_sd_table(per_fold, by="method", metrics=["mse"])
    assert list(one.columns) == ["method", "n_folds", "mse_mean", "mse_sd"]
    assert one["method"].tolist() == ["knn", "mclstexp"] and one["n_folds"].tolist() == [8, 8]
    single = metrics.mean_sd_table(per_fold[per_fold.fold == 0])
    assert single["pcc_acg_sd"].isna().all()
    with pytest.raises(ValueError, match=r"grouping columns \['dataset'\]"):
        metrics.mean_sd_table(per_fold, by=("dataset",))
    with pytest.raises(ValueError, match=r"metric column 'note' is not numeric"):
        metrics.mean_sd_table(per_fold, metrics=["note"])
    with pytest.raises(ValueError, match=r"none of the metric columns"):
        metrics.mean_sd_table(per_fold[["method", "scheme", "fold"]])
    with pytest.raises(TypeError, match=r"must be a pandas.DataFrame"):
        metrics.mean_sd_table(per_fold.to_dict())


def test_fmt():
    assert metrics.fmt(0.12345, 0.0449) == "0.123 ± 0.045"
    assert metrics.fmt(np.float64(1.5), 0.25, digits=1) == "1.5 ± 0.2"
    assert metrics.fmt(0.5, float("nan")) == "0.500"  # one value: no sd, no "±"
    assert metrics.fmt(0.5, None) == "0.500"
    with pytest.raises(ValueError, match="digits"):
        metrics.fmt(1, 1, digits=-1)


# --------------------------------------------------------------------------- bootstrap


def loop_mean_r(r):
    valid = r[~np.isnan(r)]
    return float(valid.mean()) if valid.size else float("nan")


def loop_section_metrics(pred, true, top):
    """Plain metrics of one (possibly resampled) section; ``top`` = HEG columns."""
    r, _ = loop_pearson(pred, true)
    return {"pcc_acg": loop_mean_r(r), "pcc_heg": loop_mean_r(r[top]),
            "mse": float(np.mean((pred - true) ** 2)),
            "mae": float(np.mean(np.abs(pred - true)))}


def loop_bootstrap(pred_a, pred_b, truth, *, n_heg, unit, n_boot, level, seed):
    """Obviously-correct reference: one replicate at a time, spots indexed, scipy per gene.

    Draws in the documented order: for each replicate, for each section,
    ``rng.integers(n_spots, size=n_spots)`` (spot) or ``rng.integers(n_sections,
    size=n_sections)`` (section).
    """
    rng = np.random.default_rng(seed)
    secs = list(truth)
    top = {s: np.argsort(-truth[s].mean(axis=0), kind="stable")[:n_heg] for s in secs}
    full = {k: [loop_section_metrics(p[s], truth[s], top[s]) for s in secs]
            for k, p in (("a", pred_a), ("b", pred_b))}
    names = ("pcc_acg", "pcc_heg", "mse", "mae")
    point = {k: {m: np.mean([v[m] for v in full[k]]) for m in names} for k in "ab"}
    reps = {m: [] for m in names}
    for _ in range(n_boot):
        if unit == "spot":
            vals = {"a": [], "b": []}
            for s in secs:
                idx = rng.integers(len(truth[s]), size=len(truth[s]))
                for k, p in (("a", pred_a), ("b", pred_b)):
                    vals[k].append(loop_section_metrics(p[s][idx], truth[s][idx], top[s]))
        else:
            pick = rng.integers(len(secs), size=len(secs))
            vals = {k: [full[k][j] for j in pick] for k in "ab"}
        for m in names:
            reps[m].append(np.mean([v[m] for v in vals["a"]])
                           - np.mean([v[m] for v in vals["b"]]))
    out = {}
    for m in names:
        d = np.array(reps[m])
        lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
        out[m] = {"a": point["a"][m], "b": point["b"][m],
                  "diff": point["a"][m] - point["b"][m], "ci_low": lo, "ci_high": hi}
    return out


def make_sections(seed=0, sizes=(6, 9, 12), n_genes=10, noise_b=1.0):
    """Synthetic held-out sections whose resamples hit every constant-gene case.

    Gene 0 is sparse in truth (one non-zero spot: resamples that miss it are constant),
    gene 1 takes two values, half the spots each (resamples can be constant on either
    value), gene 2 holds zeros, one tiny value and one large one (resamples without
    the large one have a tiny but non-zero variance), gene 3 is constant in
    prediction A. Other genes are Gaussian with spread means.
    """
    rng = np.random.default_rng(seed)
    truth, a, b = {}, {}, {}
    for j, n in enumerate(sizes):
        t = rng.normal(size=(n, n_genes)) + np.arange(n_genes) * 0.3
        t[:, 0] = 0.0
        t[rng.integers(n), 0] = 2.0
        t[:, 1] = np.arange(n) % 2
        t[:, 2] = 0.0
        t[:2, 2] = [1e-4, 100.0]
        pa = t + 0.5 * rng.normal(size=t.shape)
        pa[:, 3] = 1.5
        truth[f"s{j}"] = t
        a[f"s{j}"] = pa
        b[f"s{j}"] = t + noise_b * rng.normal(size=t.shape)
    return a, b, truth


def test_pearson_r_resampled_matches_scipy():
    """Synthetic: the weighted per-gene r of each resample equals scipy on the drawn spots."""
    a, _, truth = make_sections(sizes=(6,))
    p, t = a["s0"], truth["s0"]
    rng = np.random.default_rng(1)
    idx = rng.integers(6, size=(400, 6))
    counts = np.stack([np.bincount(i, minlength=6) for i in idx])
    r, constant = metrics._pearson_r(p, t, counts)
    assert r.shape == constant.shape == (400, 10)
    for b in range(400):
        ref, _ = loop_pearson(p[idx[b]], t[idx[b]])
        np.testing.assert_allclose(r[b], ref, rtol=0, atol=1e-10, equal_nan=True)
        assert (constant[b] == np.isnan(ref)).all()
    # the data reach every path: constant at the most frequent value, constant at
    # another value, and tiny non-zero variance
    drawn = t[idx]  # (replicates, spots, genes)
    assert (drawn[:, :, 0] == 0).all(axis=1).any()
    assert (drawn[:, :, 1] == 1).all(axis=1).any()
    tiny = (drawn[:, :, 2] == 1e-4).any(axis=1) & (drawn[:, :, 2] != 100.0).all(axis=1)
    assert tiny.any() and np.isfinite(r[tiny, 2]).all()
    # unit weights give the plain correlation
    r1, _ = metrics._pearson_r(p, t, np.ones((1, 6), dtype=int))
    np.testing.assert_allclose(r1[0], metrics._pearson_r(p, t)[0], atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("unit", ["spot", "section"])
def test_paired_bootstrap_matches_loop(unit):
    """Synthetic: equal to a plain loop over replicates with the same draws."""
    a, b, truth = make_sections()
    res = metrics.paired_bootstrap(a, b, truth, n_heg=4, unit=unit, n_boot=60, seed=7)
    ref = loop_bootstrap(a, b, truth, n_heg=4, unit=unit, n_boot=60, level=0.95, seed=7)
    assert list(res.columns) == ["metric", "a", "b", "diff", "ci_low", "ci_high", "n_boot",
                                 "unit", "n_sections"]
    assert res["metric"].tolist() == ["pcc_acg", "pcc_heg", "mse", "mae"]
    assert (res["unit"] == unit).all() and (res["n_sections"] == 3).all()
    assert (res["n_boot"] == 60).all()
    for _, row in res.iterrows():
        for col in ("a", "b", "diff", "ci_low", "ci_high"):
            assert row[col] == pytest.approx(ref[row.metric][col], abs=1e-10), (row.metric, col)


def test_paired_bootstrap_point_estimates_match_summarize():
    """Synthetic: a and b are summarize's per-section values averaged over sections."""
    a, b, truth = make_sections(seed=3)
    res = metrics.paired_bootstrap(a, b, truth, n_heg=5, n_boot=5).set_index("metric")
    for col, pred in (("a", a), ("b", b)):
        per = [metrics.section_metrics(pred[s], truth[s], n_heg=5) for s in truth]
        for m in ("pcc_acg", "pcc_heg", "mse", "mae"):
            assert res.loc[m, col] == np.mean([x[m] for x in per])
    assert (res["diff"] == res["a"] - res["b"]).all()


def test_paired_bootstrap_deterministic_and_level():
    a, b, truth = make_sections(seed=4)
    one = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=50, seed=11)
    two = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=50, seed=11)
    pd.testing.assert_frame_equal(one, two)
    other = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=50, seed=12)
    assert not np.allclose(one["ci_low"], other["ci_low"])
    narrow = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=50, seed=11, level=0.5)
    assert ((narrow["ci_high"] - narrow["ci_low"]) <= (one["ci_high"] - one["ci_low"])).all()
    sub = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=50, seed=11, metrics="mse")
    assert sub["metric"].tolist() == ["mse"]
    assert sub.iloc[0]["ci_low"] == one.set_index("metric").loc["mse", "ci_low"]


@pytest.mark.parametrize("unit", ["spot", "section"])
def test_paired_bootstrap_same_method_is_zero(unit):
    a, _, truth = make_sections(seed=5)
    res = metrics.paired_bootstrap(a, a, truth, n_heg=4, unit=unit, n_boot=40)
    assert (res["diff"] == 0).all()
    assert (res["ci_low"] == 0).all() and (res["ci_high"] == 0).all()


@pytest.mark.parametrize("unit", ["spot", "section"])
def test_paired_bootstrap_better_method(unit):
    """Synthetic: B = A + large noise; the interval excludes 0 in A's favour."""
    rng = np.random.default_rng(6)
    truth = {f"s{j}": rng.normal(size=(60, 30)) + np.arange(30) for j in range(4)}
    a = {s: t + 0.3 * rng.normal(size=t.shape) for s, t in truth.items()}
    b = {s: p + 2.0 * rng.normal(size=p.shape) for s, p in a.items()}
    res = metrics.paired_bootstrap(a, b, truth, n_heg=10, unit=unit, n_boot=200)
    res = res.set_index("metric")
    assert res.loc["pcc_acg", "ci_low"] > 0 and res.loc["pcc_heg", "ci_low"] > 0
    assert res.loc["mse", "ci_high"] < 0 and res.loc["mae", "ci_high"] < 0
    assert (res["ci_low"] <= res["diff"]).all() and (res["diff"] <= res["ci_high"]).all()


def test_paired_bootstrap_constant_prediction_is_nan_quietly():
    """Synthetic: a 'mean'-style prediction (same value at every spot) has no correlation."""
    a, _, truth = make_sections(seed=8)
    flat = {s: np.tile(t.mean(axis=0), (len(t), 1)) for s, t in truth.items()}
    for unit in ("spot", "section"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = metrics.paired_bootstrap(a, flat, truth, n_heg=4, unit=unit, n_boot=30)
        res = res.set_index("metric")
        for m in ("pcc_acg", "pcc_heg"):
            assert np.isnan(res.loc[m, ["b", "diff", "ci_low", "ci_high"]].astype(float)).all()
            assert res.loc[m, "n_boot"] == 0 and np.isfinite(res.loc[m, "a"])
        for m in ("mse", "mae"):
            assert np.isfinite(res.loc[m, ["b", "diff", "ci_low", "ci_high"]].astype(float)).all()
            assert res.loc[m, "n_boot"] == 30


def test_paired_bootstrap_sparse_input():
    a, b, truth = make_sections(seed=9)
    dense = metrics.paired_bootstrap(a, b, truth, n_heg=4, n_boot=20)
    sparse = metrics.paired_bootstrap({s: sp.csr_matrix(x) for s, x in a.items()},
                                      {s: sp.csr_matrix(x) for s, x in b.items()},
                                      {s: sp.csr_matrix(x) for s, x in truth.items()},
                                      n_heg=4, n_boot=20)
    pd.testing.assert_frame_equal(dense, sparse)


def test_paired_bootstrap_validation():
    a, b, truth = make_sections(seed=10)
    pb = metrics.paired_bootstrap
    with pytest.raises(ValueError, match=r"`pred_b` and `truth` hold different sections"):
        pb(a, {s: b[s] for s in ("s0", "s1")}, truth, n_heg=4)
    with pytest.raises(ValueError, match=r"`pred_a` lists the sections in the order"):
        pb({s: a[s] for s in ("s2", "s1", "s0")}, b, truth, n_heg=4)
    with pytest.raises(ValueError, match=r"section 's1', `pred_b` vs `truth`: `pred` has shape"):
        pb(a, {**b, "s1": b["s1"][:, 1:]}, truth, n_heg=4)
    with pytest.raises(TypeError, match=r"`truth` must be a mapping"):
        pb(a, b, list(truth.values()), n_heg=4)
    with pytest.raises(ValueError, match=r"`unit` must be 'spot' or 'section'"):
        pb(a, b, truth, n_heg=4, unit="spots")
    with pytest.raises(ValueError, match=r"`n_boot`=0 must be at least 1"):
        pb(a, b, truth, n_heg=4, n_boot=0)
    with pytest.raises(TypeError, match=r"`n_boot` must be an integer"):
        pb(a, b, truth, n_heg=4, n_boot=10.5)
    for level in (0, 1, 95):
        with pytest.raises(ValueError, match=r"`level`=.* strictly between 0 and 1"):
            pb(a, b, truth, n_heg=4, level=level)
    with pytest.raises(ValueError, match=r"`metrics` must be a non-empty subset"):
        pb(a, b, truth, n_heg=4, metrics=("pcc",))
    with pytest.raises(ValueError, match=r"`n_heg`=11 must be between 1 and"):
        pb(a, b, truth, n_heg=11)


def test_paired_bootstrap_drops_undefined_replicates():
    """Synthetic: the only HEG gene is non-zero at one spot; resamples missing it have
    no PCC-HEG and are left out of that interval (n_boot counts the rest)."""
    rng = np.random.default_rng(12)
    t = rng.normal(size=(8, 3))
    t[:, 0] = 0.0
    t[0, 0] = 50.0
    truth = {"s": t}
    a = {"s": t + 0.1 * rng.normal(size=t.shape)}
    b = {"s": t + rng.normal(size=t.shape)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = metrics.paired_bootstrap(a, b, truth, n_heg=1, n_boot=100).set_index("metric")
    assert 0 < res.loc["pcc_heg", "n_boot"] < 100
    assert np.isfinite(res.loc["pcc_heg", ["diff", "ci_low", "ci_high"]].astype(float)).all()
    assert res.loc["pcc_acg", "n_boot"] == 100


# ----------------------------------------------------- tools/run_results.py differences


def load_run_results():
    """Import tools/run_results.py (cheap: its heavy imports are inside functions)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "run_results.py"
    spec = importlib.util.spec_from_file_location("run_results_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root, scheme, name, method, top_k, adatas, preds, *, complete=None, **extra):
    """A results folder laid out like run_cv's: config.json, folds.json, per fold
    metrics.json (completeness marker) and pred_<section>.h5ad (synthetic values)."""
    from mclstexp_lite import cv

    d = root / scheme / name
    d.mkdir(parents=True)
    patients = {s: str(a.obs["patient"].iloc[0]) for s, a in adatas.items()}
    (d / "config.json").write_text(json.dumps(
        {"scheme": scheme, "method": method, "top_k": top_k, "n_heg": 4, **extra}))
    folds = cv.make_folds(patients, scheme)
    cv.save_folds(folds, d / "folds.json", scheme=scheme, sections=patients)
    for fold in folds:
        (d / fold.name).mkdir()
        if complete is None or fold.name in complete:
            (d / fold.name / "metrics.json").write_text("{}")
        for s in fold.test:
            pred = ad.AnnData(preds[s].astype(np.float32), obs=adatas[s].obs.copy(),
                              var=adatas[s].var.copy())
            pred.write_h5ad(d / fold.name / f"pred_{s}.h5ad")
    return d


def test_run_results_differences(tmp_path):
    """Synthetic results folders: what tools/run_results.py compares, skips and writes."""
    tool = load_run_results()
    a, b, truth = make_sections(seed=13, sizes=(6, 8, 7))
    adatas = {}
    for j, (s, t) in enumerate(truth.items()):
        x = ad.AnnData(sp.csr_matrix(t.astype(np.float32)))
        x.obs_names = [f"{s}_spot{i}" for i in range(len(t))]
        x.var_names = [f"G{g}" for g in range(t.shape[1])]
        x.obs["patient"] = "P" + "ABB"[j]
        adatas[s] = x
    flat = {s: np.tile(t.mean(axis=0), (len(t), 1)) for s, t in truth.items()}
    shuffled = {s: x[::-1] for s, x in adatas.items()}  # spots in another order
    dirs = [
        fake_run(tmp_path, "section", "mclstexp", "mclstexp", 200, adatas, a),
        fake_run(tmp_path, "section", "mclstexp_k50", "mclstexp", 50, adatas, b,
                 rescored_from="x"),
        fake_run(tmp_path, "section", "mean", "mean", None, adatas, flat),
        fake_run(tmp_path, "section", "bleep", "bleep", 200, adatas, b, complete=["s0"]),
        fake_run(tmp_path, "section", "ridge_color", "ridge_color", None, shuffled,
                 {s: b[s][::-1] for s in b}),
        fake_run(tmp_path, "patient", "mean", "mean", None, adatas, flat),
    ]
    diffs, notes = tool.bootstrap_differences(dirs, adatas, top_k=200, n_boot=25)
    assert list(diffs.columns) == list(tool.DIFF_COLUMNS)
    assert sorted(set(diffs["comparison"])) == ["mclstexp − mclstexp k=50",
                                                 "mclstexp − mean"]
    assert len(diffs) == 2 * 2 * 4 and set(diffs["unit"]) == {"spot", "section"}
    assert (diffs["method_a"] == "mclstexp k=200").all() and (diffs["n_sections"] == 3).all()
    assert any("bleep k=200 skipped: held-out sections ['s0']" in n for n in notes)
    assert any("ridge_color skipped" in n and "obs_names differ" in n for n in notes)
    assert any(n.startswith("patient: no mclstexp run at top_k=200") for n in notes)
    # the same numbers as paired_bootstrap on the float32 predictions and truth
    f32 = {k: {s: v[s].astype(np.float32) for s in v} for k, v in (("a", a), ("b", b),
                                                                   ("t", truth))}
    cols = ["a", "b", "diff", "ci_low", "ci_high"]
    for unit in ("spot", "section"):
        ref = metrics.paired_bootstrap(f32["a"], f32["b"], f32["t"], n_heg=4, unit=unit,
                                       n_boot=25)
        got = diffs[(diffs.comparison == "mclstexp − mclstexp k=50") & (diffs.unit == unit)]
        np.testing.assert_array_equal(got[cols].to_numpy(float), ref[cols].to_numpy(float))
    mean_rows = diffs[diffs.comparison == "mclstexp − mean"].set_index(["unit", "metric"])
    assert mean_rows.loc[("spot", "pcc_acg"), ["diff", "ci_low"]].isna().all()
    text = tool.differences_markdown(diffs, notes, top_k=200, n_boot=25)
    assert "| section | mclstexp − mean | PCC-ACG | undefined | undefined | 3 |" in text
    assert "Skipped:" in text and "- patient: no mclstexp run" in text
    row = got.set_index("metric").loc["mse"]
    assert f"{row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" in text
    # without mclstexp among the runs: nothing computed, one note
    none, why = tool.bootstrap_differences(dirs[2:3], adatas, top_k=200, n_boot=5)
    assert none.empty and list(none.columns) == list(tool.DIFF_COLUMNS)
    assert why == ["mclstexp is not among the methods run; no differences computed."]
    assert "No differences were computed." in tool.differences_markdown(none, why, top_k=200)


def test_run_results_per_section_table_explains_its_gaps():
    """SYNTHETIC per-section rows: a "-" cell (a section a run lacks, or the undefined
    PCC of the constant mean baseline) comes with a note that says what it means."""
    tool = load_run_results()
    rows = [{"scheme": "section", "method": m, "top_k": k, "test_section": s,
             "pcc_acg": (float("nan") if m == "mean" else 0.5), "pcc_heg": 0.4, "mse": 0.1}
            for m, k, secs in (("mean", float("nan"), ["A1", "B4"]), ("mclstexp", 200, ["A1"]))
            for s in secs]
    md = tool.per_section_markdown(pd.DataFrame(rows))
    assert "| A1 | 0.500 | - |" in md and "| B4 | - | - |" in md
    assert md.endswith(tool.PER_SECTION_NOTE) and "same at every spot" in md
    full = pd.DataFrame([dict(r, pcc_acg=0.5, method="mclstexp", top_k=200) for r in rows])
    full = full.drop_duplicates("test_section")
    assert tool.PER_SECTION_NOTE not in tool.per_section_markdown(full)


# ------------------------------------------------- bad input (from test_bad_input.py)
def test_metrics_name_the_nan_input_and_accept_negative_values():
    """SYNTHETIC values. NaN is an error naming `pred` or `true` (also for AnnData input);
    negative values are valid (e.g. z-scored expression) and give the plain formulas."""
    rng = np.random.default_rng(3)
    true = rng.normal(size=(30, 5))
    pred = true + rng.normal(scale=0.5, size=true.shape)
    assert (true < 0).any()
    assert metrics.mse(pred, true) == pytest.approx(np.mean((pred - true) ** 2), rel=1e-12)
    assert metrics.mae(pred, true) == pytest.approx(np.mean(np.abs(pred - true)), rel=1e-12)
    r = [np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in range(5)]
    assert metrics.pcc_acg(pred, true) == pytest.approx(np.mean(r), rel=1e-10)
    bad = ad.AnnData(X=np.where(np.arange(5) == 2, np.nan, true).astype(np.float32))
    with pytest.raises(ValueError, match=r"`true` contains 30 NaN"):
        metrics.section_metrics(pred, bad)


def test_former_names_warn_once_and_give_the_same_numbers(per_fold):
    """metrics.summarize is the former name of section_metrics (the tutorials used it):
    the first call warns (FutureWarning, naming the new name), later calls are silent,
    and the numbers are the new function's. summary_table had no user: no alias."""
    rng = np.random.default_rng(3)
    true = rng.random((30, 8))
    pred = true + rng.normal(0, 0.1, true.shape)
    assert not hasattr(metrics, "summary_table")
    for old, new, args, kw in ((metrics.summarize, metrics.section_metrics, (pred, true),
                                {"n_heg": 5}),):
        old.warned = False
        with pytest.warns(FutureWarning, match=f"use metrics.{new.__name__}"):
            got = old(*args, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = old(*args, **kw)
        want = new(*args, **kw)
        if isinstance(want, dict):
            assert got == want == again
        else:
            pd.testing.assert_frame_equal(got, want)
            pd.testing.assert_frame_equal(again, want)
