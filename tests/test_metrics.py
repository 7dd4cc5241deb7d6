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
    out = metrics.summarize(pred, true, n_heg=150)
    assert out["heg_genes"] == expected


def test_mse_mae_match_sklearn(data):
    pred, true = data["pred"], data["true"]
    assert metrics.mse(pred, true) == pytest.approx(mean_squared_error(true, pred), rel=1e-12)
    assert metrics.mae(pred, true) == pytest.approx(mean_absolute_error(true, pred), rel=1e-12)
    assert metrics.mse(pred, true) == pytest.approx(np.mean((pred - true) ** 2), rel=1e-12)


def test_summarize(data):
    pred, true = data["pred"], data["true"]
    out = metrics.summarize(pred, true, genes=data["genes"])
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
    plain = metrics.summarize(pred, true, n_heg=5)
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
    ref = metrics.summarize(pred, true)
    out = metrics.summarize(convert(pred), convert(true))
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
    assert metrics.summarize(pred, true)["heg_genes"][0] == data["genes"][data["top50"][0]]
    pred.var_names = data["genes"][::-1]
    with pytest.raises(ValueError, match=r"different var_names"):
        metrics.gene_pearson(pred, true)


def test_validation_errors(data):
    pred, true = data["pred"], data["true"]
    with pytest.raises(ValueError, match=r"`pred` has shape \(80, 119\) but `true` has shape"):
        metrics.summarize(pred[:, 1:], true)
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
        metrics.summarize(pred, true, n_heg=121)
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


def test_summary_table(per_fold):
    table = metrics.summary_table(per_fold)
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


def test_summary_table_options(per_fold):
    one = metrics.summary_table(per_fold, by="method", metrics=["mse"])
    assert list(one.columns) == ["method", "n_folds", "mse_mean", "mse_sd"]
    assert one["method"].tolist() == ["knn", "mclstexp"] and one["n_folds"].tolist() == [8, 8]
    single = metrics.summary_table(per_fold[per_fold.fold == 0])
    assert single["pcc_acg_sd"].isna().all()
    with pytest.raises(ValueError, match=r"grouping columns \['dataset'\]"):
        metrics.summary_table(per_fold, by=("dataset",))
    with pytest.raises(ValueError, match=r"metric column 'note' is not numeric"):
        metrics.summary_table(per_fold, metrics=["note"])
    with pytest.raises(ValueError, match=r"none of the metric columns"):
        metrics.summary_table(per_fold[["method", "scheme", "fold"]])
    with pytest.raises(TypeError, match=r"must be a pandas.DataFrame"):
        metrics.summary_table(per_fold.to_dict())


def test_fmt():
    assert metrics.fmt(0.12345, 0.0449) == "0.123 ± 0.045"
    assert metrics.fmt(np.float64(1.5), 0.25, digits=1) == "1.5 ± 0.2"
    assert metrics.fmt(0.5, float("nan")) == "0.500 ± nan"
    with pytest.raises(ValueError, match="digits"):
        metrics.fmt(1, 1, digits=-1)
