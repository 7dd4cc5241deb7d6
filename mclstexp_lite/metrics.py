"""Evaluation metrics of mclSTExp: PCC-ACG, PCC-HEG, MSE and MAE.

All functions take a prediction and the measured expression of the same spots and
genes, arrays of shape ``(n_spots, n_genes)``. The definitions follow the published
mclSTExp evaluation scripts (``evel_her2st.py``, ``evel_cscc.py``,
``evel_visium.py``):

- per-gene Pearson correlation over the spots of the held-out section
  (``scipy.stats.pearsonr`` per gene in the published code, vectorised here);
- **PCC-ACG**, the mean correlation over *all considered genes* (the gene panel the
  model predicts; the published variable is called ``hvg_pcc``), genes with a
  constant truth or prediction left out;
- **PCC-HEG**, the mean correlation over the 50 *highly expressed genes*, the genes
  with the highest mean measured expression in the held-out section;
- **MSE** and **MAE** over all spots and genes (``sklearn.metrics`` in the published
  code, which averages the same numbers).

Per-section results are averaged over folds with :func:`summary_table`.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd

__all__ = [
    "gene_pearson",
    "pcc_acg",
    "pcc_heg",
    "mse",
    "mae",
    "summarize",
    "summary_table",
    "fmt",
    "METRIC_COLUMNS",
]

#: Metric columns that :func:`summary_table` summarises by default.
METRIC_COLUMNS = ("pcc_acg", "pcc_heg", "mse", "mae")

_MIN_SPOTS = 3


# --------------------------------------------------------------------------- inputs


def _is_anndata(x) -> bool:
    anndata = sys.modules.get("anndata")
    return anndata is not None and isinstance(x, anndata.AnnData)


def _as_dense(x, name: str) -> np.ndarray:
    """Convert NumPy, torch, scipy.sparse or AnnData (``.X``) to a float64 array."""
    if _is_anndata(x):
        x = x.X
        if x is None:
            raise ValueError(f"`{name}` is an AnnData without `.X`; set `.X` first.")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.layout != torch.strided:
            x = x.to_dense()
        x = x.to(torch.float64).numpy()
    elif hasattr(x, "toarray") and hasattr(x, "nnz"):  # scipy.sparse matrix or array
        x = x.toarray()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric array, got {type(x).__name__}.") from err
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"`{name}` must hold real numbers, got dtype {arr.dtype}; "
            "convert it with np.asarray(..., dtype=float)."
        )
    return arr.astype(np.float64, copy=False)


def _prepare(pred, true, genes=None):
    """Validate a prediction / truth pair; return dense arrays and gene labels."""
    if genes is None:
        ann = [x for x in (true, pred) if _is_anndata(x)]
        if len(ann) == 2 and not ann[0].var_names.equals(ann[1].var_names):
            raise ValueError(
                "`pred` and `true` are AnnData objects with different var_names; "
                "subset both to the same genes in the same order."
            )
        if ann:
            genes = ann[0].var_names
    p = _as_dense(pred, "pred")
    t = _as_dense(true, "true")
    for name, arr in (("pred", p), ("true", t)):
        if arr.ndim != 2:
            raise ValueError(
                f"`{name}` must be 2-D (spots x genes), got shape {arr.shape}; "
                "reshape a single gene with .reshape(-1, 1)."
            )
    if p.shape != t.shape:
        raise ValueError(
            f"`pred` has shape {p.shape} but `true` has shape {t.shape}; "
            "both must be spots x genes for the same spots and genes."
        )
    for name, arr in (("pred", p), ("true", t)):
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ValueError(
                f"`{name}` contains {n_nan} NaN and {n_inf} infinite values; "
                "remove or impute them before computing metrics."
            )
    n_spots, n_genes = t.shape
    if n_spots < _MIN_SPOTS:
        raise ValueError(
            f"at least {_MIN_SPOTS} spots are needed for a Pearson p-value, got {n_spots}."
        )
    if n_genes < 1:
        raise ValueError("`pred` and `true` have no genes (0 columns).")
    if genes is None:
        labels = pd.RangeIndex(n_genes, name="gene")
    else:
        labels = pd.Index(list(genes), name="gene")
        if len(labels) != n_genes:
            raise ValueError(
                f"`genes` has {len(labels)} names but the data have {n_genes} genes; "
                "pass one name per column."
            )
    return p, t, labels


def _check_n(n, n_genes: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {n!r}.")
    if not 1 <= n <= n_genes:
        raise ValueError(
            f"`{name}`={n} must be between 1 and the number of genes ({n_genes}); "
            f"lower `{name}` or pass more genes."
        )
    return int(n)


# --------------------------------------------------------------------------- core


def _pearson_columns(p: np.ndarray, t: np.ndarray):
    """Per-column Pearson r, two-sided p-value and constant flag of two arrays."""
    from scipy import special

    n = t.shape[0]
    constant = (p == p[0]).all(axis=0) | (t == t[0]).all(axis=0)
    pc = p - p.mean(axis=0)
    tc = t - t.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pc = pc / np.linalg.norm(pc, axis=0)
        tc = tc / np.linalg.norm(tc, axis=0)
        r = np.clip(np.einsum("ij,ij->j", pc, tc), -1.0, 1.0)
    r[constant] = np.nan
    # Two-sided p from the t distribution with n - 2 degrees of freedom:
    # P(|T| >= |t|) with t**2 = df r**2 / (1 - r**2) equals I_{1 - r**2}(df / 2, 1 / 2).
    df = n - 2
    pval = special.betainc(df / 2.0, 0.5, (1.0 - r) * (1.0 + r))
    pval[constant] = np.nan
    return r, pval, constant


def _top_mean_genes(t: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` genes with the highest mean, ties toward the lower index."""
    return np.argsort(-t.mean(axis=0), kind="stable")[:n]


def _mean_r(r: np.ndarray, what: str) -> float:
    valid = r[~np.isnan(r)]
    if valid.size == 0:
        warnings.warn(
            f"every gene in {what} is constant in truth or prediction; "
            "its mean Pearson correlation is NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return float("nan")
    return float(valid.mean())


def gene_pearson(pred, true, *, genes=None) -> pd.DataFrame:
    """Pearson correlation between prediction and truth for every gene.

    For each gene (column) the correlation is computed over the spots (rows), as
    ``scipy.stats.pearsonr(pred[:, g], true[:, g])`` does in the published mclSTExp
    ``get_R``; here all genes are computed at once.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``, at least 3 spots.
        NumPy arrays, ``torch.Tensor``, ``scipy.sparse`` matrices or AnnData (its
        ``.X``), converted to dense float64.
    genes
        Gene names, one per column, used as the index. ``None`` uses the
        ``var_names`` of ``true`` (or ``pred``) if it is an AnnData, else gene
        positions ``0 .. n_genes - 1``.

    Returns
    -------
    pandas.DataFrame
        Index ``gene``; columns ``r`` (Pearson correlation), ``p_value`` (two-sided,
        from the t distribution with ``n_spots - 2`` degrees of freedom, as
        ``scipy.stats.pearsonr``) and ``constant`` (bool: the gene is constant in
        ``true`` or in ``pred``; then ``r`` and ``p_value`` are NaN, as scipy returns).

    Raises
    ------
    ValueError
        If the shapes differ or are not 2-D, an input holds NaN or infinite values,
        there are fewer than 3 spots, or ``genes`` has the wrong length.
    """
    p, t, labels = _prepare(pred, true, genes)
    r, pval, constant = _pearson_columns(p, t)
    return pd.DataFrame({"r": r, "p_value": pval, "constant": constant}, index=labels)


def pcc_acg(pred, true) -> float:
    """PCC-ACG: mean per-gene Pearson correlation over all considered genes.

    "All considered genes" is every column given, i.e. the gene panel the model
    predicts. Genes that are constant in ``true`` or in ``pred`` have no correlation
    and are left out of the mean, as the published code drops their NaN values.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``; see
        :func:`gene_pearson` for accepted types.

    Returns
    -------
    float
        Mean Pearson r over the non-constant genes; NaN (with a ``RuntimeWarning``)
        if every gene is constant.
    """
    p, t, _ = _prepare(pred, true)
    r, _, _ = _pearson_columns(p, t)
    return _mean_r(r, "the data")


def pcc_heg(pred, true, *, n: int = 50) -> float:
    """PCC-HEG: mean per-gene Pearson correlation over the highly expressed genes.

    The highly expressed genes are the ``n`` genes with the highest mean expression
    in ``true`` over its spots (the held-out section), as in the published code
    (``np.argsort(mean)[::-1][:50]``). Genes with exactly equal means are taken in
    order of increasing column index (the published order for such ties is not
    defined, as NumPy's default sort is not stable). Genes among them that are constant in ``true``
    or ``pred`` are left out of the mean. The published code averages with
    ``np.mean`` and would return NaN in that case; such genes are rare among highly
    expressed ones.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``; see
        :func:`gene_pearson` for accepted types.
    n
        Number of highly expressed genes, ``1 <= n <= n_genes``; 50 in the paper.

    Returns
    -------
    float
        Mean Pearson r over the non-constant genes among the top ``n``; NaN (with a
        ``RuntimeWarning``) if all of them are constant.
    """
    p, t, _ = _prepare(pred, true)
    n = _check_n(n, t.shape[1], "n")
    top = _top_mean_genes(t, n)
    r, _, _ = _pearson_columns(p[:, top], t[:, top])
    return _mean_r(r, f"the top {n} expressed genes")


def mse(pred, true) -> float:
    """Mean squared error over all spots and genes, ``mean((pred - true)**2)``.

    Equal to ``sklearn.metrics.mean_squared_error(true, pred)`` of the published code.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``; see
        :func:`gene_pearson` for accepted types.

    Returns
    -------
    float
    """
    p, t, _ = _prepare(pred, true)
    return float(np.mean((p - t) ** 2))


def mae(pred, true) -> float:
    """Mean absolute error over all spots and genes, ``mean(|pred - true|)``.

    Equal to ``sklearn.metrics.mean_absolute_error(true, pred)`` of the published code.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``; see
        :func:`gene_pearson` for accepted types.

    Returns
    -------
    float
    """
    p, t, _ = _prepare(pred, true)
    return float(np.mean(np.abs(p - t)))


def summarize(pred, true, *, genes=None, n_heg: int = 50) -> dict:
    """All mclSTExp metrics of one held-out section as a JSON-serialisable dict.

    Parameters
    ----------
    pred, true
        Predicted and measured expression, ``(n_spots, n_genes)``; see
        :func:`gene_pearson` for accepted types.
    genes
        Gene names, one per column (default: ``var_names`` of an AnnData input, else
        column positions). Used for ``heg_genes``.
    n_heg
        Number of highly expressed genes for PCC-HEG, at most ``n_genes``.

    Returns
    -------
    dict
        Plain Python values only:

        ``pcc_acg`` (float)
            :func:`pcc_acg`.
        ``pcc_heg`` (float)
            :func:`pcc_heg` with ``n=n_heg``.
        ``mse``, ``mae`` (float)
            :func:`mse`, :func:`mae`.
        ``n_spots``, ``n_genes`` (int)
            Shape of the data.
        ``n_constant_genes`` (int)
            Genes constant in truth or prediction, excluded from PCC-ACG.
        ``n_heg`` (int)
            Number of highly expressed genes.
        ``n_constant_heg`` (int)
            Of those, the constant ones, excluded from PCC-HEG.
        ``heg_genes`` (list)
            The highly expressed genes, highest mean first: names (str) if gene
            names are known, else column positions (int).

    Raises
    ------
    ValueError
        On the input problems listed in :func:`gene_pearson`, or if ``n_heg`` is
        not in ``[1, n_genes]``.
    """
    p, t, labels = _prepare(pred, true, genes)
    n_spots, n_genes = t.shape
    n_heg = _check_n(n_heg, n_genes, "n_heg")
    r, _, constant = _pearson_columns(p, t)
    top = _top_mean_genes(t, n_heg)
    heg = labels[top]
    if isinstance(labels, pd.RangeIndex):
        heg_genes = [int(g) for g in heg]
    else:
        heg_genes = [g.item() if isinstance(g, np.generic) else g for g in heg]
    return {
        "pcc_acg": _mean_r(r, "the data"),
        "pcc_heg": _mean_r(r[top], f"the top {n_heg} expressed genes"),
        "mse": float(np.mean((p - t) ** 2)),
        "mae": float(np.mean(np.abs(p - t))),
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "n_constant_genes": int(constant.sum()),
        "n_heg": int(n_heg),
        "n_constant_heg": int(constant[top].sum()),
        "heg_genes": heg_genes,
    }


# --------------------------------------------------------------------------- tables


def summary_table(
    per_fold: pd.DataFrame,
    *,
    by=("method", "scheme"),
    metrics=None,
) -> pd.DataFrame:
    """Mean and standard deviation of metrics over folds, one row per group.

    Parameters
    ----------
    per_fold
        One row per fold (held-out section), with the grouping columns ``by`` and
        numeric metric columns, e.g. rows built from :func:`summarize` plus
        ``method``, ``scheme`` and ``fold``.
    by
        Grouping column name or names.
    metrics
        Metric columns to summarise; default: those of :data:`METRIC_COLUMNS`
        (``pcc_acg``, ``pcc_heg``, ``mse``, ``mae``) present in ``per_fold``.

    Returns
    -------
    pandas.DataFrame
        Columns: the ``by`` columns, ``n_folds`` (rows in the group), then for each
        metric ``<metric>_mean`` and ``<metric>_sd``. The sd is the sample standard
        deviation (``ddof=1``; NaN for a single fold). NaN metric values (e.g. a
        PCC with every gene constant) are skipped by both. Groups appear in sorted
        order of the ``by`` columns.

    Raises
    ------
    ValueError
        If a ``by`` or metric column is missing, no metric column is found, or a
        metric column is not numeric.

    Examples
    --------
    >>> import pandas as pd
    >>> from mclstexp_lite.metrics import summary_table, fmt
    >>> folds = pd.DataFrame({"method": ["m"] * 3, "scheme": ["loso"] * 3,
    ...                       "pcc_acg": [0.1, 0.2, 0.3]})
    >>> row = summary_table(folds).iloc[0]
    >>> fmt(row["pcc_acg_mean"], row["pcc_acg_sd"])
    '0.200 ± 0.100'
    """
    if not isinstance(per_fold, pd.DataFrame):
        raise TypeError(
            f"`per_fold` must be a pandas.DataFrame, got {type(per_fold).__name__}; "
            "build one with pd.DataFrame(list_of_summaries)."
        )
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in per_fold.columns]
    if missing:
        raise ValueError(
            f"grouping columns {missing} are not in `per_fold` "
            f"(columns: {list(per_fold.columns)}); pass `by=` with existing columns."
        )
    if metrics is None:
        metrics = [c for c in METRIC_COLUMNS if c in per_fold.columns]
        if not metrics:
            raise ValueError(
                f"`per_fold` has none of the metric columns {list(METRIC_COLUMNS)}; "
                "pass `metrics=` with the columns to summarise."
            )
    else:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        missing = [c for c in metrics if c not in per_fold.columns]
        if missing:
            raise ValueError(f"metric columns {missing} are not in `per_fold`.")
    for c in metrics:
        if not pd.api.types.is_numeric_dtype(per_fold[c]):
            raise ValueError(f"metric column {c!r} is not numeric ({per_fold[c].dtype}).")

    grouped = per_fold.groupby(by, sort=True, dropna=False)
    table = grouped.size().rename("n_folds").to_frame()
    for c in metrics:
        table[f"{c}_mean"] = grouped[c].mean()
        table[f"{c}_sd"] = grouped[c].std(ddof=1)
    return table.reset_index()


def fmt(mean, sd, *, digits: int = 3) -> str:
    """Render a mean and standard deviation as ``"0.123 ± 0.045"``.

    Parameters
    ----------
    mean, sd
        Numbers (NaN is rendered as ``nan``).
    digits
        Decimal places of both numbers.

    Returns
    -------
    str
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"`digits` must be a non-negative integer, got {digits!r}.")
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}"
