"""Tests of mclstexp_lite.pp: normalisation, gene panels, subsetting.

Unit tests use small seeded SYNTHETIC count matrices (labelled as such) and compare
against plain NumPy references written out here; the panel and selection tests use the
real HER2+ counts and the published mclSTExp panels (skipped without the data).
"""

from __future__ import annotations

import logging
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from mclstexp_lite import pp

from .conftest import needs_data
import scipy.sparse as sp

# --------------------------------------------------------------------- synthetic data


def synthetic_counts(n_spots=60, n_genes=40, seed=0, zero_gene=True):
    """SYNTHETIC: overdispersed Poisson counts (gamma-Poisson), one all-zero gene."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.6, 3.0, size=(n_spots, n_genes)) * rng.uniform(0.3, 3.0, (n_spots, 1))
    counts = rng.poisson(lam).astype(np.int32)
    counts[:, 0] += 1  # every spot has counts
    if zero_gene:
        counts[:, 5] = 0
    return counts


def synthetic_adata(counts=None, *, dense=False, section="SYN1", genes=None):
    """SYNTHETIC AnnData with the loaders' layout (int32 CSR counts, obs['section'])."""
    counts = synthetic_counts() if counts is None else counts
    X = counts if dense else sparse.csr_matrix(counts)
    genes = genes if genes is not None else [f"G{i:03d}" for i in range(counts.shape[1])]
    obs = pd.DataFrame({"section": pd.Categorical([section] * counts.shape[0])},
                       index=[f"{section}_{i}" for i in range(counts.shape[0])])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


def dense(X):
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


# Plain references ------------------------------------------------------------------
def ref_library_size(C, target_sum=None, log=True):
    """Per spot: scale each row to target_sum (default: median row total), then ln(1+x)."""
    C = np.asarray(C, dtype=np.float64)
    totals = C.sum(axis=1)
    target = np.median(totals) if target_sum is None else target_sum
    out = C / totals[:, None] * target
    return np.log1p(out) if log else out


def ref_published(C, target_sum=10_000.0, log=True):
    """scprep on genes x spots: each gene (row of C.T) scaled to target_sum; log10(1+x)."""
    G = np.asarray(C, dtype=np.float64).T
    out = np.zeros_like(G)
    for g in range(G.shape[0]):
        total = G[g].sum()
        if total > 0:
            out[g] = G[g] / total * target_sum
    out = out.T
    return np.log10(out + 1.0) if log else out


# ----------------------------------------------------------------------- normalize


@pytest.mark.parametrize("is_dense", [False, True])
@pytest.mark.parametrize("target_sum", [None, 1e4])
def test_library_size_matches_reference(is_dense, target_sum):
    """SYNTHETIC counts: per-spot scaling + natural log1p, sparse and dense."""
    C = synthetic_counts(seed=1)
    a = synthetic_adata(C, dense=is_dense)
    assert pp.normalize(a, target_sum=target_sum) is None
    np.testing.assert_allclose(dense(a.X), ref_library_size(C, target_sum), rtol=2e-6,
                               atol=1e-6)
    assert a.X.dtype == np.float32
    assert sparse.issparse(a.X) is (not is_dense)
    np.testing.assert_array_equal(dense(a.layers["counts"]), C)
    assert a.layers["counts"].dtype == np.int32
    rec = a.uns[pp.NORMALIZE_KEY]
    assert rec["method"] == "library_size" and rec["log"] is True
    assert rec["log_base"] == "e" and rec["scaled_axis"] == "spot"
    expected_target = np.median(C.sum(1)) if target_sum is None else target_sum
    assert rec["target_sum"] == pytest.approx(expected_target)
    assert rec["params"] == {"method": "library_size", "target_sum": target_sum, "log": True}


def test_library_size_matches_scanpy():
    """SYNTHETIC counts: identical to sc.pp.normalize_total + sc.pp.log1p."""
    import scanpy as sc

    C = synthetic_counts(seed=2)
    a = synthetic_adata(C)
    pp.normalize(a)
    b = ad.AnnData(C.astype(np.float64))
    sc.pp.normalize_total(b)
    sc.pp.log1p(b)
    np.testing.assert_allclose(dense(a.X), b.X, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("is_dense", [False, True])
def test_published_matches_reference(is_dense):
    """SYNTHETIC counts: per-gene scaling to 10,000 then log10(1+x); empty gene stays 0."""
    C = synthetic_counts(seed=3)
    a = synthetic_adata(C, dense=is_dense)
    pp.normalize(a, method="published")
    got = dense(a.X)
    np.testing.assert_allclose(got, ref_published(C), rtol=2e-6, atol=1e-6)
    assert np.all(got[:, 5] == 0)
    # each non-empty gene's scaled values sum to the target over the section's spots
    col_sums = (10.0 ** got.astype(np.float64) - 1).sum(axis=0)
    np.testing.assert_allclose(np.delete(col_sums, 5), 10_000.0, rtol=1e-4)
    rec = a.uns[pp.NORMALIZE_KEY]
    assert rec["method"] == "published" and rec["target_sum"] == 10_000.0
    assert rec["log_base"] == "10" and rec["scaled_axis"] == "gene"


def test_published_target_sum_and_no_log():
    """SYNTHETIC counts: target_sum and log=False are honoured by the published method."""
    C = synthetic_counts(seed=4)
    a = synthetic_adata(C)
    pp.normalize(a, method="published", target_sum=50.0, log=False)
    np.testing.assert_allclose(dense(a.X), ref_published(C, 50.0, log=False), rtol=2e-6)
    assert a.uns[pp.NORMALIZE_KEY]["log_base"] == "none"


def test_library_size_no_log_rows_sum_to_target():
    """SYNTHETIC counts: with log=False every spot sums to target_sum."""
    a = synthetic_adata(synthetic_counts(seed=5))
    pp.normalize(a, target_sum=123.0, log=False)
    np.testing.assert_allclose(dense(a.X).sum(axis=1), 123.0, rtol=1e-5)


def test_published_matches_real_scprep():
    """SYNTHETIC counts against scprep itself (only where scprep is installed)."""
    scprep = pytest.importorskip("scprep")
    C = synthetic_counts(seed=6)
    a = synthetic_adata(C)
    pp.normalize(a, method="published")
    # the published call: scprep defaults on a GENES x SPOTS matrix
    expected = scprep.transform.log(scprep.normalize.library_size_normalize(C.T)).T
    np.testing.assert_allclose(dense(a.X), expected, rtol=2e-6, atol=1e-6)


def test_counts_layer_not_overwritten():
    """SYNTHETIC: an existing layers['counts'] is left as it is."""
    C = synthetic_counts(seed=7)
    a = synthetic_adata(C)
    marker = sparse.csr_matrix(C * 2)
    a.layers["counts"] = marker
    pp.normalize(a)
    np.testing.assert_array_equal(dense(a.layers["counts"]), C * 2)


def test_copy_semantics():
    """SYNTHETIC: copy=True returns a normalised copy and leaves the input untouched."""
    C = synthetic_counts(seed=8)
    a = synthetic_adata(C)
    b = pp.normalize(a, copy=True)
    assert b is not a
    np.testing.assert_array_equal(dense(a.X), C)
    assert pp.NORMALIZE_KEY not in a.uns and "counts" not in a.layers
    assert pp.NORMALIZE_KEY in b.uns


def test_normalize_view_in_place():
    """SYNTHETIC: normalising a view in place turns it into an actual AnnData."""
    C = synthetic_counts(seed=9)
    view = synthetic_adata(C)[:30]
    pp.normalize(view)
    assert not view.is_view
    np.testing.assert_allclose(dense(view.X), ref_library_size(C[:30]), rtol=2e-6, atol=1e-6)


def test_double_normalisation_refused():
    """SYNTHETIC: a second normalize raises and says how to recover."""
    a = synthetic_adata()
    pp.normalize(a)
    before = dense(a.X).copy()
    with pytest.raises(ValueError, match="already normalised") as exc:
        pp.normalize(a, method="published")
    assert "layers['counts']" in str(exc.value) and "reload" in str(exc.value)
    np.testing.assert_array_equal(dense(a.X), before)


def test_zero_count_spots_raise_for_library_size():
    """SYNTHETIC: spots without counts are named with their section and count."""
    C = synthetic_counts(seed=10)
    C[[3, 17], :] = 0
    a = synthetic_adata(C, section="SYN_ZERO")
    with pytest.raises(ValueError, match=r"section SYN_ZERO: 2 of 60 spot\(s\) have zero") as e:
        pp.normalize(a)
    assert "drop_zero_count_spots" in str(e.value)
    assert pp.NORMALIZE_KEY not in a.uns  # nothing half-done
    # per-gene scaling has no such division: zero spots simply stay zero
    pp.normalize(a, method="published")
    assert np.all(dense(a.X)[[3, 17]] == 0)


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (-1.0, "negative"),
                                        (np.inf, "infinite")])
def test_invalid_values_raise(bad, match):
    """SYNTHETIC: NaN, infinite and negative values in X are refused."""
    C = synthetic_counts(seed=11).astype(np.float32)
    C[2, 3] = bad
    a = synthetic_adata(C, dense=True)
    with pytest.raises(ValueError, match=match):
        pp.normalize(a)


def test_normalize_bad_arguments():
    """SYNTHETIC: unknown method, bad target_sum and non-AnnData input are refused."""
    a = synthetic_adata()
    with pytest.raises(ValueError, match="'library_size', 'published'"):
        pp.normalize(a, method="cpm")
    with pytest.raises(ValueError, match="target_sum"):
        pp.normalize(a, target_sum=0)
    with pytest.raises(TypeError, match="target_sum"):
        pp.normalize(a, target_sum="10000")
    with pytest.raises(TypeError, match="anndata.AnnData"):
        pp.normalize(np.ones((3, 3)))
    with pytest.raises(TypeError):
        pp.normalize(a, "published")  # options are keyword-only


# ------------------------------------------------------------------ panel files


def test_save_load_round_trip(tmp_path):
    """Round trip keeps order; the provenance header is written; no temp file remains."""
    genes = ["ERBB2", "GRB7", "KRT19", "ACTB"]
    path = pp.save_panel(genes, tmp_path / "sub" / "panel.txt",
                         provenance="test panel\nsecond line")
    assert pp.load_panel(path) == genes
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# test panel", "# second line", "# n_genes: 4"]
    assert lines[3:] == genes
    assert sorted(os.listdir(path.parent)) == ["panel.txt"]
    # overwrite with another panel
    pp.save_panel(["A", "B"], path)
    assert pp.load_panel(path) == ["A", "B"]
    assert sorted(os.listdir(path.parent)) == ["panel.txt"]


def test_save_panel_is_atomic(tmp_path, monkeypatch):
    """A failure before the rename leaves the old file intact and no temp file behind."""
    path = pp.save_panel(["OLD1", "OLD2"], tmp_path / "panel.txt")

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        pp.save_panel(["NEW1", "NEW2", "NEW3"], path)
    monkeypatch.undo()
    assert pp.load_panel(path) == ["OLD1", "OLD2"]
    assert sorted(os.listdir(tmp_path)) == ["panel.txt"]


def test_panel_file_validation(tmp_path):
    """Duplicates, '#'-genes, single strings and truncated files are refused."""
    with pytest.raises(ValueError, match="duplicated"):
        pp.save_panel(["A", "B", "A"], tmp_path / "p.txt")
    with pytest.raises(ValueError, match="'#'"):
        pp.save_panel(["A", "#B"], tmp_path / "p.txt")
    with pytest.raises(TypeError, match="single string"):
        pp.save_panel("ERBB2", tmp_path / "p.txt")
    with pytest.raises(ValueError, match="empty"):
        pp.save_panel([], tmp_path / "p.txt")
    truncated = tmp_path / "t.txt"
    truncated.write_text("# n_genes: 3\nA\nB\n")
    with pytest.raises(ValueError, match="header says 3 genes"):
        pp.load_panel(truncated)
    plain = tmp_path / "plain.txt"
    plain.write_text("A\n\n  B  \n")
    assert pp.load_panel(plain) == ["A", "B"]
    with pytest.raises(FileNotFoundError):
        pp.load_panel(tmp_path / "missing.txt")


def test_compare_panels_toy():
    """Toy panels with a hand-counted overlap."""
    out = pp.compare_panels(["A", "B", "C", "D"], ["C", "D", "E"])
    assert out["n_a"] == 4 and out["n_b"] == 3
    assert out["n_overlap"] == 2 and out["n_union"] == 5
    assert out["jaccard"] == pytest.approx(2 / 5)
    assert out["frac_a_in_b"] == pytest.approx(2 / 4)
    assert out["frac_b_in_a"] == pytest.approx(2 / 3)
    assert out["only_a"] == ["A", "B"] and out["only_b"] == ["E"]
    same = pp.compare_panels(["X", "Y"], ["Y", "X"])
    assert same["jaccard"] == 1.0 and same["only_a"] == [] == same["only_b"]
    empty = pp.compare_panels([], ["A"])
    assert empty["n_a"] == 0 and empty["jaccard"] == 0.0 and np.isnan(empty["frac_a_in_b"])
    with pytest.raises(ValueError, match="duplicated"):
        pp.compare_panels(["A", "A"], ["A"])


# ------------------------------------------------------------------ subset_genes


def test_subset_genes_order_and_layers():
    """SYNTHETIC: var follows the panel order; X and layers are subset alike."""
    C = synthetic_counts(seed=12)
    a = synthetic_adata(C)
    pp.normalize(a)
    panel = ["G010", "G002", "G031"]
    b = pp.subset_genes(a, panel)
    assert list(b.var_names) == panel
    idx = [10, 2, 31]
    np.testing.assert_array_equal(dense(b.layers["counts"]), C[:, idx])
    np.testing.assert_allclose(dense(b.X), dense(a.X)[:, idx])
    assert a.n_vars == C.shape[1]  # the input is left alone
    with pytest.raises(ValueError, match=r"copy=False\) was removed.*adata = pp.subset_genes"):
        pp.subset_genes(a, panel, copy=False)  # in place needs AnnData's private API
    assert a.n_vars == C.shape[1]


def test_subset_genes_missing_error():
    """SYNTHETIC: missing genes raise, naming the section, the genes and the fixes."""
    a = synthetic_adata(section="SYN_MISS")
    with pytest.raises(ValueError) as exc:
        pp.subset_genes(a, ["G001", "NOPE1", "G002", "NOPE2"])
    msg = str(exc.value)
    assert "section SYN_MISS" in msg and "2 of the 4 panel genes" in msg
    assert "['NOPE1', 'NOPE2']" in msg
    assert "missing='zero'" in msg and "select_panel" in msg


def test_subset_genes_zero_fill(caplog):
    """SYNTHETIC: missing='zero' adds all-zero columns, records and logs them."""
    C = synthetic_counts(seed=13)
    a = synthetic_adata(C)
    pp.normalize(a)
    norm = dense(a.X).copy()
    panel = ["G003", "NOPE1", "G007", "NOPE2"]
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.pp"):
        out = pp.subset_genes(a, panel, missing="zero")
    b = out
    assert a.n_vars == C.shape[1]
    assert list(b.var_names) == panel
    X, counts = dense(b.X), dense(b.layers["counts"])
    np.testing.assert_allclose(X[:, [0, 2]], norm[:, [3, 7]])
    np.testing.assert_array_equal(counts[:, [0, 2]], C[:, [3, 7]])
    assert np.all(X[:, [1, 3]] == 0) and np.all(counts[:, [1, 3]] == 0)
    assert b.X.dtype == np.float32 and sparse.issparse(b.X)
    assert b.uns[pp.MISSING_KEY] == ["NOPE1", "NOPE2"]
    assert list(b.var[pp.ZERO_FILLED_COLUMN]) == [False, True, False, True]
    assert b.uns[pp.NORMALIZE_KEY]["method"] == "library_size"
    assert "NOPE1, NOPE2" in caplog.text
    np.testing.assert_array_equal(b.obs_names, a.obs_names)


def test_subset_genes_bad_arguments():
    """SYNTHETIC: bad `missing`, duplicated panel and a bare string are refused."""
    a = synthetic_adata()
    with pytest.raises(ValueError, match="'error' or 'zero'"):
        pp.subset_genes(a, ["G001"], missing="drop")
    with pytest.raises(ValueError, match="duplicated"):
        pp.subset_genes(a, ["G001", "G001"])
    with pytest.raises(TypeError, match="single string"):
        pp.subset_genes(a, "G001")


# ----------------------------------------------------------------------- prepare


def test_prepare_orders_steps():
    """SYNTHETIC: library_size normalises the whole transcriptome first; published subsets
    first - the results equal the two steps done by hand in that order."""
    C = synthetic_counts(seed=14)
    a = synthetic_adata(C)
    panel = ["G020", "G004", "G011", "G030"]
    idx = [20, 4, 11, 30]
    lib = pp.prepare(a, panel)
    np.testing.assert_allclose(dense(lib.X), ref_library_size(C)[:, idx], rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(dense(lib.layers["counts"]), C[:, idx])
    assert lib.uns[pp.PREPARE_KEY]["order"] == "normalize_then_subset"
    pub = pp.prepare(a, panel, method="published")
    np.testing.assert_allclose(dense(pub.X), ref_published(C[:, idx]), rtol=2e-6, atol=1e-6)
    assert pub.uns[pp.PREPARE_KEY]["order"] == "subset_then_normalize"
    assert pp.NORMALIZE_KEY not in a.uns and a.n_vars == C.shape[1]  # input untouched
    both = pp.prepare({"s1": a, "s2": a}, panel)
    assert list(both) == ["s1", "s2"] and both["s1"].n_vars == 4
    # one record of how a section was prepared, read back by prepared_with
    assert pp.prepared_with(lib, panel) and pp.prepared_with(pub, panel, method="published")
    assert not pp.prepared_with(lib, panel, method="published")
    assert not pp.prepared_with(lib, panel[::-1]) and not pp.prepared_with(a, panel)
    import hashlib

    former = a.copy()  # what the tutorials' cache wrote before: still recognised
    former.uns["mclstexp_prepared"] = {"panel": hashlib.sha256(
        "\n".join(panel).encode()).hexdigest()[:16], "method": "library_size", "n_genes": 4}
    assert pp.prepared_with(former, panel) and not pp.prepared_with(former, panel[:3])
    with pytest.raises(TypeError, match="AnnData"):
        pp.prepare("C2", panel)


# -------------------------------------------------------------- select_panel args


def test_select_panel_bad_arguments():
    """SYNTHETIC sections: argument checks with clear messages."""
    a = synthetic_adata(synthetic_counts(seed=15), section="S1")
    b = synthetic_adata(synthetic_counts(seed=16), section="S2")
    with pytest.raises(TypeError, match="single AnnData"):
        pp.select_panel(a)
    with pytest.raises(ValueError, match="empty"):
        pp.select_panel([])
    with pytest.raises(ValueError, match="exceeds the 40 genes"):
        pp.select_panel([a, b], n_top_genes=41)
    with pytest.raises(ValueError, match="min_sections"):
        pp.select_panel([a, b], n_top_genes=5, min_sections=3)
    with pytest.raises(ValueError, match="'union' or 'intersection'"):
        pp.select_panel([a, b], n_top_genes=5, how="both")
    with pytest.raises(ValueError, match="flavor"):
        pp.select_panel([a, b], n_top_genes=5, flavor="pearson")


# ---------------------------------------------------------------------- real data

SELECT_SECTIONS = ("A2", "B3", "C2", "D4")


@pytest.fixture(scope="module")
def her2_counts(data_root):
    """Four real HER2+ sections, counts only (image='none')."""
    from mclstexp_lite import datasets

    return {s: datasets.her2st(s, data_dir=data_root, image="none", download=False,
                               progress=False) for s in SELECT_SECTIONS}


@needs_data
def test_published_panels_real(data_root, monkeypatch):
    """The published panels: 785 HER2+ and 171 cSCC genes, unique strings; cached as
    text with the .npy sha256, so later calls never unpickle the .npy again."""
    from mclstexp_lite import download as dl

    her = pp.published_panel("her2st", data_dir=data_root)
    skin = pp.published_panel("cscc", data_dir=data_root)
    assert len(her) == 785 and len(skin) == 171
    for panel in (her, skin):
        assert len(set(panel)) == len(panel)
        assert all(type(g) is str and g for g in panel)
    assert her[:3] == ["HPS6", "TNC", "NR1H2"]  # the file's order is kept, not sorted
    txt = dl.cache_dir() / "panels" / "cscc_skin_hvg_cut_1000.txt"
    header = [ln for ln in txt.read_text().splitlines() if ln.startswith("#")]
    row = dl.rows("mclstexp_panels", "cscc")[0]
    assert f"# sha256: {row.sha256}" in header

    def no_np_load(*args, **kwargs):
        raise AssertionError("np.load called although the text cache is valid")

    monkeypatch.setattr(np, "load", no_np_load)
    assert pp.published_panel("cscc", data_dir=data_root) == skin
    monkeypatch.undo()
    # a text file that does not match the .npy's checksum is rebuilt
    txt.write_text("# sha256: 0000\nFAKE\n")
    assert pp.published_panel("cscc", data_dir=data_root) == skin
    with pytest.raises(ValueError, match="valid: her2st, cscc"):
        pp.published_panel("visium", data_dir=data_root)


@needs_data
def test_select_panel_real(her2_counts):
    """Four real sections: deterministic, sorted, within the shared genes; union covers
    each section's own HVGs; intersection within union; min_sections matches both."""
    n_top = 300
    union = pp.select_panel(her2_counts, n_top_genes=n_top)
    assert union == pp.select_panel(dict(reversed(list(her2_counts.items()))),
                                    n_top_genes=n_top)
    assert union == sorted(union)
    shared = set.intersection(*(set(a.var_names) for a in her2_counts.values()))
    assert set(union) <= shared
    inter = pp.select_panel(list(her2_counts.values()), n_top_genes=n_top, how="intersection")
    assert set(inter) <= set(union)
    own = {}
    for s, a in her2_counts.items():
        own[s] = set(pp.select_panel({s: a[:, sorted(shared)].copy()}, n_top_genes=n_top))
        assert len(own[s]) == n_top
        assert own[s] <= set(union)
    assert set(union) == set.union(*own.values())
    assert set(inter) == set.intersection(*own.values())
    assert pp.select_panel(her2_counts, n_top_genes=n_top, min_sections=4) == inter
    two = pp.select_panel(her2_counts, n_top_genes=n_top, min_sections=2)
    assert set(inter) <= set(two) <= set(union)
    dropped = pp.select_panel(her2_counts, n_top_genes=n_top, min_spots=1000)
    assert set(dropped) <= set(union) and len(dropped) < len(union)


@needs_data
def test_select_panel_matches_scanpy_on_one_section(her2_counts):
    """One real section against scanpy directly: normalize_total, log1p, HVG on the
    raw counts; the same genes come out."""
    import scanpy as sc

    a = her2_counts["C2"]
    ref = ad.AnnData(X=a.X.astype(np.float64), var=pd.DataFrame(index=a.var_names))
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=500)
    expected = sorted(ref.var_names[ref.var["highly_variable"]])
    assert pp.select_panel([a], n_top_genes=500) == expected
    # a normalised section is read from its counts layer and gives the same panel
    b = pp.normalize(a, copy=True)
    assert pp.select_panel([b], n_top_genes=500) == expected


@needs_data
def test_prepare_real_with_published_panel(her2_counts, data_root):
    """Real C2 prepared on the published panel with both methods."""
    panel = pp.published_panel("her2st", data_dir=data_root)
    a = her2_counts["C2"]
    lib = pp.prepare(a, panel)
    assert lib.shape == (a.n_obs, 785) and list(lib.var_names) == panel
    raw = a[:, panel].X.toarray()
    np.testing.assert_array_equal(dense(lib.layers["counts"]), raw)
    full_totals = np.asarray(a.X.sum(axis=1)).ravel()
    # library size = the whole transcriptome's total, not the panel's
    expected = np.log1p(raw / full_totals[:, None] * np.median(full_totals))
    np.testing.assert_allclose(dense(lib.X), expected, rtol=2e-6, atol=1e-6)
    pub = pp.prepare(a, panel, method="published")
    np.testing.assert_allclose(dense(pub.X), ref_published(raw), rtol=2e-6, atol=1e-6)


def test_ensembl_ids_match_with_or_without_version_suffix():
    """SYNTHETIC: a panel of unversioned Ensembl ids finds a section's versioned ids (and
    the other way round); the result is named as the panel."""
    ids = [f"ENSMUSG{i:011d}" for i in range(40)]
    a = synthetic_adata(genes=[f"{g}.{i % 3 + 1}" for i, g in enumerate(ids)])
    out = pp.subset_genes(a, ids[:5])
    assert list(out.var_names) == ids[:5]
    np.testing.assert_array_equal(dense(out.X), dense(a.X)[:, :5])
    b = synthetic_adata(genes=ids)
    assert list(pp.subset_genes(b, [f"{ids[2]}.7", ids[3]]).var_names) == [f"{ids[2]}.7", ids[3]]


def test_a_panel_in_another_naming_says_so_even_when_zero_filling():
    a = synthetic_adata(genes=[f"ENSMUSG{i:011d}.1" for i in range(40)])
    for missing in ("error", "zero"):
        with pytest.raises(ValueError, match=r"none of the 3 panel genes.*gene symbols.*"
                                             r"Ensembl ids with version suffixes.*naming differs"):
            pp.subset_genes(a, ["ERBB2", "GNAS", "FASN"], missing=missing)


# --------------------------------------------------------------- ids <-> symbols
IDS = [f"ENSG{i:011d}" for i in range(40)]
SYMBOLS = [f"SYM{i}" for i in range(40)]


def test_id_map_table_lets_a_symbol_panel_select_from_ids(tmp_path):
    """SYNTHETIC: a section named by versioned Ensembl ids, a 10x-style features table
    (id, symbol, type; no header) and a panel of symbols."""
    a = synthetic_adata(genes=[f"{g}.2" for g in IDS])
    table = tmp_path / "features.tsv"
    pd.DataFrame({"id": IDS, "symbol": SYMBOLS, "type": "Gene Expression"}).to_csv(
        table, sep="\t", header=False, index=False)
    out = pp.subset_genes(a, ["SYM7", "SYM3"], id_map=table)
    assert list(out.var_names) == ["SYM7", "SYM3"]
    np.testing.assert_array_equal(dense(out.X), dense(a.X)[:, [7, 3]])
    assert out.uns[pp.GENE_MAP_KEY]["n_matched"] == 2
    # the same table with a header row, as a mapping, and for an id panel on symbols
    with_header = tmp_path / "map.csv"
    pd.DataFrame({"gene_id": IDS, "gene_symbol": SYMBOLS}).to_csv(with_header, index=False)
    assert list(pp.subset_genes(a, ["SYM1"], id_map=with_header).var_names) == ["SYM1"]
    assert list(pp.subset_genes(a, ["SYM1"], id_map=dict(zip(IDS, SYMBOLS))).var_names) == ["SYM1"]
    b = synthetic_adata(genes=SYMBOLS)
    out = pp.subset_genes(b, [IDS[4]], id_map=table)
    np.testing.assert_array_equal(dense(out.X), dense(b.X)[:, [4]])
    prepared = pp.prepare(a, ["SYM7", "SYM3"], id_map=table)
    assert list(prepared.var_names) == ["SYM7", "SYM3"]
    with pytest.raises(ValueError, match="naming differs.*id_map="):
        pp.subset_genes(a, ["SYM7", "SYM3"])


def test_symbols_in_a_var_column_are_used_without_a_table():
    """SYNTHETIC: the counts carry ids as var_names and symbols in var['gene_symbols'] (as
    from_files(gene_map=...) writes), or symbols with ids in var['gene_ids'] (Visium)."""
    a = synthetic_adata(genes=IDS)
    a.var["gene_symbols"] = SYMBOLS
    a.var.loc[IDS[9], "gene_symbols"] = ""  # an id without a symbol
    out = pp.subset_genes(a, ["SYM2", "SYM0"])
    np.testing.assert_array_equal(dense(out.X), dense(a.X)[:, [2, 0]])
    assert out.uns[pp.GENE_MAP_KEY]["sources"] == ["var['gene_symbols']"]
    with pytest.raises(ValueError, match=r"1 of the 2 panel genes are not"):
        pp.subset_genes(a, ["SYM2", "SYM9"])
    b = synthetic_adata(genes=SYMBOLS)
    b.var["gene_ids"] = [f"{g}.5" for g in IDS]
    assert list(pp.subset_genes(b, [IDS[1]]).var_names) == [IDS[1]]


def test_one_symbol_from_several_ids_keeps_the_most_expressed_and_says_so():
    """SYNTHETIC: SYM1 is the symbol of two ids; gene 1 has more counts than gene 2."""
    counts = synthetic_counts()
    counts[:, 1] += 5
    counts[:, 2] = counts[:, 1] // 5
    a = synthetic_adata(counts, genes=IDS)
    mapping = dict(zip(IDS, SYMBOLS))
    mapping[IDS[2]] = "SYM1"
    with pytest.warns(UserWarning, match=r"SYM1 <- ENSG00000000001 \(\d+\), ENSG00000000002 "
                                         r"\(\d+\).*Kept the one with the largest total"):
        out = pp.subset_genes(a, ["SYM1", "SYM5"], id_map=mapping)
    np.testing.assert_array_equal(dense(out.X), dense(a.X)[:, [1, 5]])
    assert out.uns[pp.GENE_MAP_KEY]["ambiguous"] == {"SYM1": [IDS[1], IDS[2]]}
    counts[:, 2] += 1000  # now the second id is the expressed one
    b = synthetic_adata(counts, genes=IDS)
    with pytest.warns(UserWarning):
        out = pp.subset_genes(b, ["SYM1"], id_map=mapping)
    np.testing.assert_array_equal(dense(out.X), dense(b.X)[:, [2]])


@pytest.mark.parametrize("rows, match", [
    ([("ENSG1", "A"), ("ENSG1", "B")], r"1 id\(s\) map to more than one symbol, e\.g\. "
                                       r"ENSG1 -> A, B.*delete the wrong rows"),
    ([("ENSG1", "A"), ("ENSG2", "")], r"empty id or symbol, line\(s\) \[2\]"),
    ([("ENSG1",), ("ENSG2",)], r"needs two columns"),
])
def test_malformed_gene_maps_name_the_file_and_the_fix(tmp_path, rows, match):
    path = tmp_path / "bad_map.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=match) as err:
        pp.read_gene_map(path)
    assert "bad_map.tsv" in str(err.value)


def test_identical_rows_are_fine_and_an_unrelated_table_is_refused(tmp_path):
    path = tmp_path / "map.tsv"
    path.write_text("ENSG1\tA\nENSG1\tA\nENSG2\tB\n")
    assert pp.read_gene_map(path) == {"ENSG1": "A", "ENSG2": "B"}
    a = synthetic_adata(genes=IDS)
    with pytest.raises(ValueError, match=r"no gene of the section is in either column of "
                                         r"id_map .*map\.tsv.*another organism"):
        pp.subset_genes(a, ["A"], id_map=path)
    with pytest.raises(FileNotFoundError, match="id_map file not found"):
        pp.subset_genes(a, ["A"], id_map=tmp_path / "nope.tsv")


# ------------------------------------------------- bad input (from test_bad_input.py)
@pytest.mark.parametrize("bad, match", [(np.nan, "1 NaN value"), (-2.0, "1 negative value")])
def test_normalize_refuses_bad_values_in_sparse_counts(bad, match):
    """SYNTHETIC sparse counts (test_pp covers dense ones); the section is named."""
    X = np.random.default_rng(1).poisson(2.0, (20, 8)).astype(np.float32) + 1
    X[4, 2] = bad
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"section": ["S7"] * 20},
                                                       index=[str(i) for i in range(20)]))
    with pytest.raises(ValueError, match=f"section S7: adata.X holds {match}"):
        pp.normalize(a)
    assert pp.NORMALIZE_KEY not in a.uns and "counts" not in a.layers


@pytest.mark.parametrize("method", ["library_size", "published"])
def test_prepare_with_panel_genes_missing_from_a_section(method, caplog):
    """SYNTHETIC section named in obs; the error lists the absent genes and the fix."""
    X = np.random.default_rng(2).poisson(3.0, (15, 4)) + 1
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)),
                   obs=pd.DataFrame({"section": ["B7"] * 15}, index=[f"s{i}" for i in range(15)]),
                   var=pd.DataFrame(index=["ERBB2", "KRT5", "GATA3", "ESR1"]))
    panel = ["ERBB2", "FOXA1", "ESR1", "MKI67"]
    with pytest.raises(ValueError) as err:
        pp.prepare({"B7": a}, panel, method=method)
    msg = str(err.value)
    assert "section B7: 2 of the 4 panel genes" in msg and "FOXA1" in msg and "MKI67" in msg
    assert "missing='zero'" in msg
    out = pp.prepare({"B7": a}, panel, method=method, missing="zero")["B7"]
    assert list(out.var_names) == panel and "FOXA1" in caplog.text
    assert np.all(out[:, ["FOXA1", "MKI67"]].X.toarray() == 0)
