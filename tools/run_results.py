#!/usr/bin/env python
"""Cross-validate mclSTExp and its baselines on HER2+ sections and write one table.

Loads the sections, prepares them with the published 785-gene panel
(``pp.published_panel("her2st")``, library-size normalisation + log1p), then runs every
method under every fold scheme with :func:`mclstexp_lite.cv.run_cv`, one results folder
per (scheme, method) under ``--out``; retrieval methods are also rescored at each
``--extra-top-k`` from their cached embeddings (:func:`mclstexp_lite.cv.rescore`, no
retraining). Finally :func:`mclstexp_lite.cv.compare` gathers everything into
``<out>/results.csv``, ``<out>/results.md`` (with, per held-out section, the share of
the retrieved neighbours from the held-out patient's other sections:
:func:`mclstexp_lite.cv.neighbour_shares`, also ``<out>/neighbours.csv``) and
``<out>/per_section.csv``, and
:func:`mclstexp_lite.metrics.paired_bootstrap` compares mclstexp (at ``--top-k``) with
every other run of the same scheme on the saved predictions: paired bootstrap 95 %
confidence intervals of the difference of each metric, resampling spots and resampling
sections (``<out>/differences.csv``, ``<out>/differences.md``; ``--n-boot``).

A rerun with the same arguments continues an interrupted study: complete folders are
read back, interrupted ones resume. ``--overwrite`` recomputes.

Example (the run in docs/results.md)::

    MCLSTEXP_DATA=../shared/data .venv/bin/python tools/run_results.py \\
        --sections B4 C2 C3 C4 C5 C6 A1 --schemes patient section \\
        --methods mean ridge_color ridge_features mclstexp bleep \\
        --profile quick --top-k 200 --extra-top-k 50 --out outputs/results
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


#: Seed of the bootstrap of the differences (numpy.random.default_rng).
BOOTSTRAP_SEED = 0
#: Confidence level of the intervals in differences.csv / differences.md.
BOOTSTRAP_LEVEL = 0.95
#: Columns of differences.csv, in order.
DIFF_COLUMNS = ("scheme", "method_a", "method_b", "comparison", "unit", "metric", "a", "b",
                "diff", "ci_low", "ci_high", "level", "n_boot", "n_sections", "seed")
_METRIC_LABELS = {"pcc_acg": "PCC-ACG", "pcc_heg": "PCC-HEG", "mse": "MSE", "mae": "MAE"}


def parse_args(argv=None) -> argparse.Namespace:
    from mclstexp_lite import cv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6", "A1"],
                   help="HER2+ sections (default: the 7 with an image here)")
    p.add_argument("--schemes", nargs="+", default=list(cv.SCHEMES), choices=cv.SCHEMES)
    p.add_argument("--methods", nargs="+", default=list(cv.METHODS), choices=cv.METHODS)
    p.add_argument("--profile", default="quick", help="TrainConfig profile (quick or paper)")
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    p.add_argument("--out", default="outputs/results", help="results root folder")
    p.add_argument("--top-k", type=int, default=200, help="retrieval top_k (paper: 200)")
    p.add_argument("--extra-top-k", type=int, nargs="*", default=[],
                   help="also rescore retrieval methods at these top_k (no retraining)")
    p.add_argument("--metric", default="l1", choices=("l1", "l2"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="recompute existing results")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap replicates of the mclstexp-minus-other differences "
                        "(differences.csv/.md, seed %d); 0 skips them" % BOOTSTRAP_SEED)
    args = p.parse_args(argv)
    if args.n_boot < 0:
        p.error(f"--n-boot must be 0 (skip the differences) or positive, got {args.n_boot}")
    return args


#: What a "-" cell of per_section.md means.
PER_SECTION_NOTE = (
    "\"-\": no value. Either the run did not score that section (an incomplete run; "
    "results.md then averages every method of the scheme over the sections they all "
    "have and names the others in `left_out`), or the correlation is undefined because "
    "the prediction is the same at every spot (the `mean` baseline): nothing varies to "
    "correlate with.")


def per_section_markdown(per_section, metrics=("pcc_acg", "pcc_heg", "mse")) -> str:
    """One Markdown table per scheme and metric: held-out sections x methods, then a note
    on what a "-" cell (no value) means when there is one."""
    import pandas as pd

    df = per_section.copy()
    df["label"] = [m if pd.isna(k) else f"{m} k={int(k)}"
                   for m, k in zip(df["method"], df["top_k"])]
    labels = list(dict.fromkeys(df.sort_values(["method", "top_k"])["label"]))
    blocks, gaps = [], False
    for scheme, part in df.groupby("scheme", sort=True):
        for metric in metrics:
            wide = part.pivot_table(index="test_section", columns="label", values=metric,
                                    dropna=False)
            cols = [c for c in labels if c in wide.columns]
            lines = [f"{scheme} scheme, {metric}:", "",
                     "| section | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for sec, row in wide[cols].iterrows():
                lines.append(f"| {sec} | " + " | ".join(
                    "-" if pd.isna(v) else f"{v:.3f}" for v in row) + " |")
                gaps = gaps or bool(row.isna().any())
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks + ([PER_SECTION_NOTE] if gaps else []))


def run_label(cfg) -> str:
    """``"mean"`` for a baseline, ``"bleep k=200"`` for a retrieval run (its config)."""
    k = cfg.get("top_k")
    return cfg["method"] if k is None else f"{cfg['method']} k={int(k)}"


def metrics_stamp(folder: Path):
    """When ``folder/metrics.csv`` was last written (``None`` if absent): run_cv rewrites
    it only when a fold ran, so an unchanged stamp means the folder was read back."""
    p = Path(folder) / "metrics.csv"
    return p.stat().st_mtime_ns if p.exists() else None


def _dense_f32(X):
    """Dense float32 copy of an expression matrix, as run_cv scores the truth."""
    import numpy as np

    if hasattr(X, "toarray") and hasattr(X, "nnz"):
        X = X.toarray()
    return np.asarray(X, dtype=np.float32)


def load_predictions(results_dir, adatas) -> dict:
    """The saved predictions of a results folder, ``{section: (n_spots, n_genes)}``.

    Reads ``<fold>/pred_<section>.h5ad`` for every held-out section of every complete
    fold (``metrics.json`` present: the folds in the results table), in the order of
    ``adatas``. Each prediction must have the truth's ``obs_names`` and ``var_names``,
    in the same order.

    Raises
    ------
    FileNotFoundError, ValueError
        A complete fold lacks a prediction file, or a prediction does not match the
        prepared sections.
    """
    import anndata as ad

    from mclstexp_lite import cv

    d = Path(results_dir)
    found = {}
    for fold in cv.load_folds(d):
        if not (d / fold.name / "metrics.json").exists():
            continue
        for s in fold.test:
            f = d / fold.name / f"pred_{s}.h5ad"
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing although fold {fold.name} is "
                                        "complete; rerun that run with --overwrite.")
            if s not in adatas:
                raise ValueError(f"{f} predicts section {s}, which is not among the "
                                 f"loaded sections {list(adatas)}.")
            pred, truth = ad.read_h5ad(f), adatas[s]
            for what in ("obs_names", "var_names"):
                if not getattr(pred, what).equals(getattr(truth, what)):
                    raise ValueError(f"{f}: {what} differ from the prepared section {s}; "
                                     "the run was computed from other data.")
            found[s] = _dense_f32(pred.X)
    return {s: found[s] for s in adatas if s in found}


def bootstrap_differences(dirs, adatas, *, top_k, reference="mclstexp", n_boot=1000,
                          seed=BOOTSTRAP_SEED, level=BOOTSTRAP_LEVEL, log=None):
    """Paired bootstrap intervals of ``reference`` minus every other run, per scheme.

    In each scheme the reference is the ``reference`` run at ``top_k`` (not a rescored
    one when both exist); every other results folder of that scheme (other methods,
    other ``top_k``) is compared with it on their saved predictions
    (:func:`load_predictions`) and the prepared truth, with
    :func:`mclstexp_lite.metrics.paired_bootstrap` once with ``unit="spot"`` and once
    with ``unit="section"``. Runs whose held-out sections differ from the reference's
    (e.g. an incomplete run) are skipped.

    Returns
    -------
    (pandas.DataFrame, list of str)
        Rows with columns :data:`DIFF_COLUMNS` (``method_a``/``method_b`` as
        :func:`run_label`; ``comparison`` "mclstexp − X"; ``a``, ``b``, ``diff``,
        ``ci_low``, ``ci_high`` as ``paired_bootstrap``), and one note per skipped
        scheme or run.
    """
    import pandas as pd

    from mclstexp_lite import metrics as mt

    def note(msg):
        notes.append(msg)
        if log is not None:
            log.info("differences: %s", msg)

    notes, rows = [], []
    runs = []
    for d in dirs:
        cfg = json.loads((Path(d) / "config.json").read_text())
        runs.append((Path(d), cfg))
    schemes = list(dict.fromkeys(cfg["scheme"] for _, cfg in runs))
    if not any(cfg["method"] == reference for _, cfg in runs):
        note(f"{reference} is not among the methods run; no differences computed.")
    else:
        for scheme in schemes:
            mine = [(d, cfg) for d, cfg in runs if cfg["scheme"] == scheme]
            cands = [(d, cfg) for d, cfg in mine
                     if cfg["method"] == reference and cfg.get("top_k") == top_k]
            cands.sort(key=lambda x: "rescored_from" in x[1])
            if not cands:
                note(f"{scheme}: no {reference} run at top_k={top_k}; differences skipped.")
                continue
            ref_dir, ref_cfg = cands[0]
            try:
                ref_pred = load_predictions(ref_dir, adatas)
            except (FileNotFoundError, ValueError) as err:
                note(f"{scheme}: {reference} predictions unusable ({err}); skipped.")
                continue
            if not ref_pred:
                note(f"{scheme}: {ref_dir} has no complete fold; skipped.")
                continue
            truth = {s: _dense_f32(adatas[s].X) for s in ref_pred}
            label_a = run_label(ref_cfg)
            for d, cfg in mine:
                if d == ref_dir:
                    continue
                label_b = run_label(cfg)
                try:
                    other = load_predictions(d, adatas)
                except (FileNotFoundError, ValueError) as err:
                    note(f"{scheme}: {label_b} skipped, predictions unusable ({err}).")
                    continue
                if list(other) != list(ref_pred):
                    note(f"{scheme}: {label_b} skipped: held-out sections {list(other)} "
                         f"differ from {label_a}'s {list(ref_pred)}.")
                    continue
                for unit in ("spot", "section"):
                    t0 = time.time()
                    res = mt.paired_bootstrap(ref_pred, other, truth,
                                              n_heg=ref_cfg.get("n_heg", 50), unit=unit,
                                              n_boot=n_boot, level=level, seed=seed)
                    if log is not None:
                        log.info("differences: %s, %s - %s, %s resampling: %.1f s", scheme,
                                 label_a, label_b, unit, time.time() - t0)
                    for r in res.to_dict("records"):
                        rows.append({"scheme": scheme, "method_a": label_a,
                                     "method_b": label_b,
                                     "comparison": f"{reference} \u2212 {label_b}",
                                     **r, "level": level, "seed": seed})
    return pd.DataFrame(rows, columns=list(DIFF_COLUMNS)), notes


def _ci_cell(row) -> str:
    import math

    if any(math.isnan(row[c]) for c in ("diff", "ci_low", "ci_high")):
        return "undefined"
    return f"{row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def differences_markdown(diffs, notes, *, top_k, reference="mclstexp", n_boot=1000,
                         seed=BOOTSTRAP_SEED, level=BOOTSTRAP_LEVEL) -> str:
    """Markdown page of :func:`bootstrap_differences`: one row per scheme, comparison
    and metric; the difference with its interval under each resampling unit."""
    pct = f"{100 * level:g} %"
    lines = [
        f"Paired bootstrap differences, {reference} (top_k={top_k}) minus each other "
        f"run; difference of the mean over held-out sections, with a {pct} percentile "
        f"interval ({n_boot} replicates, seed {seed}). PCC: positive favours "
        f"{reference}; MSE/MAE: negative favours {reference}. Spot resampling redraws "
        "the spots of every section (the same spots for both methods) and ignores "
        "spatial autocorrelation, so its intervals are too narrow; section resampling "
        "redraws whole held-out sections, coarse when there are few of them. \"undefined\": "
        "the metric is not defined for a method (e.g. PCC of the constant `mean` "
        "prediction).",
        "",
    ]
    if len(diffs):
        head = ["scheme", "comparison", "metric", f"diff [{pct} CI], spot resampling",
                f"diff [{pct} CI], section resampling", "sections"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = ["scheme", "comparison", "metric"]
        order = list(dict.fromkeys(map(tuple, diffs[keys].to_numpy().tolist())))
        by = {(tuple(r[k] for k in keys), r["unit"]): r for r in diffs.to_dict("records")}
        for key in order:
            cells = [str(key[0]), str(key[1]), _METRIC_LABELS.get(key[2], key[2])]
            for unit in ("spot", "section"):
                r = by.get((key, unit))
                cells.append("-" if r is None else _ci_cell(r))
            some = by.get((key, "spot")) or by.get((key, "section"))
            cells.append(str(some["n_sections"]))
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No differences were computed.")
    if notes:
        lines += ["", "Skipped:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("run_results")
    import torch

    from mclstexp_lite import cv, datasets, pp
    from mclstexp_lite.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"device": args.device}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = TrainConfig.profile(args.profile, **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    genes = pp.published_panel("her2st")
    adatas = {s: pp.prepare(datasets.her2st(s, progress=args.progress), genes)
              for s in args.sections}
    log.info("loaded %s (%d genes, %s spots)", list(adatas), len(genes),
             {s: a.n_obs for s, a in adatas.items()})

    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    dirs = []
    for scheme in args.schemes:
        for method in args.methods:
            d = out / scheme / method
            t0 = time.time()
            before = metrics_stamp(d)
            cv.run_cv(adatas, scheme=scheme, method=method, config=config, out_dir=d,
                      top_k=args.top_k, metric=args.metric, overwrite=args.overwrite,
                      progress=args.progress, device=args.device)
            if metrics_stamp(d) != before:  # a complete folder is read back, not run again
                timings[f"{scheme}/{method}"] = time.time() - t0
                log.info("%s/%s done in %.0f s", scheme, method, time.time() - t0)
            else:
                log.info("%s already complete; read it back", d)
            dirs.append(d)
            if method in ("mclstexp", "bleep"):
                for k in args.extra_top_k:
                    dk = out / scheme / f"{method}_k{k}"
                    cv.rescore(adatas, d, top_k=k, metric=args.metric, out_dir=dk,
                               overwrite=args.overwrite, progress=args.progress,
                               device=args.device)
                    dirs.append(dk)
            from mclstexp_lite._util import atomic_write_json
            atomic_write_json(timings_path, timings)

    table = cv.compare(dirs)
    per_section = cv.compare(dirs, per_section=True)
    (out / "results.csv").write_text(table.to_csv(index=False))
    (out / "per_section.csv").write_text(per_section.to_csv(index=False))
    md = cv.summary_markdown(table)
    sections_md = per_section_markdown(per_section)
    (out / "per_section.md").write_text(sections_md + "\n")
    shares = [cv.neighbour_shares(d) for d in dirs
              if d.name in ("mclstexp", "bleep")]
    if shares:
        import pandas as pd

        nb = pd.concat(shares, ignore_index=True)
        (out / "neighbours.csv").write_text(nb.to_csv(index=False))
        nb_md = cv.neighbours_markdown(nb)
        md += ("\n\nWhere the retrieved neighbours come from, per held-out section "
               "(neighbours.csv):\n\n" + nb_md)
    (out / "results.md").write_text(md + "\n")
    diff_md = None
    if args.n_boot > 0:
        from mclstexp_lite._util import atomic_write_text

        diffs, notes = bootstrap_differences(dirs, adatas, top_k=args.top_k,
                                             n_boot=args.n_boot, log=log)
        atomic_write_text(out / "differences.csv", diffs.to_csv(index=False))
        diff_md = differences_markdown(diffs, notes, top_k=args.top_k, n_boot=args.n_boot)
        atomic_write_text(out / "differences.md", diff_md + "\n")
    else:
        log.info("--n-boot 0: differences.csv/.md not computed")
    print(md)
    print()
    print(sections_md)
    if diff_md is not None:
        print("\ndifferences (differences.csv):\n" + diff_md)
    print(f"\nwall time this invocation: {time.time() - t_start:.0f} s; per run: "
          + json.dumps({k: round(v) for k, v in timings.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
