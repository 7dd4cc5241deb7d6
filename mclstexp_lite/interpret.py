"""Interpretation: which genes are predicted well, and do predicted profiles cluster
the tissue the way a pathologist would?

- :func:`rank_genes` - per-gene Pearson r and p over folds, ranked by mean -log10 p
  (the paper's ranking of "best predicted" genes).
- :func:`gene_table` - predicted-vs-true correlation of named genes (immune, cancer).
- :func:`cluster` - KMeans (the paper's choice, k = number of pathologist classes) or
  scanpy Leiden on expression, optionally smoothed over spatial neighbours with squidpy.
- :func:`cluster_scores` - ARI and NMI against the pathologist labels.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from . import _util, metrics

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


def gene_table(pred, true, genes: Sequence[str]):
    """Pearson r and p of each named gene that is in the panel (others are skipped)."""
    import pandas as pd
    from scipy import stats

    present = [g for g in genes if g in list(true.var_names)]
    rows = []
    for g in present:
        p = _dense(pred[:, g].X).ravel()
        t = _dense(true[:, g].X).ravel()
        if np.ptp(p) == 0 or np.ptp(t) == 0:
            rows.append({"gene": g, "r": np.nan, "p_value": np.nan, "mean_true": t.mean()})
            continue
        r, pv = stats.pearsonr(p, t)
        rows.append({"gene": g, "r": float(r), "p_value": float(pv), "mean_true": float(t.mean())})
    return pd.DataFrame(rows, columns=["gene", "r", "p_value", "mean_true"]).set_index("gene")


def cluster(adata, *, n_clusters: int | None = None, method: str = "kmeans",
            smooth: bool = False, n_pcs: int = 20, resolution: float = 0.5,
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
        Average each spot's expression with its spatial neighbours first
        (``squidpy.gr.spatial_neighbors_knn``, 6 nearest spots), which favours contiguous
        regions.

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
    work = adata.copy()
    X = _dense(work.X)
    if smooth:
        import squidpy as sq

        sq.gr.spatial_neighbors_knn(work, n_neighs=6)  # 6 nearest spots, generic coordinates
        A = work.obsp["spatial_connectivities"].tocsr().astype(float)
        A = A + A.T.multiply(A.T > A)  # symmetric
        A.setdiag(1.0)
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
                                       "smooth": smooth, "n_pcs": n_comps,
                                       "resolution": resolution, "seed": seed}}
    return labels


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
