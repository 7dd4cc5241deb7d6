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

Per-section results are averaged over folds with :func:`mean_sd_table`;
:func:`paired_bootstrap` gives paired bootstrap confidence intervals of the difference
between two methods on the same held-out sections.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd

from . import _util
from ._progress import progress_bar

__all__ = [
    "gene_pearson",
    "pcc_acg",
    "pcc_heg",
    "mse",
    "mae",
    "section_metrics",
    "paired_bootstrap",
    "mean_sd_table",
    "fmt",
    "METRIC_COLUMNS",
]

#: Metric columns that :func:`mean_sd_table` summarises by default.
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


# Resampled columns whose variance, computed from sums, is at most this fraction of the
# column's largest squared deviation are re-checked exactly (see _pearson_r).
_NEAR_CONSTANT = 1e-6


def _at_mode(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries equal to their column's most frequent value."""
    xs = np.sort(x, axis=0)
    n, k = xs.shape
    rows = np.arange(n)[:, None]
    starts = np.ones((n, k), dtype=bool)
    starts[1:] = xs[1:] != xs[:-1]
    run = rows - np.maximum.accumulate(np.where(starts, rows, 0), axis=0) + 1
    return x == xs[run.argmax(axis=0), np.arange(k)]


def _pearson_r(p: np.ndarray, t: np.ndarray, counts: np.ndarray | None = None):
    """Per-gene Pearson r of the columns of ``p`` and ``t``; NaN for constant genes.

    The one implementation of the per-gene correlation: :func:`gene_pearson` and the
    metrics use it with ``counts=None``, :func:`paired_bootstrap` with resample counts.

    Parameters
    ----------
    p, t
        float64 arrays ``(n_spots, n_genes)``, finite.
    counts
        ``None``: correlate over all spots; returns ``(r, constant)`` of shape
        ``(n_genes,)``. Or ``(n_rep, n_spots)`` non-negative integers, how often each
        spot is drawn in each of ``n_rep`` resamples: the correlation of each resample
        (spot ``i`` repeated ``counts[b, i]`` times); returns arrays ``(n_rep, n_genes)``.

    A gene is constant when all its (drawn) values in ``p`` or in ``t`` are exactly
    equal, as ``scipy.stats.pearsonr`` decides. Both cases use the same formula,
    ``cov / sqrt(var_p * var_t)`` from weighted sums of the columns centred on their
    full-section means (Pearson r does not change with a shift). For resamples, a gene
    whose summed variance is tiny relative to its scale (cancellation could hide an
    exactly constant resample, or make r inaccurate) is tested exactly: constant if
    every drawn spot holds the gene's most frequent value, otherwise recomputed from
    the drawn values directly.
    """
    constant = (p == p[0]).all(axis=0) | (t == t[0]).all(axis=0)
    pc = p - p.mean(axis=0)
    tc = t - t.mean(axis=0)
    if counts is None:
        total = np.array([float(p.shape[0])])

        def wsum(x):
            return x.sum(axis=0)[None, :]
    else:
        w = np.asarray(counts, dtype=np.float64)
        total = w.sum(axis=1)

        def wsum(x):
            return w @ x
    s_p, s_t = wsum(pc), wsum(tc)
    s_pp, s_tt, s_pt = wsum(pc * pc), wsum(tc * tc), wsum(pc * tc)
    m = total[:, None]
    mp, mt = s_p / m, s_t / m
    var_p = s_pp / m - mp * mp
    var_t = s_tt / m - mt * mt
    cov = s_pt / m - mp * mt
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cov / np.sqrt(var_p * var_t), -1.0, 1.0)
    r[:, constant] = np.nan
    if counts is None:
        return r[0], constant
    const_rep = np.zeros(r.shape, dtype=bool)
    const_rep[:, constant] = True
    scale_p = (pc * pc).max(axis=0)
    scale_t = (tc * tc).max(axis=0)
    near = (var_p <= _NEAR_CONSTANT * scale_p) | (var_t <= _NEAR_CONSTANT * scale_t)
    near[:, constant] = False
    if near.any():
        # A resample is exactly constant in a gene when every drawn spot holds the
        # gene's most frequent value (e.g. the zeros of a sparse gene): count the drawn
        # spots off that value. Whatever that leaves open is checked spot by spot.
        cols = np.flatnonzero(near.any(axis=0))
        same = np.zeros((len(total), len(cols)), dtype=bool)
        for x in (p, t):
            off = w @ (~_at_mode(x[:, cols])).astype(np.float64)
            same |= off == 0
        r[:, cols] = np.where(same, np.nan, r[:, cols])
        const_rep[:, cols] |= same
        near[:, cols] &= ~same
    for b in np.flatnonzero(near.any(axis=1)):
        genes = np.flatnonzero(near[b])
        rows = np.flatnonzero(counts[b])
        wb = w[b, rows][:, None]
        pb, tb = p[np.ix_(rows, genes)], t[np.ix_(rows, genes)]
        same = (pb == pb[0]).all(axis=0) | (tb == tb[0]).all(axis=0)
        dp = pb - (wb * pb).sum(axis=0) / total[b]
        dt = tb - (wb * tb).sum(axis=0) / total[b]
        with np.errstate(invalid="ignore", divide="ignore"):
            rb = (wb * dp * dt).sum(axis=0) / np.sqrt(
                (wb * dp * dp).sum(axis=0) * (wb * dt * dt).sum(axis=0))
        r[b, genes] = np.where(same, np.nan, np.clip(rb, -1.0, 1.0))
        const_rep[b, genes] = same
    return r, const_rep


def _pearson_columns(p: np.ndarray, t: np.ndarray):
    """Per-column Pearson r, two-sided p-value and constant flag of two arrays."""
    from scipy import special

    n = t.shape[0]
    r, constant = _pearson_r(p, t)
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


def section_metrics(pred, true, *, genes=None, n_heg: int = 50) -> dict:
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


# --------------------------------------------------------------------------- bootstrap

_UNITS = ("spot", "section")
_BOOT_COLUMNS = ("metric", "a", "b", "diff", "ci_low", "ci_high", "n_boot", "unit",
                 "n_sections")
_CHUNK = 256  # replicates per block of the spot bootstrap (bounds memory)


def _check_sections(pred_a, pred_b, truth) -> list:
    """Section names shared, in the same order, by the three mappings."""
    from collections.abc import Mapping

    for name, x in (("pred_a", pred_a), ("pred_b", pred_b), ("truth", truth)):
        if not isinstance(x, Mapping):
            raise TypeError(
                f"`{name}` must be a mapping {{section: (n_spots, n_genes) array}}, got "
                f"{type(x).__name__}; wrap a single section as {{'s': array}}."
            )
    sections = list(truth)
    if not sections:
        raise ValueError("`truth` has no sections; pass at least one {section: array}.")
    for name, x in (("pred_a", pred_a), ("pred_b", pred_b)):
        keys = list(x)
        if keys == sections:
            continue
        missing = [s for s in sections if s not in x]
        extra = [s for s in keys if s not in truth]
        if missing or extra:
            raise ValueError(
                f"`{name}` and `truth` hold different sections (missing from `{name}`: "
                f"{missing}, not in `truth`: {extra}); pass the same held-out sections "
                "to all three."
            )
        raise ValueError(
            f"`{name}` lists the sections in the order {keys} but `truth` in the order "
            f"{sections}; pass them in the same order (e.g. {{s: {name}[s] for s in truth}})."
        )
    return sections


def _section_arrays(pred_a, pred_b, truth, s):
    """Dense float64 ``(a, b, t)`` of one section, validated as the metrics do."""
    out = []
    for name, pred in (("pred_a", pred_a), ("pred_b", pred_b)):
        try:
            p, t, _ = _prepare(pred[s], truth[s])
        except (TypeError, ValueError) as err:
            raise type(err)(f"section {s!r}, `{name}` vs `truth`: {err}") from err
        out.append(p)
    return out[0], out[1], t


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)):
        raise TypeError(f"`level` must be a number in (0, 1), got {level!r}; e.g. level=0.95.")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(
            f"`level`={level!r} must be strictly between 0 and 1; use e.g. 0.95 for a "
            "95 % interval (not 95)."
        )
    return float(level)


def _resampled_metrics(a, t, top, metrics, counts) -> dict:
    """Each resample's metrics of one section, ``{metric: (n_rep,) array}``.

    ``counts`` ``(n_rep, n_spots)`` says how often each spot is drawn. PCC-ACG, PCC-HEG,
    MSE and MAE follow :func:`section_metrics` applied to the drawn spots (a spot drawn twice
    counts twice); the HEG genes ``top`` stay those of the full section.
    """
    out = {}
    w = np.asarray(counts, dtype=np.float64)
    if "pcc_acg" in metrics or "pcc_heg" in metrics:
        r, _ = _pearson_r(a, t, counts)
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all genes constant -> NaN
            if "pcc_acg" in metrics:
                out["pcc_acg"] = np.nanmean(r, axis=1)
            if "pcc_heg" in metrics:
                out["pcc_heg"] = np.nanmean(r[:, top], axis=1)
    err = a - t
    for name, per_spot in (("mse", lambda: (err * err).mean(axis=1)),
                           ("mae", lambda: np.abs(err).mean(axis=1))):
        if name in metrics:
            out[name] = (w @ per_spot()) / w.sum(axis=1)
    return out


def paired_bootstrap(
    pred_a,
    pred_b,
    truth,
    *,
    n_heg: int = 50,
    unit: str = "spot",
    n_boot: int = 1000,
    level: float = 0.95,
    seed=0,
    metrics=METRIC_COLUMNS,
    progress: bool = False,
) -> pd.DataFrame:
    """Paired bootstrap confidence intervals of a metric difference, method A minus B.

    Both methods predicted the same held-out sections; the metrics are those of
    :func:`section_metrics` (PCC-ACG, PCC-HEG with ``n_heg`` genes, MSE, MAE), and a method's
    score is the mean over sections of its per-section metric, as the results table
    averages held-out sections. Every replicate resamples both methods and the truth
    with the *same* draws (paired), so what the two methods share cancels.

    Parameters
    ----------
    pred_a, pred_b, truth
        Mappings ``{section: (n_spots, n_genes) array}`` (NumPy, ``scipy.sparse``,
        torch or AnnData, as :func:`gene_pearson`), the same sections in the same
        order, each section with the same shape in all three (spots and genes aligned).
    n_heg
        Highly expressed genes of PCC-HEG, chosen per section from the full section's
        truth (the highest mean measured expression) and kept fixed in every replicate.
    unit
        ``"spot"``: each replicate draws, in every section, ``n_spots`` spots with
        replacement (for each replicate, for each section in order,
        ``rng.integers(n_spots, size=n_spots)``), recomputes each section's metrics
        for A and B on the drawn spots, averages over sections and takes A - B.
        Neighbouring spots are correlated (spatial autocorrelation), which this
        ignores, so its intervals are too narrow: read them as the uncertainty from
        these spots, not as generalisation to new tissue. ``"section"``: each
        replicate draws ``n_sections`` sections with replacement
        (``rng.integers(n_sections, size=n_sections)``) and averages the per-section
        differences of the full sections: closer to the question "another section",
        but coarse with few sections (with 7 sections there are few distinct
        resamples, and a single section gives a zero-width interval).
    n_boot
        Bootstrap replicates, at least 1.
    level
        Confidence level of the percentile interval, in (0, 1).
    seed
        Seed of ``numpy.random.default_rng``; the result is deterministic for a seed.
    metrics
        Metrics to report, a subset of ``("pcc_acg", "pcc_heg", "mse", "mae")``.
    progress
        Show a progress bar over sections (spot resampling).

    Returns
    -------
    pandas.DataFrame
        One row per metric, columns ``metric``; ``a``, ``b`` (the method scores: mean
        over sections of the full-section metric); ``diff`` (``a - b``); ``ci_low``,
        ``ci_high`` (the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
        replicate differences, percentile method); ``n_boot`` (replicates with a defined
        difference: ``n_boot`` as requested, fewer only if some resample left a method
        with every gene constant in a section, 0 when the metric is undefined);
        ``unit``; ``n_sections``.

    Notes
    -----
    Genes constant (in truth or prediction) within a resample are skipped for that
    replicate, as the metric skips genes constant in a section. If a correlation
    metric is undefined for a method in some section (every gene constant, e.g. the
    ``"mean"`` baseline, which predicts the same value at every spot), ``a`` or ``b``
    is NaN and so are ``diff`` and the interval: the comparison is not defined there.
    Unlike the results table, which skips NaN sections when averaging, a NaN section
    makes the score NaN here, because the difference would no longer be over the same
    sections. The ``RuntimeWarning`` those NaN values would raise is suppressed.

    Raises
    ------
    TypeError, ValueError
        For inputs that are not mappings, different sections or orders, a section
        whose arrays fail the checks of :func:`gene_pearson` (named in the message),
        ``n_heg`` not in ``[1, n_genes]``, an unknown ``unit`` or metric, ``n_boot``
        below 1, or ``level`` outside (0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> from mclstexp_lite.metrics import paired_bootstrap
    >>> rng = np.random.default_rng(0)
    >>> truth = {s: rng.normal(size=(40, 20)) for s in ("s1", "s2")}
    >>> good = {s: t + 0.5 * rng.normal(size=t.shape) for s, t in truth.items()}
    >>> bad = {s: t + 3.0 * rng.normal(size=t.shape) for s, t in truth.items()}
    >>> res = paired_bootstrap(good, bad, truth, n_heg=5, n_boot=200)
    >>> bool(res.set_index("metric").loc["pcc_acg", "ci_low"] > 0)
    True
    """
    if unit not in _UNITS:
        raise ValueError(f"`unit` must be 'spot' or 'section', got {unit!r}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)):
        raise TypeError(f"`n_boot` must be an integer, got {n_boot!r}; e.g. n_boot=1000.")
    if n_boot < 1:
        raise ValueError(f"`n_boot`={n_boot} must be at least 1; e.g. n_boot=1000.")
    n_boot = int(n_boot)
    level = _check_level(level)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in METRIC_COLUMNS]
    if unknown or not metrics:
        raise ValueError(
            f"`metrics` must be a non-empty subset of {list(METRIC_COLUMNS)}, got "
            f"{metrics!r}."
        )
    metrics = list(dict.fromkeys(metrics))
    sections = _check_sections(pred_a, pred_b, truth)
    n_sec = len(sections)

    data = []
    for s in sections:
        a, b, t = _section_arrays(pred_a, pred_b, truth, s)
        n = _check_n(n_heg, t.shape[1], "n_heg")
        data.append((a, b, t, _top_mean_genes(t, n)))

    # Point estimates: the full-section metrics, exactly as section_metrics computes them.
    full = {k: np.empty((len(metrics), n_sec)) for k in "ab"}
    for j, (a, b, t, _) in enumerate(data):
        for k, pred in (("a", a), ("b", b)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # every gene constant
                res = section_metrics(pred, t, n_heg=n_heg)
            full[k][:, j] = [res[m] for m in metrics]
    score = {k: v.mean(axis=1) for k, v in full.items()}  # NaN if any section is NaN

    rng = np.random.default_rng(seed)
    if unit == "section":
        counts = np.zeros((n_boot, n_sec))
        for i in range(n_boot):
            counts[i] = np.bincount(rng.integers(n_sec, size=n_sec), minlength=n_sec)
        rep = {k: (counts @ v.T) / n_sec for k, v in full.items()}  # (n_boot, metrics)
    else:
        sizes = [d[2].shape[0] for d in data]
        draws = [np.empty((n_boot, n), dtype=np.intp) for n in sizes]
        for i in range(n_boot):
            for j, n in enumerate(sizes):
                draws[j][i] = rng.integers(n, size=n)
        rep = {k: np.zeros((n_boot, len(metrics))) for k in "ab"}
        iterator = range(n_sec)
        if progress:
            iterator = progress_bar(iterator, desc=f"bootstrap ({unit})", unit="section")
        for j in iterator:
            a, b, t, top = data[j]
            n = sizes[j]
            for start in range(0, n_boot, _CHUNK):
                block = draws[j][start:start + _CHUNK]
                offsets = np.arange(len(block))[:, None] * n
                counts = np.bincount((block + offsets).ravel(),
                                     minlength=len(block) * n).reshape(len(block), n)
                for k, pred in (("a", a), ("b", b)):
                    # a method undefined on the full section stays undefined: skip its
                    # correlations instead of recomputing NaN
                    skip = [m for i, m in enumerate(metrics)
                            if m.startswith("pcc") and np.isnan(full[k][i, j])]
                    todo = [m for m in metrics if m not in skip]
                    vals = _resampled_metrics(pred, t, top, todo, counts) if todo else {}
                    for i, m in enumerate(metrics):
                        rep[k][start:start + len(block), i] += (
                            vals[m] if m in vals else np.nan)
        rep = {k: v / n_sec for k, v in rep.items()}

    lo_q, hi_q = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    rows = []
    for i, m in enumerate(metrics):
        diff = score["a"][i] - score["b"][i]
        d = rep["a"][:, i] - rep["b"][:, i]
        d = d[np.isfinite(d)]
        if np.isnan(diff) or d.size == 0:
            lo = hi = float("nan")
            used = 0 if np.isnan(diff) else int(d.size)
        else:
            lo, hi = (float(x) for x in np.quantile(d, [lo_q, hi_q]))
            used = int(d.size)
        rows.append({"metric": m, "a": float(score["a"][i]), "b": float(score["b"][i]),
                     "diff": float(diff), "ci_low": lo, "ci_high": hi, "n_boot": used,
                     "unit": unit, "n_sections": n_sec})
    return pd.DataFrame(rows, columns=list(_BOOT_COLUMNS))


# --------------------------------------------------------------------------- tables


def mean_sd_table(
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
        numeric metric columns, e.g. rows built from :func:`section_metrics` plus
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
    >>> from mclstexp_lite.metrics import mean_sd_table, fmt
    >>> folds = pd.DataFrame({"method": ["m"] * 3, "scheme": ["loso"] * 3,
    ...                       "pcc_acg": [0.1, 0.2, 0.3]})
    >>> row = mean_sd_table(folds).iloc[0]
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
        Numbers. A NaN ``sd`` (one value has no sample sd) renders the mean alone,
        ``"0.123"``: "±" only where an sd exists. A NaN mean is rendered as ``nan``.
    digits
        Decimal places of both numbers.

    Returns
    -------
    str
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 0:
        raise ValueError(f"`digits` must be a non-negative integer, got {digits!r}.")
    if sd is None or not np.isfinite(float(sd)):
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}"


# ====================================================================== deprecated
#: Former name (warn once, then call the new function), kept because the tutorials used
#: it: ``summarize`` was one section's metrics.
summarize = _util.deprecated_alias(section_metrics, "metrics.summarize",
                                   "metrics.section_metrics")
