"""Normalisation of raw counts (private; public as :func:`mclstexp_lite.pp.normalize`).

A module of its own, below the gene panels (:mod:`mclstexp_lite._panels` normalises
sections to pick highly variable genes) and the preprocessing namespace
(:mod:`mclstexp_lite.pp`, which re-exports everything here); the two methods are
described in ``pp``'s docstring and ``docs/preprocessing.md``.
"""

from __future__ import annotations

import copy as copy_module
import logging
import math
import numbers
from collections.abc import Mapping

import numpy as np

from . import _util

logger = logging.getLogger("mclstexp_lite.pp")

__all__ = ["normalize", "NORMALIZE_KEY", "NORMALIZE_METHODS", "PUBLISHED_RESCALE"]

#: ``adata.uns`` key written by :func:`normalize`.
NORMALIZE_KEY = "mclstexp_normalize"
NORMALIZE_METHODS = ("library_size", "published")
#: ``rescale`` default of ``scprep.normalize.library_size_normalize`` (scprep 1.2.3),
#: which the published preprocessing relies on.
PUBLISHED_RESCALE = 10_000.0


# ------------------------------------------------------------------------ helpers
def _make_actual(adata) -> None:
    """Turn a view into an actual AnnData in place, through AnnData's public API:
    assigning a slot of a view makes it an actual AnnData (its documented
    copy-on-modify), here ``uns``, given a deep copy of its own contents."""
    if adata.is_view:
        adata.uns = copy_module.deepcopy(dict(adata.uns))


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
