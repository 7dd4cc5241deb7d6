"""Normalisation and gene panels.

Two normalisations are offered (``docs/preprocessing.md`` compares them):

- ``"library_size"`` (default): every spot is scaled to the same total count, then
  ``log1p`` (natural log). This is the standard single-cell / spatial recipe
  (``sc.pp.normalize_total`` followed by ``sc.pp.log1p``).
- ``"published"``: what the published mclSTExp preprocessing computes. It hands a
  GENES x SPOTS matrix to ``scprep.normalize.library_size_normalize`` with scprep's
  defaults, so every *gene* (not every spot) is scaled to a total of 10,000 over the
  section's spots, then ``scprep.transform.log`` (``log10(x + 1)``).

Gene panels (:mod:`mclstexp_lite.panels`, :mod:`mclstexp_lite.gene_names`; re-exported
here, so ``ml.pp.published_panel`` etc. work as before):

- :func:`published_panel` - the 785-gene HER2+ and 171-gene cSCC panels published with
  the mclSTExp code (checksum-verified, converted once to a plain text file);
- :func:`select_panel` - our recipe: highly variable genes per section, combined;
- :func:`save_panel`, :func:`load_panel`, :func:`compare_panels`;
- :func:`subset_genes` - restrict and reorder ``var`` to a panel (matching Ensembl ids
  with or without version suffixes, and other gene names: ``var`` columns or an
  ``id_map`` read by :func:`read_gene_map`).

This module: :func:`normalize`, and :func:`prepare` - subset and normalise in the order
each method implies.

Slots written
-------------
``adata.X``
    Normalised values, float32 (sparse CSR stays sparse CSR: both transforms map 0 to 0).
``adata.layers['counts']``
    The raw counts, kept by :func:`normalize` unless the layer already exists.
``adata.uns['mclstexp_normalize']``
    ``method``, ``target_sum`` (the value actually used), ``log``, ``log_base``,
    ``scaled_axis`` and ``params`` (the arguments as passed).
``adata.uns['mclstexp_missing_genes']``
    Panel genes that :func:`subset_genes` added as all-zero columns.
``adata.var['mclstexp_zero_filled']``
    True for those columns.
``adata.uns['mclstexp_gene_map']``
    How :func:`subset_genes` matched panel genes through other names (ids <-> symbols).
``adata.uns['mclstexp_prepare']``
    ``params`` of :func:`prepare` and the ``order`` of its two steps.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from . import _util
from .gene_names import (  # noqa: F401 - re-exported: ml.pp.subset_genes, ...
    GENE_MAP_KEY,
    GENE_NAME_COLUMNS,
    MISSING_KEY,
    MISSING_MODES,
    ZERO_FILLED_COLUMN,
    read_gene_map,
    subset_genes,
)
from .panels import (  # noqa: F401 - re-exported: ml.pp.published_panel, ...
    PANEL_DATASETS,
    check_gene_list,
    compare_panels,
    load_panel,
    published_panel,
    save_panel,
    select_panel,
)

logger = logging.getLogger(__name__)

__all__ = [
    "normalize",
    "published_panel",
    "select_panel",
    "save_panel",
    "load_panel",
    "compare_panels",
    "subset_genes",
    "read_gene_map",
    "prepare",
    "NORMALIZE_KEY",
    "MISSING_KEY",
    "PREPARE_KEY",
    "NORMALIZE_METHODS",
    "PANEL_DATASETS",
    "PUBLISHED_RESCALE",
]

#: ``adata.uns`` key written by :func:`normalize`.
NORMALIZE_KEY = "mclstexp_normalize"
#: ``adata.uns`` key written by :func:`prepare`.
PREPARE_KEY = "mclstexp_prepare"
NORMALIZE_METHODS = ("library_size", "published")
#: ``rescale`` default of ``scprep.normalize.library_size_normalize`` (scprep 1.2.3),
#: which the published preprocessing relies on.
PUBLISHED_RESCALE = 10_000.0


# ------------------------------------------------------------------------ helpers
def _make_actual(adata) -> None:
    """Turn a view into an actual AnnData in place (scanpy's ``view_to_actual``)."""
    if adata.is_view:
        adata._init_as_actual(adata.copy())


def _matrix_values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (for NaN / sign / integer checks)."""
    from scipy import sparse

    if sparse.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X)


def _check_counts(X, section: str) -> None:
    values = _matrix_values(X)
    if values.dtype.kind not in "biuf":
        raise TypeError(f"section {section}: adata.X has dtype {values.dtype}; it must hold "
                        "numbers (raw counts).")
    if values.dtype.kind == "f":
        n_nan = int(np.isnan(values).sum())
        if n_nan:
            raise ValueError(f"section {section}: adata.X holds {n_nan} NaN value(s). Counts "
                             "must be complete; reload the section or fill the gaps first.")
        n_inf = int(np.isinf(values).sum())
        if n_inf:
            raise ValueError(f"section {section}: adata.X holds {n_inf} infinite value(s); "
                             "counts must be finite. Reload the section.")
    n_neg = int((values < 0).sum())
    if n_neg:
        raise ValueError(f"section {section}: adata.X holds {n_neg} negative value(s). "
                         "normalize expects raw, non-negative counts (was X scaled or "
                         "centred already?); reload the section.")
    if values.dtype.kind == "f" and values.size and not np.array_equal(values, np.round(values)):
        logger.warning("section %s: adata.X holds non-integer values; normalize expects raw "
                       "counts (normalising anyway)", section)


def _as_float64(X):
    """Float64 copy of X: CSR for sparse input, ndarray for dense."""
    from scipy import sparse

    if sparse.issparse(X):
        return sparse.csr_matrix(X, dtype=np.float64, copy=True)
    if not isinstance(X, np.ndarray) and not isinstance(X, np.matrix):
        raise TypeError(f"adata.X of type {type(X).__name__} is not supported; use a numpy "
                        "array or a scipy.sparse matrix (e.g. adata.X = adata.X.compute()).")
    return np.array(X, dtype=np.float64)


def _scale(M, factors: np.ndarray, axis: int):
    """Multiply rows (axis=0: one factor per row) or columns (axis=1) of M by factors."""
    from scipy import sparse

    if sparse.issparse(M):
        D = sparse.diags(factors)
        return sparse.csr_matrix(D @ M if axis == 0 else M @ D)
    return M * (factors[:, None] if axis == 0 else factors[None, :])


def _elementwise(M, fn):
    """Apply a zero-preserving function to the stored values of M."""
    from scipy import sparse

    if sparse.issparse(M):
        M = M.copy()
        M.data = fn(M.data)
        return M
    return fn(M)


def _check_target_sum(target_sum) -> None:
    if target_sum is None:
        return
    if isinstance(target_sum, bool) or not isinstance(target_sum, numbers.Real):
        raise TypeError(f"target_sum must be a positive number or None, got "
                        f"{type(target_sum).__name__}")
    if not math.isfinite(float(target_sum)) or target_sum <= 0:
        raise ValueError(f"target_sum must be a positive finite number or None, got {target_sum}")


# --------------------------------------------------------------------- normalize
def normalize(adata, *, method: str = "library_size", target_sum: float | None = None,
              log: bool = True, copy: bool = False):
    """Normalise raw counts in ``adata.X``, keeping the counts in ``layers['counts']``.

    Parameters
    ----------
    adata
        One section (or several concatenated) with raw counts in ``X``, spots x genes.
    method
        ``"library_size"`` (default): each SPOT is scaled so that its counts sum to
        ``target_sum``; then ``log1p`` (natural log). Equivalent to
        ``sc.pp.normalize_total(adata, target_sum=target_sum)`` + ``sc.pp.log1p(adata)``.

        ``"published"``: what the published mclSTExp preprocessing computes. It calls
        ``scprep.normalize.library_size_normalize`` (default ``rescale=10000``) on a
        GENES x SPOTS matrix, so each GENE is scaled so that its values over the spots
        of ``adata`` sum to ``target_sum``; genes with no counts stay 0. Then
        ``scprep.transform.log`` with its defaults: ``log10(x + 1)``.
    target_sum
        Total that each spot (``"library_size"``) or each gene (``"published"``) is
        scaled to. ``None``: the median of the spots' total counts for
        ``"library_size"`` (scanpy's default), 10,000 for ``"published"`` (scprep's
        default, as the published code uses it).
    log
        Apply the method's log transform after scaling (``False``: scaling only).
    copy
        Return a normalised copy instead of modifying ``adata`` in place.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy=True``, else ``None``. Writes ``X`` (float32; sparse CSR
        stays sparse), ``layers['counts']`` (raw counts, only if the layer is absent) and
        ``uns['mclstexp_normalize']`` with ``method``, ``target_sum`` (value used),
        ``log``, ``log_base`` (``"e"`` or ``"10"``), ``scaled_axis`` (``"spot"`` or
        ``"gene"``) and ``params`` (the arguments as passed).

    Raises
    ------
    ValueError
        If ``adata`` was normalised already, if ``X`` holds NaN, infinite or negative
        values, or (``"library_size"``) if some spots have zero total counts.

    Notes
    -----
    With ``"published"`` a spot's value depends on the other spots of the same
    AnnData (a gene's total is taken over all of them); see ``docs/preprocessing.md``.
    When several sections are concatenated into one AnnData, ``target_sum=None`` for
    ``"library_size"`` uses the median over all their spots, and ``"published"`` takes
    gene totals over all their spots: normalise each section separately to match the
    published per-section processing.
    """
    _util.check_anndata(adata)
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, NORMALIZE_METHODS))}, "
                         f"got {method!r}")
    _check_target_sum(target_sum)
    if not isinstance(log, (bool, np.bool_)):
        raise TypeError(f"log must be True or False, got {log!r}")
    section = _util.section_name(adata)
    if NORMALIZE_KEY in adata.uns:
        prev = adata.uns[NORMALIZE_KEY]
        prev_method = prev.get("method", "?") if isinstance(prev, Mapping) else "?"
        raise ValueError(
            f"section {section} is already normalised (uns['{NORMALIZE_KEY}'] says method="
            f"{prev_method!r}); normalising twice would scale and log the values again. "
            "Put the raw counts back first (adata.X = adata.layers['counts'].copy(); "
            f"del adata.uns['{NORMALIZE_KEY}']) or reload the section.")
    if adata.X is None:
        raise ValueError(f"section {section}: adata.X is empty; load raw counts into X first.")
    _check_counts(adata.X, section)

    if copy:
        adata = adata.copy()
    else:
        _make_actual(adata)

    M = _as_float64(adata.X)
    if method == "library_size":
        totals = np.asarray(M.sum(axis=1)).ravel()
        zero = totals == 0
        if zero.any():
            raise ValueError(
                f"section {section}: {int(zero.sum())} of {len(totals)} spot(s) have zero "
                "total counts, so per-spot library-size normalisation would divide by zero. "
                "The loaders drop such spots by default (drop_zero_count_spots=True); after "
                "subsetting to a gene panel a spot can lose all its counts. Remove them, e.g. "
                "sc.pp.filter_cells(adata, min_counts=1), or normalise before subsetting "
                "(prepare(..., method='library_size') does).")
        used = float(np.median(totals)) if target_sum is None else float(target_sum)
        M = _scale(M, used / totals, axis=0)
        if log:
            M = _elementwise(M, np.log1p)
        log_base, axis_name = "e", "spot"
    else:
        totals = np.asarray(M.sum(axis=0)).ravel()
        used = PUBLISHED_RESCALE if target_sum is None else float(target_sum)
        n_empty = int((totals == 0).sum())
        if n_empty:
            logger.info("section %s: %d gene(s) have no counts in any spot; they stay 0",
                        section, n_empty)
        factors = np.divide(used, totals, out=np.zeros_like(totals), where=totals > 0)
        M = _scale(M, factors, axis=1)
        if log:
            M = _elementwise(M, lambda v: np.log10(v + 1.0))
        log_base, axis_name = "10", "gene"

    if "counts" not in adata.layers:
        adata.layers["counts"] = adata.X.copy()
    adata.X = M.astype(np.float32)
    adata.uns[NORMALIZE_KEY] = {
        "method": method,
        "target_sum": used,
        "log": bool(log),
        "log_base": log_base if log else "none",
        "scaled_axis": axis_name,
        "params": {"method": method, "target_sum": target_sum, "log": bool(log)},
    }
    return adata if copy else None


# ----------------------------------------------------------------------- prepare
def prepare(adata_or_dict, genes: Sequence[str], *, method: str = "library_size",
            missing: str = "error", id_map=None):
    """Subset to a gene panel and normalise, in the order the method implies.

    Parameters
    ----------
    adata_or_dict
        One section, a ``{section: AnnData}`` dict or a list of sections, with raw counts.
        Not modified.
    genes
        The gene panel.
    method
        ``"library_size"``: normalise FIRST (each spot's library size is its whole
        transcriptome, the standard), then subset to the panel. ``"published"``: subset
        FIRST, then normalise the panel genes per gene, as the published code does.
    missing, id_map
        Passed to :func:`subset_genes`.

    Returns
    -------
    anndata.AnnData, dict or list
        New object(s) of the same shape as the input: ``X`` normalised over the panel
        genes, ``layers['counts']`` the raw counts of the panel genes, and
        ``uns['mclstexp_prepare']`` with ``params`` and ``order``.
    """
    import anndata as ad

    if method not in NORMALIZE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, NORMALIZE_METHODS))}, "
                         f"got {method!r}")
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    genes = check_gene_list(genes)

    def one(a):
        _util.check_anndata(a, name="adata_or_dict")
        if method == "library_size":
            out = normalize(a, method=method, copy=True)
            subset_genes(out, genes, missing=missing, copy=False, id_map=id_map)
            order = "normalize_then_subset"
        else:
            out = subset_genes(a, genes, missing=missing, copy=True, id_map=id_map)
            normalize(out, method=method)
            order = "subset_then_normalize"
        out.uns[PREPARE_KEY] = {"params": {"method": method, "missing": missing,
                                           "n_genes": len(genes)}, "order": order}
        return out

    if isinstance(adata_or_dict, ad.AnnData):
        return one(adata_or_dict)
    if isinstance(adata_or_dict, Mapping):
        return {k: one(v) for k, v in adata_or_dict.items()}
    if isinstance(adata_or_dict, (list, tuple)):
        return [one(v) for v in adata_or_dict]
    raise TypeError("adata_or_dict must be an AnnData, a dict {section: AnnData} or a list "
                    f"of AnnData, got {type(adata_or_dict).__name__}")
