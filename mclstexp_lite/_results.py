"""Result tables: read :func:`mclstexp_lite.cv.run_cv` results folders and summarise them.

- :func:`load_results` - the per-section metrics (``metrics.csv``) of one folder;
- :func:`load_predictions` - its held-out predictions (``AnnData`` per section);
- :func:`method_summary` - mean and sample sd over held-out sections, per method and
  scheme, on the sections every method has;
- :func:`shared_sections` - that rule: the rows of the held-out sections every method
  has (the figures of :mod:`mclstexp_lite.pl` use it too);
- :func:`summary_markdown` - such a table as Markdown (``summary.md``);
- :func:`compare` - one table across results folders (methods, schemes, ``top_k``);
- :func:`neighbour_shares` - where a retrieval run's top-k neighbours come from, per
  held-out section (the share from the held-out patient's other sections).

:mod:`mclstexp_lite.cv` re-exports ``load_results``, ``method_summary``,
``summary_markdown``, ``compare`` and ``neighbour_shares`` (``ml.cv.compare`` etc.); the results folder
layout is described there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import _util
from . import metrics as mt
from ._folds import load_folds
from ._run_folder import METHODS

__all__ = ["load_results", "load_predictions", "method_summary", "summary_markdown", "compare",
           "shared_sections", "neighbour_shares", "neighbours_markdown", "NEIGHBOURS_FILE"]

#: Where :func:`mclstexp_lite.cv.run_cv` writes :func:`neighbour_shares` of a retrieval run.
NEIGHBOURS_FILE = "neighbours.csv"


def load_results(out_dir) -> pd.DataFrame:
    """The per-section metrics (``metrics.csv``) of a results folder.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``metrics.csv`` (not a finished :func:`~mclstexp_lite.cv.run_cv` folder).
    """
    p = Path(out_dir) / "metrics.csv"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; run cv.run_cv(..., out_dir={str(out_dir)!r}) "
                                "first.")
    return pd.read_csv(p, dtype={"fold": str, "test_section": str})


def load_predictions(out_dir) -> dict:
    """The held-out predictions of a :func:`~mclstexp_lite.cv.run_cv` folder, read back.

    Returns
    -------
    dict
        ``{held-out section: AnnData}`` in the order of ``metrics.csv`` (one
        ``<fold>/pred_<section>.h5ad`` per held-out section; expression in ``X``, the
        prediction's settings in ``uns['mclstexp_prediction']``).

    Raises
    ------
    FileNotFoundError
        If the folder is not a finished run, or a prediction listed in ``metrics.csv``
        is missing (rerun ``run_cv`` with the same ``out_dir`` to resume it).
    """
    import anndata as ad

    table = load_results(out_dir)
    out = {}
    for fold, section in zip(table["fold"].astype(str), table["test_section"].astype(str)):
        path = Path(out_dir) / fold / f"pred_{section}.h5ad"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is listed in {Path(out_dir) / 'metrics.csv'} but missing; rerun "
                f"cv.run_cv(..., out_dir={str(out_dir)!r}) to write it again.")
        out[section] = ad.read_h5ad(path)
    return out


def method_summary(per_section: pd.DataFrame, *, by=("method", "scheme"),
                      shared: bool = True) -> pd.DataFrame:
    """Mean and sample sd of the metrics over held-out sections.

    Parameters
    ----------
    per_section
        Rows as in ``metrics.csv`` (:data:`mclstexp_lite.cv.ROW_COLUMNS`).
    by
        Grouping columns.
    shared
        ``True`` (default): within each scheme, methods (the other ``by`` columns) are
        compared only on the held-out sections they all have, the rule of
        :func:`shared_sections` (which :func:`~mclstexp_lite.pl.metric_bars` uses too);
        a row that lost sections says which in ``left_out``. ``False`` averages
        whatever sections each group has.

    Returns
    -------
    pandas.DataFrame
        The ``by`` columns, ``n_folds`` (distinct folds), ``n_sections`` (held-out
        sections averaged over: under both schemes every section of the study is
        scored once, so both schemes average the same sections), and
        ``<metric>_mean``/``<metric>_sd`` for PCC-ACG, PCC-HEG, MSE and MAE
        (:func:`mclstexp_lite.metrics.mean_sd_table`). Only when sections were left
        out, a ``left_out`` column (after ``n_sections``): per row, the sections it was
        scored on that are not in its mean, each with the methods that lack it, e.g.
        ``"C2 (not scored for: ridge_color)"``; ``""`` for rows that lost none. A group
        with no section in common with the others keeps its row, with no metrics.
    """
    by = [by] if isinstance(by, str) else list(by)
    left_out = None
    if shared and "test_section" in per_section.columns:
        per_section, left_out = _shared_rows(per_section, by)
    table = mt.mean_sd_table(per_section, by=by).rename(columns={"n_folds": "n_sections"})
    folds = per_section.groupby(by, sort=True, dropna=False)["fold"].nunique()
    table.insert(len(by), "n_folds", folds.to_numpy())
    if left_out:
        empty = [k for k in left_out if k not in set(map(tuple, table[by].to_numpy().tolist()))]
        if empty:  # groups with nothing in common: a row without metrics
            extra = pd.DataFrame([dict(zip(by, k), n_folds=0, n_sections=0) for k in empty])
            table = pd.concat([table, extra], ignore_index=True).sort_values(by)
            table = table.reset_index(drop=True)
        cells = [left_out.get(tuple(k), "") for k in table[by].to_numpy().tolist()]
        table.insert(len(by) + 2, "left_out", cells)
    return table


def _run_label(columns, values) -> str:
    """A group's name in notes: the method, with ``k=`` for a retrieval top_k."""
    parts = []
    for c, v in zip(columns, values):
        if c in ("_k", "top_k"):
            if pd.notna(v) and float(v) >= 0:
                parts.append(f"k={int(v)}")
        else:
            parts.append(str(v))
    return " ".join(parts)


def _shared_rows(per_section: pd.DataFrame, by: list) -> tuple[pd.DataFrame, dict]:
    """The rows of the sections every group of a scheme has (:func:`shared_sections`), and
    ``{group key: "section (not scored for: ...)"}`` for the groups that lost rows."""
    col = "scheme" if "scheme" in by else None
    hue = [c for c in by if c != col]
    if not hue or per_section.empty:
        return per_section, {}
    df = per_section.reset_index(drop=True)
    df = df.assign(_run=[_run_label(hue, v) for v in zip(*(df[c] for c in hue))],
                   _col=df[col] if col else "")
    kept, _, missing = shared_sections(df, hue="_run", col="_col", with_missing=True)
    gone = df.loc[~df.index.isin(kept.index)]
    left_out: dict = {}
    for key, part in gone.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        c = part["_col"].iloc[0]
        left_out[key] = "; ".join(
            f"{s} (not scored for: {', '.join(missing[c][s])})"
            for s in sorted(set(part["test_section"].astype(str))))
    return kept.drop(columns=["_run", "_col"]), left_out


def shared_sections(per_fold, *, hue: str = "method", col: str = "scheme",
                    with_missing: bool = False):
    """The rows of ``per_fold`` whose held-out section every ``hue`` group of their ``col``
    group has, and a note per ``col`` group that lost rows (empty when none did).

    Methods scored on different held-out sections cannot be averaged side by side. The
    rule is shared by :func:`mclstexp_lite.pl.metric_bars` and :func:`method_summary`
    (so also :func:`compare` and the results tables).

    With ``with_missing=True`` a third value is returned: ``{col value: {section: [hue
    groups without it]}}`` for every section left out.
    """
    key = "test_section" if "test_section" in per_fold.columns else "fold"
    parts, notes, missing = [], [], {}
    for c, part in per_fold.groupby(col, sort=False):
        groups = {h: set(g[key]) for h, g in part.groupby(hue, sort=False)}
        shared = set.intersection(*groups.values()) if groups else set()
        kept = part[part[key].isin(shared)]
        if len(kept) < len(part):
            dropped = sorted(set(part[key]) - shared)
            missing[c] = {s: [str(h) for h, have in groups.items() if s not in have]
                          for s in dropped}
            lacking = "; ".join(f"{s}: {', '.join(missing[c][s])}" for s in dropped)
            notes.append(f"{c}: compared on the {len(shared)} held-out section(s) every method "
                         f"has; left out {dropped} (not scored for {lacking})")
        parts.append(kept)
    kept = pd.concat(parts) if parts else per_fold.iloc[:0]
    return (kept, notes, missing) if with_missing else (kept, notes)


_LABELS = {"pcc_acg": "PCC-ACG", "pcc_heg": "PCC-HEG", "mse": "MSE", "mae": "MAE"}


def summary_markdown(table: pd.DataFrame, *, digits: int = 3) -> str:
    """Render a :func:`method_summary` / :func:`compare` table as Markdown.

    Each metric becomes one ``mean ± sd`` column (:func:`mclstexp_lite.metrics.fmt`); a
    metric with no value in any held-out section (a correlation of the constant ``mean``
    prediction) is shown as ``undefined*`` with a footnote saying why. A ``left_out``
    column (sections not shared by every method, :func:`method_summary`) gets a
    footnote that says methods are compared on the sections they share.
    """
    lead = [c for c in table.columns if not c.endswith(("_mean", "_sd"))]
    metrics = [c[:-5] for c in table.columns if c.endswith("_mean")]
    head = lead + [_LABELS.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    undefined = False
    for _, r in table.iterrows():
        cells = [_cell(r[c]) for c in lead]
        for m in metrics:
            if "n_sections" in r and r["n_sections"] == 0:
                cells.append("-")
            elif pd.isna(r[f"{m}_mean"]):
                cells.append("undefined*")
                undefined = True
            else:
                cells.append(mt.fmt(r[f"{m}_mean"], r[f"{m}_sd"], digits=digits))
        lines.append("| " + " | ".join(cells) + " |")
    if undefined:
        lines += ["", "\\* undefined: no held-out section has a value, e.g. a correlation of a "
                  "prediction that is the same at every spot (the `mean` baseline), which "
                  "has no variation to correlate with."]
    if "left_out" in table.columns and (table["left_out"].astype(str) != "").any():
        lines += ["", "left_out: methods are compared only on the held-out sections they all "
                  "have (per scheme); these sections were scored for that row but are not in "
                  "its mean, because the methods named lack them (an incomplete or "
                  "interrupted run). Rerun those methods to compare on every section."]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def compare(results_dirs, *, per_section: bool = False) -> pd.DataFrame:
    """One table across results folders (methods, schemes, retrieval settings).

    Parameters
    ----------
    results_dirs
        Folders written by :func:`~mclstexp_lite.cv.run_cv` or
        :func:`~mclstexp_lite.cv.rescore` (a single path is accepted too).
    per_section
        Return the per-section rows of every folder (with a ``top_k`` column) instead
        of the summary.

    Returns
    -------
    pandas.DataFrame
        Summary: ``method``, ``scheme``, ``top_k`` (retrieval methods; NaN for
        baselines), ``n_folds``, ``n_sections`` and mean/sd columns of PCC-ACG,
        PCC-HEG, MSE, MAE; one row per folder, sorted by scheme, then method, then
        ``top_k``. Within a scheme every row averages the same held-out sections, those
        all folders have (:func:`method_summary`); a ``left_out`` column names the
        others when there are any.
    """
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    parts = []
    for d in results_dirs:
        df = load_results(d)
        with open(Path(d) / "config.json") as fh:
            cfg = json.load(fh)
        df["top_k"] = cfg.get("top_k")
        parts.append(df)
    if not parts:
        raise ValueError("`results_dirs` is empty; pass at least one run_cv results folder.")
    allrows = pd.concat(parts, ignore_index=True)
    allrows["top_k"] = pd.to_numeric(allrows["top_k"])
    if per_section:
        return allrows
    key = allrows["top_k"].fillna(-1)
    allrows = allrows.assign(_k=key)
    table = method_summary(allrows, by=("scheme", "method", "_k"))
    table = table.rename(columns={"_k": "top_k"})
    table["top_k"] = table["top_k"].where(table["top_k"] >= 0)
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.assign(_o=table["method"].map(order).fillna(len(order)))
    table = table.sort_values(["scheme", "_o", "top_k"], na_position="first")
    return table.drop(columns="_o").reset_index(drop=True)



def neighbour_shares(results_dir) -> pd.DataFrame:
    """Where a retrieval run's top-k neighbours come from, per held-out section.

    Under the section scheme a held-out section's reference bank holds the other
    sections of its patient; this measures how much the retrieval leans on them.

    Parameters
    ----------
    results_dir
        A finished (or partly finished) :func:`mclstexp_lite.cv.run_cv` folder of a
        retrieval method (``mclstexp`` or ``bleep``), or a :func:`mclstexp_lite.cv.rescore`
        folder (whose embeddings are read from the run it rescored). Only
        ``config.json``, ``folds.json`` and each fold's ``embeddings.npz`` are read;
        folds without them (or not rescored) are skipped. :func:`mclstexp_lite.cv.run_cv` writes
        the result to ``neighbours.csv`` in the folder.

    Returns
    -------
    One row per held-out section with columns ``scheme``, ``method``, ``top_k``,
    ``test_section``, ``patient``, ``bank_same_patient`` (share of the reference bank
    from the held-out patient's other sections; 0 under the patient scheme),
    ``neighbours_same_patient`` (share of the retrieved top-k neighbours that are),
    ``top_source`` (the reference section giving most neighbours),
    ``top_source_neighbours`` and ``top_source_bank`` (its share of the neighbours and
    of the bank).
    """
    from .tl import retrieve  # torch, only here

    results_dir = Path(results_dir)
    cfg_path = results_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: neighbour_shares reads a "
                                "run_cv results folder; pass the folder run_cv wrote")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("top_k") is None:
        raise ValueError(f"{results_dir} holds method {cfg.get('method')!r}, which "
                         "retrieves nothing; pass a mclstexp or bleep results folder")
    patients = cfg["sections"]
    metric = cfg.get("metric") or "l1"
    # a rescored folder (cv.rescore) keeps no embeddings: they are in its source
    source = Path(cfg["rescored_from"]) if cfg.get("rescored_from") else results_dir
    recs = []
    for fold in load_folds(results_dir):
        if source is not results_dir and not (results_dir / fold.name / "metrics.json").exists():
            continue  # a fold the rescored folder does not have
        npz = source / fold.name / "embeddings.npz"
        if not npz.exists():
            continue
        with np.load(npz) as z:
            secs = z["reference_sections"]
            k = min(int(cfg["top_k"]), len(secs))
            for s in fold.test:
                _, idx = retrieve(z[f"test__{s}"], z["reference"],
                                  np.zeros((len(secs), 1), np.float32), top_k=k,
                                  metric=metric, return_indices=True)
                idx = np.asarray(idx)
                got = secs[idx].ravel()
                same = np.array([patients[str(x)] == patients[s] for x in secs])
                names, counts = np.unique(got, return_counts=True)
                top = names[np.argmax(counts)]
                recs.append({"scheme": cfg["scheme"], "method": cfg["method"], "top_k": k,
                             "test_section": s, "patient": patients[s],
                             "bank_same_patient": float(same.mean()),
                             "neighbours_same_patient": float(same[idx].mean()),
                             "top_source": str(top),
                             "top_source_neighbours": float(counts.max() / got.size),
                             "top_source_bank": float(np.mean(secs == top))})
    return pd.DataFrame(recs, columns=[
        "scheme", "method", "top_k", "test_section", "patient", "bank_same_patient",
        "neighbours_same_patient", "top_source", "top_source_neighbours",
        "top_source_bank"])


def neighbours_markdown(shares: pd.DataFrame, *, digits: int = 2) -> str:
    """:func:`neighbour_shares` as Markdown: one row per held-out section, then a note.

    Columns: scheme, method, held-out section, its patient, the share of the reference
    bank from that patient's other sections, the share of the retrieved neighbours from
    them, and the section giving most neighbours (its share of the neighbours / of the
    bank).
    """
    head = ["scheme", "method", "top_k", "section", "patient", "bank from same patient",
            "neighbours from same patient", "top source (neighbours / bank)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in shares.to_dict("records"):
        lines.append("| " + " | ".join([
            str(r["scheme"]), str(r["method"]), str(int(r["top_k"])), str(r["test_section"]),
            str(r["patient"]), f"{r['bank_same_patient']:.{digits}f}",
            f"{r['neighbours_same_patient']:.{digits}f}",
            f"{r['top_source']} ({r['top_source_neighbours']:.{digits}f} / "
            f"{r['top_source_bank']:.{digits}f})"]) + " |")
    lines += ["", "Neighbours from same patient: the share of each held-out spot's top-k "
              "retrieved reference spots that belong to other sections of the held-out "
              "section's patient (0 under the patient scheme, whose bank has none). Well "
              "above the bank share, the retrieval recognises the patient."]
    return "\n".join(lines)


# ====================================================================== deprecated
#: Former name of :func:`method_summary` (warns once, then calls it).
summarize_results = _util.deprecated_alias(method_summary, "cv.summarize_results",
                                           "cv.method_summary")
