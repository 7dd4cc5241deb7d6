"""Tests for mclstexp_lite.interpret: gene rankings, named-gene tables, clustering and
its scores against pathologist labels.

All data here are SYNTHETIC (random numbers with a planted signal); every expected value
comes from scipy / scikit-learn applied directly, or from the planted structure."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mclstexp_lite import interpret


def _pair(seed, n=60, genes=("GOOD", "BAD", "FLAT")):
    """SYNTHETIC (pred, true): GOOD predicted with little noise, BAD at random, FLAT
    predicted as a constant."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, len(genes))).astype(np.float32)
    pred = rng.normal(size=true.shape).astype(np.float32)
    pred[:, 0] = true[:, 0] + 0.5 * rng.normal(size=n)
    pred[:, 2] = 1.0
    mk = [ad.AnnData(x) for x in (pred, true)]
    for a in mk:
        a.var_names = list(genes)
    return mk[0], mk[1]


def test_rank_genes_ranks_by_mean_minus_log10_p_over_folds():
    pairs = [_pair(s) for s in range(3)]
    ranked = interpret.rank_genes(pairs)
    assert list(ranked.columns) == ["mean_r", "mean_neglog10_p", "n_folds"]
    assert ranked.index[0] == "GOOD"
    assert ranked["mean_neglog10_p"].dropna().is_monotonic_decreasing
    rs = [stats.pearsonr(p.X[:, 0].astype(float), t.X[:, 0].astype(float)) for p, t in pairs]
    assert ranked.loc["GOOD", "mean_r"] == pytest.approx(np.mean([r[0] for r in rs]), abs=1e-5)
    assert ranked.loc["GOOD", "mean_neglog10_p"] == pytest.approx(
        np.mean([-np.log10(r[1]) for r in rs]), rel=1e-3)
    assert ranked.loc["GOOD", "n_folds"] == 3
    # a constant prediction has no correlation: no fold counts for it, and it ranks last
    assert ranked.index[-1] == "FLAT" and ranked.loc["FLAT", "n_folds"] == 0
    assert np.isnan(ranked.loc["FLAT", "mean_r"])
    # arrays need the gene names
    arrays = [(p.X, t.X) for p, t in pairs]
    same = interpret.rank_genes(arrays, genes=["GOOD", "BAD", "FLAT"])
    pd.testing.assert_frame_equal(same, ranked)
    with pytest.raises(ValueError, match="genes="):
        interpret.rank_genes(arrays)


def test_rank_genes_refuses_prediction_and_truth_with_other_genes():
    pred, true = _pair(0)
    pred.var_names = ["GOOD", "FLAT", "BAD"]
    with pytest.raises(ValueError, match="different genes"):
        interpret.rank_genes([(pred, true)])


def test_gene_table_gives_r_and_p_of_the_named_genes_in_the_panel():
    pred, true = _pair(1)
    table = interpret.gene_table(pred, true, ["BAD", "NOT_IN_PANEL", "GOOD", "FLAT"])
    assert list(table.index) == ["BAD", "GOOD", "FLAT"]  # order kept, absent gene skipped
    r, p = stats.pearsonr(pred.X[:, 0].astype(float), true.X[:, 0].astype(float))
    assert table.loc["GOOD", "r"] == pytest.approx(r, abs=1e-6)
    assert table.loc["GOOD", "p_value"] == pytest.approx(p, rel=1e-4)
    assert table.loc["GOOD", "mean_true"] == pytest.approx(true.X[:, 0].mean(), abs=1e-6)
    assert np.isnan(table.loc["FLAT", "r"]) and np.isnan(table.loc["FLAT", "p_value"])
    assert interpret.gene_table(pred, true, ["NOPE"]).empty


def _two_regions(n=40, seed=0):
    """SYNTHETIC section: a left and a right region with different expression
    programmes (20 genes), spots on a grid; obs['truth'] is the region."""
    rng = np.random.default_rng(seed)
    xy = np.array([(x, y) for x in range(8) for y in range(n // 8)], dtype=float)[:n]
    region = np.where(xy[:, 0] < 4, "left", "right")
    X = rng.normal(size=(n, 20))
    X[region == "left", :10] += 4.0
    X[region == "right", 10:] += 4.0
    a = ad.AnnData(X.astype(np.float32))
    a.obsm["spatial"] = xy * 100
    a.obs["truth"] = region
    return a


def test_kmeans_finds_planted_regions_and_records_how():
    a = _two_regions()
    labels = interpret.cluster(a, n_clusters=2, seed=0)
    assert labels.dtype.kind == "U" and len(labels) == a.n_obs
    assert interpret.cluster_scores(labels, a.obs["truth"])["ari"] == pytest.approx(1.0)
    assert list(a.obs["cluster"].astype(str)) == list(labels)
    assert a.uns["cluster"]["params"]["method"] == "kmeans"
    assert a.uns["cluster"]["params"]["n_clusters"] == 2
    again = interpret.cluster(a.copy(), n_clusters=2, seed=0)
    np.testing.assert_array_equal(again, labels)  # deterministic for a seed
    X_before = a.X.copy()
    interpret.cluster(a, n_clusters=2, smooth=True, key_added="smoothed")
    np.testing.assert_array_equal(a.X, X_before)  # smoothing works on a copy
    assert interpret.cluster_scores(a.obs["smoothed"], a.obs["truth"])["ari"] == pytest.approx(1.0)
    assert a.uns["smoothed"]["params"]["smooth"] is True


def test_cluster_errors():
    a = _two_regions()
    with pytest.raises(ValueError, match="kmeans"):
        interpret.cluster(a, method="dbscan")
    with pytest.raises(ValueError, match="n_clusters >= 2"):
        interpret.cluster(a)
    with pytest.raises(ValueError, match="n_clusters >= 2"):
        interpret.cluster(a, n_clusters=1)


def test_cluster_scores_match_scikit_learn_and_skip_unlabelled_spots():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = np.array(["a", "a", "b", "b", "c", "c", None, "undetermined"], dtype=object)
    labels = np.array([1, 1, 2, 2, 2, 3, 9, 9])
    s = interpret.cluster_scores(labels, truth, ignore=("undetermined",))
    keep = slice(0, 6)
    assert s["n_spots"] == 6
    assert s["ari"] == pytest.approx(adjusted_rand_score(truth[keep].astype(str),
                                                         labels[keep].astype(str)))
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(truth[keep].astype(str),
                                                                  labels[keep].astype(str)))
    perfect = interpret.cluster_scores(["x", "x", "y"], ["a", "a", "b"])
    assert perfect["ari"] == pytest.approx(1.0) and perfect["nmi"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fewer than two"):
        interpret.cluster_scores(["x", "y"], [None, "undetermined"], ignore=("undetermined",))
