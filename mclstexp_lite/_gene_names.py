"""Gene names: matching a panel to a section's genes.

- :func:`subset_genes` - restrict and reorder ``var`` to a panel, matching Ensembl ids
  with or without version suffixes, and other gene names: the ``var`` columns of
  :data:`GENE_NAME_COLUMNS` or an ``id_map`` read by :func:`read_gene_map`;
- :func:`read_gene_map` - a table of gene ids and symbols, one symbol per id;
- :func:`unversioned` - an Ensembl id without its version suffix.

:mod:`mclstexp_lite.pp` re-exports :func:`subset_genes`, :func:`read_gene_map` and the
keys below (``ml.pp.subset_genes`` ...).
"""

from __future__ import annotations

import copy as copy_module
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import _util
from ._panels import check_gene_list

logger = logging.getLogger(__name__)

__all__ = [
    "subset_genes",
    "read_gene_map",
    "unversioned",
    "MISSING_KEY",
    "ZERO_FILLED_COLUMN",
    "GENE_MAP_KEY",
    "GENE_NAME_COLUMNS",
    "MISSING_MODES",
]

#: ``adata.uns`` key listing genes that :func:`subset_genes` filled with zeros.
MISSING_KEY = "mclstexp_missing_genes"
#: ``adata.var`` column flagging zero-filled genes.
ZERO_FILLED_COLUMN = "mclstexp_zero_filled"
#: What :func:`subset_genes` (and :func:`mclstexp_lite.pp.prepare`) may do with panel
#: genes a section lacks: raise, or add them as all-zero columns.
MISSING_MODES = ("error", "zero")


# ------------------------------------------------------------------ helpers
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


def unversioned(name: str) -> str:
    """``name`` without an Ensembl version suffix (``ENSG00000141736.14`` ->
    ``ENSG00000141736``); any other name unchanged."""
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
                    s.add(unversioned(v.strip()))
    if id_map is not None:
        label = (f"id_map {id_map}" if isinstance(id_map, (str, os.PathLike)) else "id_map")
        mapping = read_gene_map(id_map, what="id_map")
        forward = {unversioned(k): v for k, v in mapping.items()}
        inverse: dict[str, set[str]] = {}
        for k, v in mapping.items():
            inverse.setdefault(v, set()).add(unversioned(k))
        names = [unversioned(str(n)) for n in adata.var_names]
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
        hit = sorted(set(index.get(unversioned(g), [])))
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
        The panel (unique names), e.g. :func:`~mclstexp_lite.pp.published_panel` or
        :func:`~mclstexp_lite.pp.select_panel`.
    missing
        What to do with panel genes absent from ``adata.var_names``: ``"error"``
        (default) raises; ``"zero"`` adds them as all-zero columns (in ``X`` and every
        layer), logs a warning, lists them in ``uns['mclstexp_missing_genes']`` and
        flags them in ``var['mclstexp_zero_filled']``.
    copy
        Must be ``True`` (the default): a new AnnData is returned and ``adata`` is left
        as it is. In-place subsetting (``copy=False``) was removed: AnnData has no
        public way to drop genes of an object in place; write
        ``adata = pp.subset_genes(adata, genes)``.
    id_map
        Optional ids -> symbols table: a file (first column the id, second the symbol,
        header optional; a 10x ``features.tsv.gz`` works), a mapping or a DataFrame; read
        with :func:`read_gene_map`, which refuses an id with several symbols. Used in
        both directions (section ids with a symbol panel, or section symbols with an id
        panel).

    Returns
    -------
    anndata.AnnData
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

    _util.check_anndata(adata)
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be 'error' or 'zero', got {missing!r}")
    if copy is not True:
        raise ValueError("subset_genes returns a new AnnData: in-place subsetting "
                         "(copy=False) was removed, as AnnData offers no public way to drop "
                         "genes of an object in place. Write adata = pp.subset_genes(adata, "
                         "genes).")
    genes = check_gene_list(genes)
    if not adata.var_names.is_unique:
        raise ValueError(f"section {_util.section_name(adata)}: var_names are not unique; run "
                         "adata.var_names_make_unique() first.")
    src = adata.var_names.get_indexer(genes)
    renamed = False
    if (src < 0).any():  # Ensembl ids with / without version suffixes
        stripped: dict = {}
        for i, name in enumerate(adata.var_names):
            stripped.setdefault(unversioned(str(name)), []).append(i)
        for j, g in enumerate(genes):
            if src[j] < 0:
                hit = stripped.get(unversioned(g), [])
                if len(hit) == 1:
                    src[j] = hit[0]
                    renamed = True
    section = _util.section_name(adata)
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
        out = adata[:, src].copy()
        if renamed:
            out.var_names = list(genes)
        if mapped is not None:
            out.uns[GENE_MAP_KEY] = mapped
        return out

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
    return new
