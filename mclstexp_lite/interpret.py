"""Interpretation: which genes are predicted well, and do predicted profiles cluster
the tissue the way a pathologist would?

- :func:`rank_genes` - per-gene Pearson r and p over folds, ranked by mean -log10 p
  (the paper's ranking of "best predicted" genes).
- :func:`panel_coverage` - which requested genes the panel has and which it lacks
  (a gene outside the panel is never predicted: say so instead of dropping it).
- :func:`gene_table` - predicted-vs-true correlation of named genes (immune, cancer).
- :func:`spatial_pearson` - per-gene Pearson r with a p-value that respects spatial
  autocorrelation (a spatially constrained null, beside the usual t-test p-value).
- :func:`cluster` - KMeans (the paper's choice, k = number of pathologist classes) or
  scanpy Leiden on expression, optionally smoothed over spatial neighbours.
- :func:`coordinate_clusters`, :func:`random_regions` - spatial-only baselines: clusters
  from the spot positions alone, and random contiguous regions, with the same k.
- :func:`cluster_scores` - ARI and NMI against the pathologist labels.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

from . import _util, metrics
from ._panels import check_gene_list

__all__ = [
    "IMMUNE_GENES",
    "CANCER_GENES",
    "rank_genes",
    "panel_coverage",
    "gene_table",
    "spatial_weights",
    "morans_i",
    "spatial_pearson",
    "cluster",
    "coordinate_clusters",
    "random_regions",
    "cluster_scores",
]

log = logging.getLogger(__name__)

#: Genes the tutorials look at when they are in the panel.
IMMUNE_GENES = ("PTPRC", "CD74", "HLA-DRA", "HLA-DRB1", "IGKC", "IGHG3", "IGHA1", "IGHM",
                "IGLC2", "CD79A", "MS4A1", "CD3E", "CD8A", "CXCL13", "CD52", "LYZ")
CANCER_GENES = ("ERBB2", "GNAS", "FASN", "MYL12B", "GRB7", "STARD3", "KRT19", "EPCAM")


def _dense(x) -> np.ndarray:
    return _util.to_dense(x, np.float64)


def rank_genes(pairs: Sequence[tuple], *, genes: Sequence[str] | None = None):
    """Rank genes by mean -log10 p of their per-fold Pearson correlation.

    Parameters
    ----------
    pairs
        ``(pred, true)`` per held-out section: AnnData (same var_names) or arrays.
    genes
        Gene names when arrays are given.

    Returns
    -------
    pandas.DataFrame
        Index gene; columns ``mean_r``, ``mean_neglog10_p``, ``n_folds`` (folds where the
        gene was not constant), sorted by ``mean_neglog10_p`` descending.
    """
    import pandas as pd

    frames = []
    for i, (pred, true) in enumerate(pairs):
        g = genes if genes is not None else list(getattr(true, "var_names", []))
        if not len(g):
            raise ValueError("pass genes= when pred/true are arrays")
        if hasattr(pred, "var_names") and list(pred.var_names) != list(true.var_names):
            raise ValueError(f"pair {i}: prediction and truth have different genes")
        t = metrics.gene_pearson(_dense(getattr(pred, "X", pred)), _dense(getattr(true, "X", true)),
                                 genes=list(g))
        t = t.assign(fold=i)
        frames.append(t)
    allp = pd.concat(frames)
    allp["neglog10_p"] = -np.log10(allp["p_value"].clip(lower=1e-300))
    out = allp.groupby(level=0).agg(mean_r=("r", "mean"), mean_neglog10_p=("neglog10_p", "mean"),
                                    n_folds=("r", "count"))
    return out.sort_values("mean_neglog10_p", ascending=False)


def _gene_key(name: str) -> str:
    """Gene name compared without case and punctuation (``hla-dra`` ~ ``HLA.DRA``)."""
    return re.sub(r"[^0-9A-Z]", "", str(name).upper())


def panel_coverage(genes: Sequence[str], panel: Sequence[str]):
    """Which of ``genes`` are in ``panel``: one row per requested gene, in order.

    A model predicts only the genes it was trained on; a requested gene outside the
    panel has no prediction at all. This says which, instead of dropping them.

    Parameters
    ----------
    genes
        Requested gene names (e.g. :data:`IMMUNE_GENES`).
    panel
        The panel's gene names (e.g. ``adata.var_names`` of a prepared section).

    Returns
    -------
    pandas.DataFrame
        Index: the requested genes; columns ``in_panel`` (bool), ``panel_name`` (the
        panel's spelling: the same gene ignoring case and punctuation counts as present,
        e.g. ``hla-dra`` for ``HLA-DRA``; empty when absent).
    """
    import pandas as pd

    genes = check_gene_list(genes, "genes")
    panel = [str(g) for g in panel]
    exact = set(panel)
    loose = {}
    for g in panel:
        loose.setdefault(_gene_key(g), g)
    names = [g if g in exact else loose.get(_gene_key(g), "") for g in genes]
    return pd.DataFrame({"in_panel": [bool(n) for n in names], "panel_name": names},
                        index=pd.Index(genes, name="gene"))


def gene_table(pred, true, genes: Sequence[str], *, missing: str = "error"):
    """Pearson r and p of each named gene, over the spots of one section.

    Parameters
    ----------
    pred, true
        Prediction and measurement (AnnData with the same genes and spots).
    genes
        Gene names; each must be in the panel (``true.var_names``), see ``missing``.
    missing
        ``"error"`` (default): a gene outside the panel is a ``ValueError`` that names it
        (check with :func:`panel_coverage` first); ``"skip"``: leave it out of the table
        and list it in ``table.attrs['missing']``.

    Returns
    -------
    pandas.DataFrame
        Index gene (in the order asked); columns ``r``, ``p_value`` (t-test, which
        assumes independent spots: see :func:`spatial_pearson`), ``mean_true``.
        ``r`` and ``p_value`` are NaN where the prediction or the truth is constant.
    """
    import pandas as pd
    from scipy import stats

    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    panel = set(map(str, true.var_names))
    absent = [g for g in genes if g not in panel]
    if absent and missing == "error":
        raise ValueError(f"{len(absent)} gene(s) not in the {len(panel)}-gene panel: {absent}; "
                         "they have no prediction. Check with interpret.panel_coverage(genes, "
                         "true.var_names) and pass the genes that are in it (or missing='skip').")
    present = [g for g in genes if g in panel]
    rows = []
    for g in present:
        p = _dense(pred[:, g].X).ravel()
        t = _dense(true[:, g].X).ravel()
        if np.ptp(p) == 0 or np.ptp(t) == 0:
            rows.append({"gene": g, "r": np.nan, "p_value": np.nan, "mean_true": t.mean()})
            continue
        r, pv = stats.pearsonr(p, t)
        rows.append({"gene": g, "r": float(r), "p_value": float(pv), "mean_true": float(t.mean())})
    table = pd.DataFrame(rows, columns=["gene", "r", "p_value", "mean_true"]).set_index("gene")
    table.attrs["missing"] = absent
    return table


def spatial_weights(xy, n_neighbors: int = 6):
    """Symmetric 0/1 spatial weights: each spot joined to its ``n_neighbors`` nearest
    spots (and to every spot that has it among its nearest). ``scipy.sparse`` CSR."""
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=float)
    n = len(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"spot coordinates must have shape (n, 2), got {xy.shape}")
    k = int(n_neighbors)
    if k < 1 or k >= n:
        raise ValueError(f"n_neighbors must be between 1 and the number of spots - 1 ({n - 1}), "
                         f"got {n_neighbors}")
    _, idx = cKDTree(xy).query(xy, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    W = sparse.csr_matrix((np.ones(n * k), (rows, idx[:, 1:].ravel())), shape=(n, n))
    return ((W + W.T) > 0).astype(float).tocsr()


def morans_i(X, W) -> np.ndarray:
    """Moran's I of each column of ``X`` (spots x genes) under weights ``W`` (spots x
    spots): ``n / sum(W) * x'Wx / x'x`` of the centred column; NaN for a constant column.
    Near 0 for spatially random values, towards 1 when neighbours are alike."""
    X = _dense(X)
    if X.ndim == 1:
        X = X[:, None]
    Xc = X - X.mean(axis=0)
    num = np.einsum("ij,ij->j", Xc, np.asarray(W @ Xc))
    den = np.einsum("ij,ij->j", Xc, Xc)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = len(X) / float(W.sum()) * num / den
    out[den == 0] = np.nan
    return out


def spatial_pearson(pred, true, *, genes: Sequence[str] | None = None, n_perm: int = 999,
                    n_neighbors: int = 6, seed: int = 0):
    """Per-gene Pearson r with a p-value that allows for spatial autocorrelation.

    The usual p-value of a correlation (the t-test, :func:`gene_table`) assumes the spots
    are independent. Neighbouring spots are not: two smooth maps correlate by chance far
    more often than two noisy ones, so that p-value is too small. Here the null keeps the
    prediction's spatial structure: the centred prediction is written in the eigenvectors
    of the (doubly centred) spatial weights, Moran's eigenvector maps, and the signs of
    its coefficients are flipped at random (the idea of Moran spectral randomisation,
    Wagner & Dray 2015). Each surrogate has exactly the prediction's mean, variance and
    Moran's I; only its alignment with the measurement is random. ``p_spatial`` is the
    share of ``n_perm`` surrogates whose ``|r|`` reaches the observed one (two-sided,
    ``(1 + hits) / (1 + n_perm)``, so never below ``1 / (1 + n_perm)``).

    It is an approximation, better than the t-test but not exact: on pairs of independent
    smooth random maps (``tests/test_interpret.py``) the t-test calls about 30 % of them
    significant at 0.05 when their Moran's I is about 0.5, and about 60 % at 0.8; this
    null about 8 % and 12 %. Read ``p_spatial`` as a floor for the true p-value, not as
    the exact one.

    Parameters
    ----------
    pred, true
        AnnData of one section with the same spots (``obs_names``) and genes;
        ``true.obsm['spatial']`` gives the spot positions.
    genes
        Genes to test (default all); each must be in the panel.
    n_perm
        Surrogates of the null.
    n_neighbors
        Neighbours of each spot in the spatial weights (:func:`spatial_weights`).
    seed
        Seed of the random signs.

    Returns
    -------
    pandas.DataFrame
        Index gene; columns ``r``, ``p_value`` (t-test), ``p_spatial``, ``moran_i_true``,
        ``moran_i_pred``; NaN where the prediction or the truth is constant.
        ``attrs``: ``n_spots``, ``n_perm``, ``n_neighbors``.
    """
    import pandas as pd
    from scipy import linalg, stats

    if list(map(str, pred.obs_names)) != list(map(str, true.obs_names)):
        raise ValueError("prediction and truth must have the same spots in the same order "
                         "(obs_names); align them first, e.g. pred[true.obs_names]")
    if list(map(str, pred.var_names)) != list(map(str, true.var_names)):
        raise ValueError("prediction and truth have different genes")
    if genes is None:
        genes = list(map(str, true.var_names))
    else:
        genes = list(genes)
        absent = [g for g in genes if g not in set(map(str, true.var_names))]
        if absent:
            raise ValueError(f"genes not in the panel: {absent}; check with "
                             "interpret.panel_coverage(genes, true.var_names) first")
    n_perm = int(n_perm)
    if n_perm < 1:
        raise ValueError(f"n_perm must be a positive integer, got {n_perm}")
    if "spatial" not in true.obsm:
        raise ValueError("true.obsm['spatial'] (spot positions) is missing")
    P = _dense(pred[:, genes].X)
    T = _dense(true[:, genes].X)
    n = P.shape[0]
    W = spatial_weights(true.obsm["spatial"], n_neighbors)
    # an orthonormal basis of the centred vectors (orthogonal to the constant), then the
    # eigenvectors of the weights within it: Moran's eigenvector maps
    Q = linalg.null_space(np.ones((1, n)))
    _, U = linalg.eigh(Q.T @ (W @ Q))
    V = Q @ U
    a = V.T @ (P - P.mean(axis=0))
    b = V.T @ (T - T.mean(axis=0))
    norm = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    ok = norm > 0
    r = np.full(len(genes), np.nan)
    p_sp = np.full(len(genes), np.nan)
    ab = a[:, ok] * b[:, ok]
    r[ok] = ab.sum(axis=0) / norm[ok]
    rng = np.random.default_rng(seed)
    hits = np.zeros(int(ok.sum()))
    for start in range(0, n_perm, 250):  # a block of surrogates at a time: bounded memory
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(250, n_perm - start), n - 1))
        r_null = (signs @ ab) / norm[ok]
        hits += (np.abs(r_null) >= np.abs(r[ok]) - 1e-12).sum(axis=0)
    p_sp[ok] = (1 + hits) / (1 + n_perm)
    p_t = np.full(len(genes), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = r[ok] * np.sqrt((n - 2) / np.clip(1 - r[ok] ** 2, 1e-300, None))
    p_t[ok] = 2 * stats.t.sf(np.abs(t_stat), n - 2)
    out = pd.DataFrame({"r": r, "p_value": p_t, "p_spatial": p_sp,
                        "moran_i_true": morans_i(T, W), "moran_i_pred": morans_i(P, W)},
                       index=pd.Index(genes, name="gene"))
    out.attrs.update(n_spots=int(n), n_perm=n_perm, n_neighbors=int(n_neighbors))
    return out


def cluster(adata, *, n_clusters: int | None = None, method: str = "kmeans",
            smooth: bool | int = False, n_pcs: int = 20, resolution: float = 0.5,
            seed: int = 0, key_added: str = "cluster") -> np.ndarray:
    """Cluster spots on their (predicted or true) expression.

    Parameters
    ----------
    adata
        Spots x genes, normalised expression in ``X``; ``obsm['spatial']`` for smoothing.
    n_clusters
        Clusters for KMeans (the paper: the number of pathologist classes).
    method
        ``"kmeans"`` (scikit-learn, on the top principal components) or ``"leiden"``
        (scanpy, on a kNN graph of the principal components; ``resolution``).
    smooth
        Average each spot's expression with its spatial neighbours first (the spot and
        its neighbours in :func:`spatial_weights`, equal weights), which favours
        contiguous regions: ``True`` for the 6 nearest spots, a number for that many
        (more: smoother), ``False`` or 0 for none.

    Returns
    -------
    numpy.ndarray
        Cluster labels as strings; also stored in ``adata.obs[key_added]`` with the
        parameters in ``adata.uns[key_added]['params']``.
    """
    import scanpy as sc
    from sklearn.cluster import KMeans

    if method not in ("kmeans", "leiden"):
        raise ValueError(f"method must be 'kmeans' or 'leiden', got {method!r}")
    if method == "kmeans" and (n_clusters is None or n_clusters < 2):
        raise ValueError("KMeans needs n_clusters >= 2 (e.g. the number of pathologist labels)")
    n_smooth = _smooth_neighbours(smooth, adata.n_obs)
    work = adata.copy()
    X = _dense(work.X)
    if n_smooth:
        A = spatial_weights(_spot_xy(work), n_smooth).tolil()
        A.setdiag(1.0)
        A = A.tocsr()
        deg = np.asarray(A.sum(axis=1)).ravel()
        X = (A @ X) / deg[:, None]
    work.X = X
    n_comps = max(2, min(n_pcs, X.shape[0] - 1, X.shape[1] - 1))
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    if method == "kmeans":
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(
            work.obsm["X_pca"])
    else:
        sc.pp.neighbors(work, n_pcs=n_comps, random_state=seed)
        sc.tl.leiden(work, resolution=resolution, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False)
        labels = work.obs["leiden"].to_numpy()
    labels = np.asarray(labels).astype(str)
    adata.obs[key_added] = labels
    adata.obs[key_added] = adata.obs[key_added].astype("category")
    adata.uns[key_added] = {"params": {"method": method, "n_clusters": n_clusters,
                                       "smooth": smooth,
                                       "smooth_neighbours": n_smooth, "n_pcs": n_comps,
                                       "resolution": resolution, "seed": seed}}
    return labels


def _smooth_neighbours(smooth, n_spots: int) -> int:
    if isinstance(smooth, bool):
        return 6 if smooth else 0
    if not isinstance(smooth, (int, np.integer)) or not 0 <= smooth < n_spots:
        raise ValueError(f"smooth must be True/False or a number of neighbours 0..{n_spots - 1}, "
                         f"got {smooth!r}")
    return int(smooth)


def _spot_xy(adata) -> np.ndarray:
    if "spatial" not in getattr(adata, "obsm", {}):
        raise ValueError("adata.obsm['spatial'] (spot positions) is missing; load the section "
                         "with mclstexp_lite.datasets")
    return np.asarray(adata.obsm["spatial"], dtype=float)


def _check_k(n_clusters, n_spots: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) \
            or not 2 <= n_clusters <= n_spots:
        raise ValueError(f"n_clusters must be an integer from 2 to the number of spots "
                         f"({n_spots}), got {n_clusters!r}")
    return int(n_clusters)


def coordinate_clusters(adata, n_clusters: int, *, seed: int = 0) -> np.ndarray:
    """A spatial-only baseline: KMeans on the spot positions alone (no expression).

    Any clustering of a tissue section is partly a statement about *where* spots are:
    pathologist regions are contiguous, so contiguous clusters agree with them to some
    degree whatever they were computed from. Scoring these clusters with
    :func:`cluster_scores` says how much agreement contiguity alone buys with the same
    ``n_clusters``; an expression clustering is informative only above it.

    Returns
    -------
    numpy.ndarray
        Cluster labels as strings, one per spot (``adata`` is not changed).
    """
    from sklearn.cluster import KMeans

    xy = _spot_xy(adata)
    k = _check_k(n_clusters, len(xy))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(xy).astype(str)


def random_regions(adata, n_clusters: int, *, n: int = 200, seed: int = 0) -> np.ndarray:
    """Random contiguous partitions: ``n`` draws of ``n_clusters`` spots as centres, each
    spot joining its nearest centre (a Voronoi partition of the section).

    The chance level of agreement for contiguous regions: score each row with
    :func:`cluster_scores` and compare an expression clustering with, e.g., their 95th
    percentile. Returns an ``(n, n_spots)`` array of labels as strings.
    """
    from scipy.spatial import cKDTree

    xy = _spot_xy(adata)
    k = _check_k(n_clusters, len(xy))
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    out = np.empty((int(n), len(xy)), dtype=object)
    for i in range(int(n)):
        centres = xy[rng.choice(len(xy), size=k, replace=False)]
        out[i] = cKDTree(centres).query(xy)[1].astype(str)
    return out.astype(str)


def cluster_scores(labels, truth, *, ignore: Sequence[str] = ()) -> dict:
    """Adjusted Rand index and normalised mutual information against ``truth``.

    Spots whose truth is missing or in ``ignore`` (e.g. ``"undetermined"``) are left out.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels).astype(str)
    truth = np.asarray(truth, dtype=object)
    keep = np.array([t is not None and t == t and str(t) not in ignore for t in truth])
    if keep.sum() < 2:
        raise ValueError("fewer than two spots with a pathologist label to compare against")
    lt, tt = labels[keep], truth[keep].astype(str)
    return {"ari": float(adjusted_rand_score(tt, lt)),
            "nmi": float(normalized_mutual_info_score(tt, lt)), "n_spots": int(keep.sum())}
