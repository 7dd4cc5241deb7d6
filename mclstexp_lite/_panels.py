"""Gene panels: the lists of genes a model predicts.

- :func:`published_panel` - the 785-gene HER2+ and 171-gene cSCC panels published with
  the mclSTExp code (checksum-verified, converted once to a plain text file);
- :func:`select_panel` - our recipe: highly variable genes per section, combined;
- :func:`save_panel`, :func:`load_panel` - panel files, one gene per line;
- :func:`compare_panels` - overlap of two panels;
- :func:`check_gene_list` - the checks every panel passes (unique, non-empty names).

Restricting a section to a panel is :func:`mclstexp_lite.pp.subset_genes`;
:mod:`mclstexp_lite.pp` re-exports all of these (``ml.pp.published_panel`` ...).
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import _util
from . import download as dl
from ._normalize import NORMALIZE_KEY, normalize

logger = logging.getLogger(__name__)

__all__ = [
    "published_panel",
    "select_panel",
    "save_panel",
    "load_panel",
    "compare_panels",
    "check_gene_list",
    "PANEL_DATASETS",
]

#: Panels published with the mclSTExp code (manifest dataset ``mclstexp_panels``).
PANEL_DATASETS = ("her2st", "cscc")
_HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3")
_PANEL_MANIFEST = "mclstexp_panels"


# ------------------------------------------------------------------ panel files
def check_gene_list(genes, name: str = "genes", *, allow_empty: bool = False) -> list[str]:
    """Validate a gene list: not a bare string, all non-empty str, no duplicates.

    Returns the genes as a list of ``str``; a ``TypeError`` / ``ValueError`` naming
    ``name`` otherwise (``allow_empty=True`` accepts an empty list).
    """
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
    genes = check_gene_list(genes)
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
    _util.atomic_write_text(path, "\n".join(header + genes) + "\n")
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
        genes = check_gene_list(genes, name=str(path))
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
    genes = check_gene_list(arr.tolist(), name=str(npy))
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
        _util.check_anndata(a, name=f"adatas[{name!r}]" if name is not None else f"adatas[{i}]")
        out.append((name if name is not None else _util.section_name(a), a))
    return out


def _raw_counts(adata):
    """Raw counts of a section: layers['counts'] when X was normalised, else X."""
    if NORMALIZE_KEY in adata.uns:
        if "counts" not in adata.layers:
            raise ValueError(f"section {_util.section_name(adata)} is normalised but has no "
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
    a = check_gene_list(a, name="a", allow_empty=True)
    b = check_gene_list(b, name="b", allow_empty=True)
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
