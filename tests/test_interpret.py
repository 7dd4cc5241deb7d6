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
    with pytest.raises(ValueError, match=r"not in the 3-gene panel: \['NOT_IN_PANEL'\].*panel_coverage"):
        interpret.gene_table(pred, true, ["BAD", "NOT_IN_PANEL", "GOOD", "FLAT"])
    table = interpret.gene_table(pred, true, ["BAD", "NOT_IN_PANEL", "GOOD", "FLAT"],
                                 missing="skip")
    assert list(table.index) == ["BAD", "GOOD", "FLAT"]  # order kept, absent gene skipped
    assert table.attrs["missing"] == ["NOT_IN_PANEL"]  # ... and reported
    r, p = stats.pearsonr(pred.X[:, 0].astype(float), true.X[:, 0].astype(float))
    assert table.loc["GOOD", "r"] == pytest.approx(r, abs=1e-6)
    assert table.loc["GOOD", "p_value"] == pytest.approx(p, rel=1e-4)
    assert table.loc["GOOD", "mean_true"] == pytest.approx(true.X[:, 0].mean(), abs=1e-6)
    assert np.isnan(table.loc["FLAT", "r"]) and np.isnan(table.loc["FLAT", "p_value"])
    assert interpret.gene_table(pred, true, ["NOPE"], missing="skip").empty
    with pytest.raises(ValueError, match="'error' or 'skip'"):
        interpret.gene_table(pred, true, ["GOOD"], missing="drop")


def test_panel_coverage_says_which_requested_genes_the_panel_lacks():
    cov = interpret.panel_coverage(["PTPRC", "ERBB2", "hla-dra", "CD74"],
                                   ["CD74", "HLA-DRA", "PTPRC", "FASN"])
    assert list(cov.index) == ["PTPRC", "ERBB2", "hla-dra", "CD74"]  # the order asked
    assert list(cov["in_panel"]) == [True, False, True, True]
    # the panel's spelling of a gene written with other case or punctuation
    assert list(cov["panel_name"]) == ["PTPRC", "", "HLA-DRA", "CD74"]
    with pytest.raises(TypeError, match="single string"):
        interpret.panel_coverage("ERBB2", ["CD74"])
    with pytest.raises(ValueError, match="duplicated"):
        interpret.panel_coverage(["CD74", "CD74"], ["CD74"])


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
    assert a.uns["smoothed"]["params"]["smooth_neighbours"] == 6
    # a number of neighbours: a smoother map, still the planted regions
    interpret.cluster(a, n_clusters=2, smooth=12, key_added="wide")
    assert a.uns["wide"]["params"]["smooth_neighbours"] == 12
    assert interpret.cluster_scores(a.obs["wide"], a.obs["truth"])["ari"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smooth must be"):
        interpret.cluster(a, n_clusters=2, smooth=a.n_obs)


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


# ----------------------------------------------------------- spatial-only baselines
def test_coordinate_clusters_use_positions_only():
    """SYNTHETIC: two regions side by side; KMeans on the positions alone splits them
    (their expression is never read: scrambling it changes nothing)."""
    a = _two_regions()
    labels = interpret.coordinate_clusters(a, 2, seed=0)
    assert labels.dtype.kind == "U" and len(labels) == a.n_obs
    assert interpret.cluster_scores(labels, a.obs["truth"])["ari"] == pytest.approx(1.0)
    b = a.copy()
    b.X = np.random.default_rng(1).permutation(b.X)
    np.testing.assert_array_equal(interpret.coordinate_clusters(b, 2, seed=0), labels)
    assert "cluster" not in a.obs  # the section is not changed
    with pytest.raises(ValueError, match="n_clusters must be an integer from 2"):
        interpret.coordinate_clusters(a, 1)
    with pytest.raises(ValueError, match="obsm\\['spatial'\\]"):
        interpret.coordinate_clusters(ad.AnnData(a.X), 2)


def test_random_regions_are_contiguous_voronoi_partitions():
    from scipy.spatial import cKDTree

    a = _two_regions(n=48)
    draws = interpret.random_regions(a, 3, n=25, seed=0)
    assert draws.shape == (25, a.n_obs) and draws.dtype.kind == "U"
    xy = a.obsm["spatial"]
    for row in draws:
        assert len(set(row)) == 3
        # each region's spots are closer to its own centre than to any other: a Voronoi
        # cell, so a spot's nearest neighbour mostly shares its region
        nn = cKDTree(xy).query(xy, k=2)[1][:, 1]
        assert (row == row[nn]).mean() > 0.7
    np.testing.assert_array_equal(interpret.random_regions(a, 3, n=25, seed=0), draws)
    assert not np.array_equal(interpret.random_regions(a, 3, n=25, seed=1), draws)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        interpret.random_regions(a, 3, n=0)


# --------------------------------------------------- spatially aware correlation
def _smooth_fields(n_side=14, n_genes=60, seed=0, length=1.5):
    """SYNTHETIC: independent smooth random fields on a grid (Gaussian-smoothed noise),
    a pair of sections with the same spots whose prediction is unrelated to the truth
    (apart from gene 0, which is the truth plus noise)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)

    def fields():
        f = rng.normal(size=(n_genes, n_side, n_side))
        f = np.stack([gaussian_filter(x, length, mode="wrap") for x in f])
        return f.reshape(n_genes, -1).T

    T, P = fields(), fields()
    P[:, 0] = T[:, 0] + 0.3 * T[:, 0].std() * rng.normal(size=len(T))
    xy = np.array([(x, y) for x in range(n_side) for y in range(n_side)], float) * 100
    mk = []
    for X in (P, T):
        a = ad.AnnData(X.astype(np.float32))
        a.var_names = [f"g{i}" for i in range(n_genes)]
        a.obsm["spatial"] = xy
        mk.append(a)
    return mk[0], mk[1]


def test_spatial_pearson_keeps_false_positives_of_smooth_maps_near_the_level():
    """Two independent smooth maps (Moran's I about 0.8) correlate 'significantly' by the
    t-test far more often than 5 % (about 60 % here); the spatial null brings that back
    towards 5 % (about 10 %: better, not exact, as its docstring says), and a real
    relation (gene 0) stays significant under both."""
    pred, true = _smooth_fields()
    res = interpret.spatial_pearson(pred, true, n_perm=499, seed=0)
    assert list(res.columns) == ["r", "p_value", "p_spatial", "moran_i_true", "moran_i_pred"]
    assert res.attrs == {"n_spots": 196, "n_perm": 499, "n_neighbors": 6}
    # r and the t-test p are scipy's
    for g in ("g0", "g5"):
        r, p = stats.pearsonr(pred[:, g].X.ravel().astype(float), true[:, g].X.ravel().astype(float))
        assert res.loc[g, "r"] == pytest.approx(r, abs=1e-6)
        assert res.loc[g, "p_value"] == pytest.approx(p, rel=1e-4)
    null = res.drop(index="g0")
    assert (null["moran_i_true"] > 0.5).all()  # smooth maps: strong autocorrelation
    assert (null["p_value"] < 0.05).mean() > 0.4  # the t-test is fooled
    assert (null["p_spatial"] < 0.05).mean() < 0.2  # the spatial null much less so
    assert (null["p_spatial"] >= null["p_value"]).mean() > 0.9
    assert res.loc["g0", "p_spatial"] == pytest.approx(1 / 500)  # the real relation
    assert res["p_spatial"].between(1 / 500, 1).all()
    # the same seed, the same null
    again = interpret.spatial_pearson(pred, true, n_perm=499, seed=0)
    pd.testing.assert_frame_equal(again, res)


def test_spatial_pearson_matches_the_t_test_on_spatially_random_values():
    """SYNTHETIC white noise: no autocorrelation, so the spatial null and the t-test agree
    about how often an unrelated gene looks significant (about 5 %)."""
    rng = np.random.default_rng(3)
    n, g = 150, 200
    xy = rng.uniform(0, 1000, (n, 2))
    mk = []
    for _ in range(2):
        a = ad.AnnData(rng.normal(size=(n, g)).astype(np.float32))
        a.obsm["spatial"] = xy
        mk.append(a)
    res = interpret.spatial_pearson(mk[0], mk[1], n_perm=999, seed=0)
    assert res["moran_i_true"].abs().mean() < 0.05
    assert abs((res["p_spatial"] < 0.05).mean() - (res["p_value"] < 0.05).mean()) < 0.03
    assert np.corrcoef(res["p_spatial"], res["p_value"])[0, 1] > 0.95


def test_spatial_pearson_constant_genes_and_errors():
    pred, true = _smooth_fields(n_genes=3)
    pred.X[:, 1] = 2.0
    res = interpret.spatial_pearson(pred, true, genes=["g1", "g2"], n_perm=99)
    assert list(res.index) == ["g1", "g2"]
    assert res.loc["g1", ["r", "p_value", "p_spatial", "moran_i_pred"]].isna().all()
    assert np.isfinite(res.loc["g1", "moran_i_true"])
    with pytest.raises(ValueError, match="not in the panel: \\['ERBB2'\\]"):
        interpret.spatial_pearson(pred, true, genes=["ERBB2"])
    with pytest.raises(ValueError, match="same spots"):
        interpret.spatial_pearson(pred[::-1], true)
    with pytest.raises(ValueError, match="n_perm"):
        interpret.spatial_pearson(pred, true, n_perm=0)


def test_morans_i_matches_its_formula():
    """Moran's I from its definition on a small SYNTHETIC example: a gradient along a
    line of spots (positive), an alternating pattern (negative)."""
    xy = np.c_[np.arange(10.0), np.zeros(10)]
    W = interpret.spatial_weights(xy, 2)
    assert (W != W.T).nnz == 0 and W.diagonal().sum() == 0
    grad = np.arange(10.0)
    alt = np.array([1.0, -1.0] * 5)
    I = interpret.morans_i(np.c_[grad, alt, np.ones(10)], W)
    Wd = W.toarray()
    for x, got in zip((grad, alt), I[:2]):
        xc = x - x.mean()
        assert got == pytest.approx(10 / Wd.sum() * xc @ Wd @ xc / (xc @ xc))
    assert I[0] > 0.3 and I[1] < -0.3 and np.isnan(I[2])
    with pytest.raises(ValueError, match="n_neighbors"):
        interpret.spatial_weights(xy, 10)


# ------------------------------------- notebook 05's parameter: the labelled section
@pytest.mark.parametrize("section, match", [
    ("C3", "LABELLED_SECTION='C3' has no pathologist labels; her2st sections with labels: "
           "A1, B1, C1"),
    ("B1", r"LABELLED_SECTION='B1' must be one of SECTIONS \['A1', 'C3'\]"),
])
def test_check_params_stops_a_labelled_section_without_labels(section, match, monkeypatch):
    """The labels are looked up in the data manifest (data_manifest.csv), not on disk."""
    from mclstexp_lite import workflow

    monkeypatch.delenv("MCLSTEXP_OFFLINE", raising=False)  # no file checks: names only
    args = dict(dataset="her2st", sections=["A1", "C3"])
    workflow.check_params(**args, labelled_section="A1")  # A1 has labels
    with pytest.raises(ValueError, match=match):
        workflow.check_params(**args, labelled_section=section)
