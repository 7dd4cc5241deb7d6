"""Normalisation and gene panels.

Two normalisations are offered (``docs/preprocessing.md`` compares them):

- ``"library_size"`` (default): every spot is scaled to the same total count, then
  ``log1p`` (natural log). This is the standard single-cell / spatial recipe
  (``sc.pp.normalize_total`` followed by ``sc.pp.log1p``).
- ``"published"``: what the published mclSTExp preprocessing computes. It hands a
  GENES x SPOTS matrix to ``scprep.normalize.library_size_normalize`` with scprep's
  defaults, so every *gene* (not every spot) is scaled to a total of 10,000 over the
  section's spots, then ``scprep.transform.log`` (``log10(x + 1)``).

Gene panels:

- :func:`published_panel` - the 785-gene HER2+ and 171-gene cSCC panels published with
  the mclSTExp code (checksum-verified, converted once to a plain text file);
- :func:`select_panel` - our recipe: highly variable genes per section, combined;
- :func:`save_panel`, :func:`load_panel`, :func:`compare_panels`;
- :func:`subset_genes` - restrict and reorder ``var`` to a panel (matching Ensembl ids
  with or without version suffixes, and other gene names: ``var`` columns or an
  ``id_map`` read by :func:`read_gene_map`);
- :func:`prepare` - subset and normalise in the order each method implies.

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

import copy as copy_module
import logging
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import download as dl

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
#: ``adata.uns`` key listing genes that :func:`subset_genes` filled with zeros.
MISSING_KEY = "mclstexp_missing_genes"
#: ``adata.uns`` key written by :func:`prepare`.
PREPARE_KEY = "mclstexp_prepare"
#: ``adata.var`` column flagging zero-filled genes.
ZERO_FILLED_COLUMN = "mclstexp_zero_filled"
NORMALIZE_METHODS = ("library_size", "published")
#: Panels published with the mclSTExp code (manifest dataset ``mclstexp_panels``).
PANEL_DATASETS = ("her2st", "cscc")
#: ``rescale`` default of ``scprep.normalize.library_size_normalize`` (scprep 1.2.3),
#: which the published preprocessing relies on.
PUBLISHED_RESCALE = 10_000.0
_HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3")
_MISSING_MODES = ("error", "zero")
_PANEL_MANIFEST = "mclstexp_panels"


# ------------------------------------------------------------------------ helpers
def _check_anndata(adata, name: str = "adata"):
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"`{name}` must be an anndata.AnnData, got {type(adata).__name__}. "
                        "Load a section with mclstexp_lite.datasets first.")


def _section_name(adata) -> str:
    """A readable name for error messages: obs['section'], else uns['mclstexp']['section']."""
    if "section" in adata.obs.columns:
        names = [str(s) for s in dict.fromkeys(adata.obs["section"].astype(str))]
        if names:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    meta = adata.uns.get("mclstexp", {})
    if isinstance(meta, Mapping) and meta.get("section"):
        return str(meta["section"])
    return "<unnamed section>"


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
    _check_anndata(adata)
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, NORMALIZE_METHODS))}, "
                         f"got {method!r}")
    _check_target_sum(target_sum)
    if not isinstance(log, (bool, np.bool_)):
        raise TypeError(f"log must be True or False, got {log!r}")
    section = _section_name(adata)
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


# ------------------------------------------------------------------ panel files
def _check_gene_list(genes, name: str = "genes", *, allow_empty: bool = False) -> list[str]:
    """Validate a gene list: not a bare string, all non-empty str, no duplicates."""
    if isinstance(genes, (str, bytes)):
        raise TypeError(f"`{name}` must be a list of gene names, got a single string "
                        f"{genes!r}; wrap it in a list.")
    if not isinstance(genes, Iterable):
        raise TypeError(f"`{name}` must be a list of gene names, got {type(genes).__name__}")
    out = list(genes)
    bad = [g for g in out if not isinstance(g, (str, np.str_))]
    if bad:
        raise TypeError(f"`{name}` must hold strings; found {len(bad)} other value(s), e.g. "
                        f"{bad[:3]!r}")
    out = [str(g) for g in out]
    if not out and not allow_empty:
        raise ValueError(f"`{name}` is empty; a gene panel needs at least one gene.")
    empty = [g for g in out if not g.strip()]
    if empty:
        raise ValueError(f"`{name}` holds {len(empty)} empty or blank gene name(s).")
    seen: set[str] = set()
    dups = [g for g in out if g in seen or seen.add(g)]
    if dups:
        raise ValueError(f"`{name}` holds {len(dups)} duplicated gene name(s), e.g. "
                         f"{sorted(set(dups))[:5]}; a panel must list each gene once.")
    return out


def save_panel(genes: Sequence[str], path: str | os.PathLike, *,
               provenance: str | Sequence[str] | None = None) -> Path:
    """Write a gene panel as text, one gene per line, atomically.

    Parameters
    ----------
    genes
        Gene names in the order the model should use them (unique, non-empty).
    path
        Destination file; its folder is created. The text goes to a temporary file in
        the same folder that is renamed into place, so a crash never leaves a
        half-written panel.
    provenance
        Where the panel comes from (one string or several lines). Written as ``# ``
        comment lines before the genes, together with the gene count.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    genes = _check_gene_list(genes)
    bad = [g for g in genes if g.startswith("#") or g != g.strip() or "\n" in g or "\r" in g]
    if bad:
        raise ValueError(f"gene names must not start with '#' nor contain line breaks or "
                         f"surrounding spaces; offending: {bad[:5]!r}")
    if provenance is None:
        provenance = ["gene panel written by mclstexp_lite.pp.save_panel"]
    elif isinstance(provenance, str):
        provenance = provenance.splitlines() or [""]
    header = [f"# {line}".rstrip() for line in provenance] + [f"# n_genes: {len(genes)}"]
    path = Path(path)
    dl.atomic_write_text(path, "\n".join(header + genes) + "\n")
    return path


def _read_panel(path: Path) -> tuple[list[str], list[str]]:
    """Return (genes, header lines without '# ') of a panel text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"gene panel file {path} not found") from None
    header = [ln[1:].strip() for ln in lines if ln.startswith("#")]
    genes = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return genes, header


def load_panel(path: str | os.PathLike) -> list[str]:
    """Read a gene panel written by :func:`save_panel` (or any one-gene-per-line file).

    Lines starting with ``#`` and blank lines are skipped; surrounding spaces are
    stripped. If the header records ``n_genes``, the count is checked.

    Returns
    -------
    list of str
        The genes in file order.
    """
    path = Path(path)
    genes, header = _read_panel(path)
    if not genes:
        raise ValueError(f"{path}: no gene names found (only comments or blank lines)")
    try:
        genes = _check_gene_list(genes, name=str(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for h in header:
        if h.startswith("n_genes:"):
            n = int(h.split(":", 1)[1])
            if n != len(genes):
                raise ValueError(f"{path}: header says {n} genes but the file lists "
                                 f"{len(genes)}; the file was truncated or edited. "
                                 "Rewrite it with save_panel.")
    return genes


# --------------------------------------------------------------- published panel
def published_panel(dataset: str = "her2st", *,
                    data_dir: str | os.PathLike | None = None) -> list[str]:
    """The gene panel published with the mclSTExp code.

    Parameters
    ----------
    dataset
        ``"her2st"`` (785 genes, ``data/her_hvg_cut_1000.npy``) or ``"cscc"`` (171 genes,
        ``data/skin_hvg_cut_1000.npy``).
    data_dir
        Data root (see :func:`mclstexp_lite.download.data_dir`).

    Returns
    -------
    list of str
        The genes in the published order (the order of the model's output columns in
        the published code).

    Notes
    -----
    The upstream files are NumPy ``.npy`` arrays, the cSCC one an object array, whose
    loading needs ``allow_pickle=True`` and so can run code. The ``.npy`` is therefore
    loaded only after :func:`mclstexp_lite.download.fetch` verified its sha256 against
    the manifest, only once: the list is written to
    ``<cache>/panels/<dataset>_<file>.txt`` with the ``.npy``'s sha256 in its header,
    and later calls read that text file after checking that the sha256 still matches.
    """
    if dataset not in PANEL_DATASETS:
        raise ValueError(f"unknown panel dataset {dataset!r}; valid: {', '.join(PANEL_DATASETS)}")
    rows = dl.rows(_PANEL_MANIFEST, dataset, kind="gene_panel")
    if len(rows) != 1:
        raise ValueError(f"the manifest has {len(rows)} gene_panel rows for {dataset!r}; "
                         "expected exactly one. Rebuild data_manifest.csv.")
    row = rows[0]
    if not row.sha256:
        raise ValueError(f"the manifest row {row.path} has no sha256; refusing to unpickle "
                         "an unverified file. Add its sha256 to data_manifest.csv.")
    npy = dl.fetch([row], data_dir=data_dir)[row.path]
    digest = dl.verify(npy, row)  # fetch verified it; this returns the cached sha256
    if digest != row.sha256:  # pragma: no cover - verify raises first
        raise dl.ChecksumError(f"{npy}: sha256 {digest} != manifest {row.sha256}")

    txt = dl.cache_dir() / "panels" / f"{dataset}_{Path(row.path).stem}.txt"
    if txt.is_file():
        genes, header = _read_panel(txt)
        if f"sha256: {digest}" in header:
            return load_panel(txt)
        logger.info("%s does not match %s (sha256 %s); converting again", txt, npy, digest)

    try:
        arr = np.load(npy, allow_pickle=False)
    except ValueError:  # object array: needs pickle; the checksum was verified above
        arr = np.load(npy, allow_pickle=True)
    arr = np.asarray(arr)
    if arr.ndim != 1:
        raise ValueError(f"{npy}: expected a 1-D array of gene names, got shape {arr.shape}")
    genes = _check_gene_list(arr.tolist(), name=str(npy))
    save_panel(genes, txt, provenance=[
        f"mclSTExp published gene panel ({dataset}), converted from {row.path}",
        f"source: {row.source}",
        f"url: {row.url}",
        f"sha256: {digest}",
    ])
    return genes


# ------------------------------------------------------------------ select_panel
def _as_named_list(adatas) -> list[tuple[str, object]]:
    import anndata as ad

    if isinstance(adatas, ad.AnnData):
        raise TypeError("`adatas` must be a dict {section: AnnData} or a list of AnnData, "
                        "got a single AnnData; wrap it in a list.")
    if isinstance(adatas, Mapping):
        items = [(str(k), v) for k, v in adatas.items()]
    elif isinstance(adatas, (list, tuple)):
        items = [(None, v) for v in adatas]
    else:
        raise TypeError("`adatas` must be a dict {section: AnnData} or a list of AnnData, got "
                        f"{type(adatas).__name__}")
    if not items:
        raise ValueError("`adatas` is empty; pass at least one section.")
    out = []
    for i, (name, a) in enumerate(items):
        _check_anndata(a, name=f"adatas[{name!r}]" if name is not None else f"adatas[{i}]")
        out.append((name if name is not None else _section_name(a), a))
    return out


def _raw_counts(adata):
    """Raw counts of a section: layers['counts'] when X was normalised, else X."""
    if NORMALIZE_KEY in adata.uns:
        if "counts" not in adata.layers:
            raise ValueError(f"section {_section_name(adata)} is normalised but has no "
                             "layers['counts']; reload it to get the raw counts.")
        return adata.layers["counts"]
    return adata.X


def select_panel(adatas, *, n_top_genes: int = 1000, how: str = "union",
                 min_sections: int | None = None, flavor: str = "seurat",
                 min_spots: int | None = None) -> list[str]:
    """Build a gene panel from highly variable genes of several sections.

    This is the recipe the published code's HVG script follows: keep the genes present
    in every section; in each section normalise per spot (library size, ``log1p``) and
    take the ``n_top_genes`` highly variable genes; combine the per-section lists.

    Parameters
    ----------
    adatas
        ``{section: AnnData}`` or a list of AnnData with raw counts (in ``X``, or in
        ``layers['counts']`` for sections already normalised). Not modified.
    n_top_genes
        Highly variable genes taken per section
        (``sc.pp.highly_variable_genes(..., n_top_genes=n_top_genes)``).
    how
        ``"union"`` (genes highly variable in at least one section) or
        ``"intersection"`` (in every section).
    min_sections
        Genes highly variable in at least this many sections; when given it replaces
        ``how`` (1 is the union, the number of sections the intersection).
    flavor
        scanpy HVG flavour: ``"seurat"`` (default, scanpy's default, on log-normalised
        values), ``"cell_ranger"`` (log-normalised) or ``"seurat_v3"`` (raw counts;
        needs the ``scikit-misc`` package).
    min_spots
        If given, drop from the result the genes detected (count > 0) in fewer than
        ``min_spots`` spots summed over all sections. Every gene of the published HER2+
        panel is detected in more than 1,000 spots of the 32 paper sections, which
        suggests such a cut (``docs/preprocessing.md``).

    Returns
    -------
    list of str
        The panel, sorted alphabetically (deterministic for the same input).

    Notes
    -----
    Spots without any count among the shared genes are left out of a section's HVG
    computation (they cannot be normalised per spot).
    """
    import anndata as ad
    import scanpy as sc
    from scipy import sparse

    items = _as_named_list(adatas)
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, numbers.Integral) \
            or n_top_genes < 1:
        raise ValueError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    if how not in ("union", "intersection"):
        raise ValueError(f"how must be 'union' or 'intersection', got {how!r}")
    n_sec = len(items)
    if min_sections is not None:
        if isinstance(min_sections, bool) or not isinstance(min_sections, numbers.Integral) \
                or not 1 <= min_sections <= n_sec:
            raise ValueError(f"min_sections must be an integer from 1 to the number of "
                             f"sections ({n_sec}), got {min_sections!r}")
        need = int(min_sections)
    else:
        need = 1 if how == "union" else n_sec
    if min_spots is not None and (isinstance(min_spots, bool)
                                  or not isinstance(min_spots, numbers.Integral)
                                  or min_spots < 1):
        raise ValueError(f"min_spots must be a positive integer or None, got {min_spots!r}")
    if flavor not in _HVG_FLAVORS:
        raise ValueError(f"flavor must be one of {', '.join(map(repr, _HVG_FLAVORS))}, "
                         f"got {flavor!r}")
    if flavor == "seurat_v3":
        try:
            import skmisc  # noqa: F401
        except ImportError:
            raise ImportError("flavor='seurat_v3' needs the scikit-misc package "
                              "(pip install scikit-misc); or use flavor='seurat'.") from None

    first = items[0][1].var_names
    common = set(first)
    for _, a in items[1:]:
        common &= set(a.var_names)
    shared = [g for g in first if g in common]
    if not shared:
        raise ValueError("the sections share no gene names; check that they come from the "
                         "same organism and gene naming.")
    if n_top_genes > len(shared):
        raise ValueError(f"n_top_genes={n_top_genes} exceeds the {len(shared)} genes shared by "
                         "all sections; choose a smaller n_top_genes.")

    votes = dict.fromkeys(shared, 0)
    detected = np.zeros(len(shared), dtype=np.int64)
    for name, a in items:
        if not a.var_names.is_unique:
            raise ValueError(f"section {name}: var_names are not unique; run "
                             "adata.var_names_make_unique() first.")
        idx = a.var_names.get_indexer(shared)
        counts = _raw_counts(a)
        counts = counts[:, idx] if sparse.issparse(counts) else np.asarray(counts)[:, idx]
        tmp = ad.AnnData(X=sparse.csr_matrix(counts, dtype=np.float64)
                         if sparse.issparse(counts) else np.array(counts, dtype=np.float64))
        tmp.var_names = shared
        tmp.obs_names = [str(i) for i in range(tmp.n_obs)]
        tmp.obs["section"] = name
        detected += np.asarray((tmp.X > 0).sum(axis=0)).ravel()
        totals = np.asarray(tmp.X.sum(axis=1)).ravel()
        if (totals == 0).any():
            logger.info("section %s: leaving out %d spot(s) with no counts among the shared "
                        "genes", name, int((totals == 0).sum()))
            tmp = tmp[totals > 0].copy()
        if tmp.n_obs < 2:
            raise ValueError(f"section {name}: fewer than two spots with counts; cannot rank "
                             "genes by variability.")
        if flavor != "seurat_v3":
            normalize(tmp, method="library_size", log=True)
        sc.pp.highly_variable_genes(tmp, n_top_genes=int(n_top_genes), flavor=flavor)
        hvg = tmp.var_names[tmp.var["highly_variable"].to_numpy(bool)]
        for g in hvg:
            votes[g] += 1
        logger.debug("section %s: %d highly variable genes", name, len(hvg))
    keep = {g for g, v in votes.items() if v >= need}
    if min_spots is not None:
        keep &= {g for g, n in zip(shared, detected) if n >= min_spots}
    if not keep:
        logger.warning("select_panel: no gene meets the rule (n_top_genes=%d, %s) in these %d "
                       "sections; the panel is empty. Try how='union', a smaller min_sections "
                       "or a larger n_top_genes.", n_top_genes,
                       f"min_sections={need}", n_sec)
    return sorted(keep)


def compare_panels(a: Sequence[str], b: Sequence[str]) -> dict:
    """Compare two gene panels.

    Parameters
    ----------
    a, b
        Gene lists (each without duplicates).

    Returns
    -------
    dict
        ``n_a``, ``n_b`` (sizes), ``n_overlap``, ``n_union``, ``jaccard``
        (overlap / union), ``frac_a_in_b`` (overlap / n_a), ``frac_b_in_a``
        (overlap / n_b), ``only_a`` and ``only_b`` (sorted lists of the genes in one
        panel only). A ratio whose denominator is 0 (an empty panel) is NaN.
    """
    a = _check_gene_list(a, name="a", allow_empty=True)
    b = _check_gene_list(b, name="b", allow_empty=True)
    sa, sb = set(a), set(b)
    inter, union = sa & sb, sa | sb

    def ratio(num: int, den: int) -> float:
        return num / den if den else float("nan")

    return {
        "n_a": len(sa),
        "n_b": len(sb),
        "n_overlap": len(inter),
        "n_union": len(union),
        "jaccard": ratio(len(inter), len(union)),
        "frac_a_in_b": ratio(len(inter), len(sa)),
        "frac_b_in_a": ratio(len(inter), len(sb)),
        "only_a": sorted(sa - sb),
        "only_b": sorted(sb - sa),
    }


# ------------------------------------------------------------------ subset_genes
def _take_columns(M, src: np.ndarray, n_vars: int):
    """Columns ``src`` of M, where src == n_vars selects an all-zero column."""
    from scipy import sparse

    if sparse.issparse(M):
        ext = sparse.hstack([sparse.csr_matrix(M), sparse.csr_matrix((M.shape[0], 1),
                                                                     dtype=M.dtype)],
                            format="csr")
        return ext[:, src]
    arr = np.asarray(M)
    ext = np.hstack([arr, np.zeros((arr.shape[0], 1), dtype=arr.dtype)])
    return ext[:, src]


#: An Ensembl gene or transcript id with a version suffix, e.g. ``ENSMUSG00000090223.1``.
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GT]\d+)\.\d+$")
_ENSEMBL = re.compile(r"^ENS[A-Z]*[GT]\d+(\.\d+)?$")


def _unversioned(name: str) -> str:
    m = _ENSEMBL_VERSION.match(name)
    return m.group(1) if m else name


def _naming(names: Sequence[str]) -> str:
    names = list(names)
    ens = sum(bool(_ENSEMBL.match(str(n))) for n in names)
    if ens > len(names) / 2:
        versioned = sum(bool(_ENSEMBL_VERSION.match(str(n))) for n in names)
        return "Ensembl ids" + (" with version suffixes" if versioned > len(names) / 2 else "")
    return "gene symbols"


#: ``adata.var`` columns holding another name of each gene (Space Ranger's ``gene_ids``,
#: ``from_files(gene_map=...)``'s ``gene_symbols``, CELLxGENE's ``feature_name``, ...).
#: :func:`subset_genes` matches panel genes that are not ``var_names`` against them.
GENE_NAME_COLUMNS = ("gene_ids", "gene_id", "gene_symbols", "gene_symbol", "symbol",
                     "gene_name", "gene_names", "feature_name", "feature_id", "ensembl_id")
#: ``adata.uns`` key where :func:`subset_genes` records genes matched through another name.
GENE_MAP_KEY = "mclstexp_gene_map"
#: First-row cells that mark a header row of a gene map table.
_MAP_HEADERS = {"id", "ids", "gene", "genes", "geneid", "gene_id", "gene_ids", "gene id",
                "ensembl", "ensembl_id", "ensembl_gene_id", "feature_id", "symbol",
                "symbols", "gene_symbol", "gene_symbols", "gene symbol", "gene_name",
                "gene_names", "gene name", "name", "feature_name", "hgnc_symbol",
                "external_gene_name"}


def read_gene_map(source, *, what: str = "gene map") -> dict[str, str]:
    """Read a table mapping gene ids to symbols, checking that each id has one symbol.

    Parameters
    ----------
    source
        A file (tab-separated; a ``.csv``/``.csv.gz`` name means commas; gzip allowed)
        whose first column holds the ids and second the symbols, with or without a header
        row; further columns are ignored, so a 10x ``features.tsv.gz`` works as it is. Or
        a mapping ``{id: symbol}``, or a pandas DataFrame (first two columns).
    what
        How the argument is called in error messages (e.g. ``"gene_map"``).

    Returns
    -------
    dict
        ``{id: symbol}``, surrounding spaces stripped; identical repeated rows count once.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file: it is missing, has fewer than two columns, has empty cells, or
        maps one id to several symbols (delete the wrong rows). Several ids with one
        symbol are allowed here; :func:`subset_genes` says how it resolves them.
    """
    import pandas as pd

    name = what
    if isinstance(source, Mapping):
        pairs = pd.DataFrame({"id": list(source.keys()), "symbol": list(source.values())})
        lines = None
    elif isinstance(source, pd.DataFrame):
        if source.shape[1] < 2:
            raise ValueError(f"{what}: the DataFrame needs two columns (id, then symbol), "
                             f"found {list(source.columns)}.")
        pairs = source.iloc[:, :2].copy()
        pairs.columns = ["id", "symbol"]
        lines = None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"{path} (the `{what}` table)"
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}; check the path.")
        as_csv = str(path).endswith((".csv", ".csv.gz"))
        try:
            raw = pd.read_csv(path, sep="," if as_csv else "\t", header=None, dtype=str,
                              keep_default_na=False, na_values=[""])
        except Exception as exc:  # pandas raises many kinds; give them context
            raise ValueError(f"cannot read {name}: {type(exc).__name__}: {exc}") from exc
        if raw.shape[1] < 2:
            first = str(raw.iloc[0, 0]) if raw.size else ""
            sep = (" Its rows hold commas: rename it to .csv." if "," in first and not as_csv
                   else "")
            raise ValueError(f"{name}: a gene map needs two columns, the id then the symbol "
                             f"(separated by {'commas' if as_csv else 'tabs'}), found "
                             f"{raw.shape[1]}.{sep}")
        lines = np.arange(1, len(raw) + 1)
        head = [str(v).strip().lower() for v in raw.iloc[0, :2]] if len(raw) else []
        if head and (head[0] in _MAP_HEADERS or head[1] in _MAP_HEADERS):
            raw, lines = raw.iloc[1:], lines[1:]
        pairs = raw.iloc[:, :2].copy()
        pairs.columns = ["id", "symbol"]
    else:
        raise TypeError(f"{what} must be a file path, a mapping {{id: symbol}} or a pandas "
                        f"DataFrame, got {type(source).__name__}.")
    if len(pairs) == 0:
        raise ValueError(f"{name}: the gene map is empty; it needs rows of id and symbol.")
    blank = pairs.isna().any(axis=1).to_numpy() | np.array(
        [not str(a).strip() or not str(b).strip() for a, b in pairs.to_numpy()])
    if blank.any():
        where = (f"line(s) {[int(n) for n in lines[blank][:5]]}" if lines is not None
                 else f"id(s) {list(pairs['id'][blank][:5])}")
        raise ValueError(f"{name}: {int(blank.sum())} row(s) with an empty id or symbol, "
                         f"{where}. Fill them in or delete them.")
    pairs = pairs.astype(str).apply(lambda c: c.str.strip())
    per_id = pairs.drop_duplicates().groupby("id", sort=False)["symbol"].agg(list)
    clash = per_id[per_id.map(len) > 1]
    if len(clash):
        eg = "; ".join(f"{i} -> {', '.join(s)}" for i, s in clash.head(3).items())
        raise ValueError(f"{name}: {len(clash)} id(s) map to more than one symbol, e.g. {eg}. "
                         "An id must have one symbol: delete the wrong rows.")
    return {i: s[0] for i, s in per_id.items()}


def _gene_aliases(adata, id_map, section: str) -> tuple[list[set[str]], list[str]]:
    """Other names of every var (unversioned), from GENE_NAME_COLUMNS and ``id_map``.

    Returns the alias sets (one per var) and where they came from.
    """
    import pandas as pd

    aliases: list[set[str]] = [set() for _ in range(adata.n_vars)]
    sources = []
    for col in GENE_NAME_COLUMNS:
        if col in adata.var.columns:
            values = adata.var[col]
            if not (pd.api.types.is_string_dtype(values)
                    or isinstance(values.dtype, pd.CategoricalDtype)):
                continue
            sources.append(f"var['{col}']")
            for s, v in zip(aliases, values):
                if isinstance(v, str) and v.strip():
                    s.add(_unversioned(v.strip()))
    if id_map is not None:
        label = (f"id_map {id_map}" if isinstance(id_map, (str, os.PathLike)) else "id_map")
        mapping = read_gene_map(id_map, what="id_map")
        forward = {_unversioned(k): v for k, v in mapping.items()}
        inverse: dict[str, set[str]] = {}
        for k, v in mapping.items():
            inverse.setdefault(v, set()).add(_unversioned(k))
        names = [_unversioned(str(n)) for n in adata.var_names]
        hits = 0
        for s, n in zip(aliases, names):
            if n in forward:
                s.add(forward[n])
                hits += 1
            if n in inverse:
                s.update(inverse[n])
                hits += 1
        if hits == 0:
            raise ValueError(
                f"section {section}: no gene of the section is in either column of {label} "
                f"(section genes e.g. {list(map(str, adata.var_names[:3]))}, table ids e.g. "
                f"{list(mapping)[:3]}). The table must list the section's gene names; is it "
                "for another organism or annotation?")
        sources.append(label)
    return aliases, sources


def _match_aliases(adata, genes: list[str], src: np.ndarray, aliases) -> dict:
    """Fill ``src`` for panel genes found among the aliases; returns {gene: [kept, others]}
    for panel genes that several of the section's genes map to."""
    index: dict[str, list[int]] = {}
    for i, s in enumerate(aliases):
        for a in s:
            index.setdefault(a, []).append(i)
    ambiguous = {}
    for j, g in enumerate(genes):
        if src[j] >= 0:
            continue
        hit = sorted(set(index.get(_unversioned(g), [])))
        if len(hit) == 1:
            src[j] = hit[0]
        elif len(hit) > 1:
            totals = np.asarray(adata.X[:, hit].sum(axis=0)).ravel()
            order = np.argsort(-totals, kind="stable")
            src[j] = hit[order[0]]
            ambiguous[g] = [(str(adata.var_names[hit[k]]), float(totals[k])) for k in order]
    return ambiguous


def subset_genes(adata, genes: Sequence[str], *, missing: str = "error", copy: bool = True,
                 id_map=None):
    """Restrict ``var`` to a gene panel, in the panel's order.

    A panel gene matches a ``var_name`` exactly or, for Ensembl ids, regardless of a
    version suffix (``ENSG00000141736`` matches ``ENSG00000141736.14`` and the other way
    round, when that is unambiguous); the result is named as the panel. A panel gene
    still unmatched is looked up among the genes' other names: the ``var`` columns of
    :data:`GENE_NAME_COLUMNS` (e.g. ``gene_ids`` from :func:`~mclstexp_lite.datasets.visium`,
    ``gene_symbols`` from ``datasets.from_files(gene_map=...)``) and ``id_map``, so a
    panel of symbols selects from a section named by Ensembl ids and the other way round.

    Parameters
    ----------
    adata
        A section, raw or normalised; ``X`` and every layer are subset alike.
    genes
        The panel (unique names), e.g. :func:`published_panel` or :func:`select_panel`.
    missing
        What to do with panel genes absent from ``adata.var_names``: ``"error"``
        (default) raises; ``"zero"`` adds them as all-zero columns (in ``X`` and every
        layer), logs a warning, lists them in ``uns['mclstexp_missing_genes']`` and
        flags them in ``var['mclstexp_zero_filled']``.
    copy
        Return a new AnnData (default). ``False`` modifies ``adata`` in place and
        returns ``None``.
    id_map
        Optional ids -> symbols table: a file (first column the id, second the symbol,
        header optional; a 10x ``features.tsv.gz`` works), a mapping or a DataFrame; read
        with :func:`read_gene_map`, which refuses an id with several symbols. Used in
        both directions (section ids with a symbol panel, or section symbols with an id
        panel).

    Returns
    -------
    anndata.AnnData or None
        ``n_vars == len(genes)`` and ``var_names == genes``. When genes were matched
        through other names, ``uns['mclstexp_gene_map']`` records ``sources``,
        ``n_matched`` and ``ambiguous``: for a panel gene that several of the section's
        genes carry (one symbol, several ids), the one with the largest total in ``X``
        is kept, the others are listed after it, and a warning names them.

    Notes
    -----
    When genes are zero-filled, ``varm`` and ``varp`` (per-gene matrices) are dropped,
    as they have no values for the added genes.
    """
    import anndata as ad
    from scipy import sparse

    _check_anndata(adata)
    if missing not in _MISSING_MODES:
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    genes = _check_gene_list(genes)
    if not adata.var_names.is_unique:
        raise ValueError(f"section {_section_name(adata)}: var_names are not unique; run "
                         "adata.var_names_make_unique() first.")
    src = adata.var_names.get_indexer(genes)
    renamed = False
    if (src < 0).any():  # Ensembl ids with / without version suffixes
        stripped: dict = {}
        for i, name in enumerate(adata.var_names):
            stripped.setdefault(_unversioned(str(name)), []).append(i)
        for j, g in enumerate(genes):
            if src[j] < 0:
                hit = stripped.get(_unversioned(g), [])
                if len(hit) == 1:
                    src[j] = hit[0]
                    renamed = True
    section = _section_name(adata)
    mapped = None
    if (src < 0).any() or id_map is not None:  # other names: var columns, id_map
        aliases, sources = _gene_aliases(adata, id_map, section)
        before = int((src >= 0).sum())
        ambiguous = _match_aliases(adata, genes, src, aliases)
        if int((src >= 0).sum()) > before:
            renamed = True
            mapped = {"sources": sources, "n_matched": int((src >= 0).sum()) - before,
                      "ambiguous": {g: [n for n, _ in v] for g, v in ambiguous.items()}}
        if ambiguous:
            eg = "; ".join(f"{g} <- " + ", ".join(f"{n} ({t:g})" for n, t in v)
                           for g, v in list(ambiguous.items())[:3])
            warnings.warn(
                f"section {section}: {len(ambiguous)} panel gene(s) are the other name of "
                f"several of the section's genes ({' and '.join(sources)}), e.g. {eg} "
                "(total in X in brackets). Kept the one with the largest total, the first "
                "listed; the choices are in uns['mclstexp_gene_map']['ambiguous']. To choose "
                "otherwise, pass id_map= with one id per symbol.", UserWarning, stacklevel=2)
    absent = [g for g, i in zip(genes, src) if i < 0]
    if absent and len(absent) == len(genes):
        raise ValueError(
            f"section {section}: none of the {len(genes)} panel genes is in adata.var_names. "
            f"The panel uses {_naming(genes)} (e.g. {list(genes[:3])}), the section "
            f"{_naming(adata.var_names[:200])} (e.g. {list(map(str, adata.var_names[:3]))}): "
            "the naming differs. Pass id_map= a table of ids and symbols (e.g. the 10x "
            "features.tsv.gz), or build a panel in the section's naming (pp.select_panel)."
            + (f" The other names in {' and '.join(sources)} did not match either."
               if mapped is None and (src < 0).all() and sources else ""))
    if absent and missing == "error":
        raise ValueError(
            f"section {section}: {len(absent)} of the {len(genes)} panel genes are not in "
            f"adata.var_names, e.g. {absent[:10]}. Pass missing='zero' to add them as "
            "all-zero columns, or build the panel from the sections you loaded "
            "(pp.select_panel) so that every gene is present.")

    if not absent:
        if copy:
            out = adata[:, src].copy()
            if renamed:
                out.var_names = list(genes)
            if mapped is not None:
                out.uns[GENE_MAP_KEY] = mapped
            return out
        adata._inplace_subset_var(src)
        if renamed:
            adata.var_names = list(genes)
        if mapped is not None:
            adata.uns[GENE_MAP_KEY] = mapped
        return None

    logger.warning("section %s: %d panel gene(s) not measured, added as all-zero columns: "
                   "%s%s", section, len(absent), ", ".join(absent[:10]),
                   " ..." if len(absent) > 10 else "")
    if adata.varm.keys() or adata.varp.keys():
        logger.warning("section %s: dropping varm/varp (%s) because zero-filled genes have no "
                       "values there", section, ", ".join(list(adata.varm) + list(adata.varp)))
    take = np.where(src < 0, adata.n_vars, src)
    X = _take_columns(adata.X, take, adata.n_vars)
    if sparse.issparse(X) and sparse.issparse(adata.X):
        X = X.asformat(adata.X.format)
    layers = {k: _take_columns(v, take, adata.n_vars) for k, v in adata.layers.items()}
    var = adata.var.reindex(genes)
    var[ZERO_FILLED_COLUMN] = src < 0
    new = ad.AnnData(X=X, obs=adata.obs.copy(), var=var,
                     uns=copy_module.deepcopy(dict(adata.uns)),
                     obsm={k: v.copy() for k, v in adata.obsm.items()},
                     obsp={k: v.copy() for k, v in adata.obsp.items()}, layers=layers)
    if adata.raw is not None:
        new.raw = adata.raw.to_adata()
    prev = list(new.uns.get(MISSING_KEY, []))
    new.uns[MISSING_KEY] = prev + [g for g in absent if g not in prev]
    if mapped is not None:
        new.uns[GENE_MAP_KEY] = mapped
    if copy:
        return new
    adata._init_as_actual(new)
    return None


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
    if missing not in _MISSING_MODES:
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    genes = _check_gene_list(genes)

    def one(a):
        _check_anndata(a, name="adata_or_dict")
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
