"""Normalisation and gene panels.

Two normalisations are offered (``docs/preprocessing.md`` compares them):

- ``"library_size"`` (default): every spot is scaled to the same total count, then
  ``log1p`` (natural log). This is the standard single-cell / spatial recipe
  (``sc.pp.normalize_total`` followed by ``sc.pp.log1p``).
- ``"published"``: what the published mclSTExp preprocessing computes. It hands a
  GENES x SPOTS matrix to ``scprep.normalize.library_size_normalize`` with scprep's
  defaults, so every *gene* (not every spot) is scaled to a total of 10,000 over the
  section's spots, then ``scprep.transform.log`` (``log10(x + 1)``).

Gene panels (:mod:`mclstexp_lite._panels`, :mod:`mclstexp_lite._gene_names`; re-exported
here, so ``ml.pp.published_panel`` etc. work as before):

- :func:`published_panel` - the 785-gene HER2+ and 171-gene cSCC panels published with
  the mclSTExp code (checksum-verified, converted once to a plain text file);
- :func:`select_panel` - our recipe: highly variable genes per section, combined;
- :func:`save_panel`, :func:`load_panel`, :func:`compare_panels`;
- :func:`subset_genes` - restrict and reorder ``var`` to a panel (matching Ensembl ids
  with or without version suffixes, and other gene names: ``var`` columns or an
  ``id_map`` read by :func:`read_gene_map`).

This module: :func:`normalize` (written in the private ``_normalize`` module, below the
panels, which normalise too), and :func:`prepare` - subset and normalise in the order
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
    ``params`` of :func:`prepare`, the ``order`` of its two steps and the panel's
    ``panel_sha256``: the one record of how a section was prepared
    (:func:`prepared_with`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence

from . import _util
from ._normalize import (  # noqa: F401 - re-exported: ml.pp.normalize, ...
    NORMALIZE_KEY,
    NORMALIZE_METHODS,
    PUBLISHED_RESCALE,
    normalize,
)
from ._gene_names import (  # noqa: F401 - re-exported: ml.pp.subset_genes, ...
    GENE_MAP_KEY,
    GENE_NAME_COLUMNS,
    MISSING_KEY,
    MISSING_MODES,
    ZERO_FILLED_COLUMN,
    read_gene_map,
    subset_genes,
)
from ._panels import (  # noqa: F401 - re-exported: ml.pp.published_panel, ...
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
    "prepared_with",
    "panel_sha256",
    "check_gene_list",
    "NORMALIZE_KEY",
    "MISSING_KEY",
    "PREPARE_KEY",
    "NORMALIZE_METHODS",
    "PANEL_DATASETS",
    "PUBLISHED_RESCALE",
]

#: ``adata.uns`` key written by :func:`prepare`: the one record of how a section was
#: prepared.
PREPARE_KEY = "mclstexp_prepare"
#: The key the tutorials' cache of prepared sections wrote before (``panel``: the first
#: 16 hex digits of :func:`panel_sha256`, ``method``, ``n_genes``); still read by
#: :func:`prepared_with`, so files written then are reused.
_FORMER_PREPARED_KEY = "mclstexp_prepared"


def panel_sha256(genes: Sequence[str]) -> str:
    """sha256 of a gene panel, its names in order, one per line (what
    ``uns['mclstexp_prepare']['panel_sha256']`` records)."""
    return hashlib.sha256("\n".join(map(str, genes)).encode()).hexdigest()


def prepared_with(adata, genes: Sequence[str], *, method: str = "library_size") -> bool:
    """Whether ``adata`` came out of :func:`prepare` with this panel (names in order) and
    normalisation ``method``: read from ``uns['mclstexp_prepare']``, or from the key that
    sections cached by the tutorials before carry (``uns['mclstexp_prepared']``)."""
    genes = [str(g) for g in genes]
    rec = adata.uns.get(PREPARE_KEY)
    if isinstance(rec, Mapping) and "panel_sha256" in rec:
        params = rec.get("params") or {}
        return (rec["panel_sha256"] == panel_sha256(genes) and params.get("method") == method
                and int(params.get("n_genes", -1)) == len(genes))
    old = adata.uns.get(_FORMER_PREPARED_KEY)
    if isinstance(old, Mapping):
        return (old.get("panel") == panel_sha256(genes)[:16] and old.get("method") == method
                and int(old.get("n_genes", -1)) == len(genes))
    return False


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
        ``uns['mclstexp_prepare']`` with ``params``, ``order`` and ``panel_sha256``
        (:func:`panel_sha256`; :func:`prepared_with` reads it back).
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
            out = subset_genes(out, genes, missing=missing, id_map=id_map)
            order = "normalize_then_subset"
        else:
            out = subset_genes(a, genes, missing=missing, id_map=id_map)
            normalize(out, method=method)
            order = "subset_then_normalize"
        out.uns[PREPARE_KEY] = {"params": {"method": method, "missing": missing,
                                           "n_genes": len(genes)}, "order": order,
                                "panel_sha256": panel_sha256(genes)}
        return out

    if isinstance(adata_or_dict, ad.AnnData):
        return one(adata_or_dict)
    if isinstance(adata_or_dict, Mapping):
        return {k: one(v) for k, v in adata_or_dict.items()}
    if isinstance(adata_or_dict, (list, tuple)):
        return [one(v) for v in adata_or_dict]
    raise TypeError("adata_or_dict must be an AnnData, a dict {section: AnnData} or a list "
                    f"of AnnData, got {type(adata_or_dict).__name__}")
