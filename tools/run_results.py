#!/usr/bin/env python
"""Cross-validate mclSTExp and its baselines on HER2+ sections and write one table.

Loads the sections, prepares them with the published 785-gene panel
(``pp.published_panel("her2st")``, library-size normalisation + log1p), then runs every
method under every fold scheme with :func:`mclstexp_lite.cv.run_cv`, one results folder
per (scheme, method) under ``--out``; retrieval methods are also rescored at each
``--extra-top-k`` from their cached embeddings (:func:`mclstexp_lite.cv.rescore`, no
retraining). Finally :func:`mclstexp_lite.cv.compare` gathers everything into
``<out>/results.csv``, ``<out>/results.md`` and ``<out>/per_section.csv``.

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
    return p.parse_args(argv)


def per_section_markdown(per_section, metrics=("pcc_acg", "pcc_heg", "mse")) -> str:
    """One Markdown table per scheme and metric: held-out sections x methods."""
    import pandas as pd

    df = per_section.copy()
    df["label"] = [m if pd.isna(k) else f"{m} k={int(k)}"
                   for m, k in zip(df["method"], df["top_k"])]
    labels = list(dict.fromkeys(df.sort_values(["method", "top_k"])["label"]))
    blocks = []
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
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def neighbour_shares(results_dir):
    """Where a retrieval run's top-k neighbours come from, per held-out section.

    For each held-out section: the share of the reference bank that belongs to the
    held-out patient's other sections (0 under the patient scheme), the share of the
    top-k neighbours that do, and the reference section contributing most neighbours.
    Reads only ``embeddings.npz`` and ``folds.json``.
    """
    import numpy as np
    import pandas as pd

    from mclstexp_lite import cv, tl

    results_dir = Path(results_dir)
    cfg = json.loads((results_dir / "config.json").read_text())
    patients = cfg["sections"]
    recs = []
    for fold in cv.load_folds(results_dir):
        npz = results_dir / fold.name / "embeddings.npz"
        if not npz.exists():
            continue
        z = np.load(npz)
        secs = z["reference_sections"]
        k = min(cfg["top_k"], len(secs))
        for s in fold.test:
            _, idx = tl.retrieve(z[f"test__{s}"], z["reference"],
                                 np.zeros((len(secs), 1), np.float32), top_k=k,
                                 return_indices=True)
            got = secs[idx].ravel()
            same = np.array([patients[x] == patients[s] for x in secs])
            names, counts = np.unique(got, return_counts=True)
            recs.append({"scheme": cfg["scheme"], "method": cfg["method"], "top_k": k,
                         "test_section": s,
                         "bank_same_patient": float(same.mean()),
                         "neighbours_same_patient": float(same[idx].mean()),
                         "top_source": str(names[np.argmax(counts)]),
                         "top_source_neighbours": float(counts.max() / got.size),
                         "top_source_bank": float(np.mean(secs == names[np.argmax(counts)]))})
    return pd.DataFrame(recs)


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
            try:
                cv.run_cv(adatas, scheme=scheme, method=method, config=config, out_dir=d,
                          top_k=args.top_k, metric=args.metric, overwrite=args.overwrite,
                          progress=args.progress, device=args.device)
                timings[f"{scheme}/{method}"] = time.time() - t0
                log.info("%s/%s done in %.0f s", scheme, method, time.time() - t0)
            except FileExistsError:
                log.info("%s already complete; reading it back", d)
            dirs.append(d)
            if method in ("mclstexp", "bleep"):
                for k in args.extra_top_k:
                    dk = out / scheme / f"{method}_k{k}"
                    try:
                        cv.rescore(adatas, d, top_k=k, metric=args.metric, out_dir=dk,
                                   overwrite=args.overwrite, progress=args.progress,
                                   device=args.device)
                    except FileExistsError:
                        log.info("%s already complete; reading it back", dk)
                    dirs.append(dk)
            from mclstexp_lite.download import atomic_write_json
            atomic_write_json(timings_path, timings)

    table = cv.compare(dirs)
    per_section = cv.compare(dirs, per_section=True)
    (out / "results.csv").write_text(table.to_csv(index=False))
    (out / "per_section.csv").write_text(per_section.to_csv(index=False))
    md = cv.summary_markdown(table)
    (out / "results.md").write_text(md + "\n")
    sections_md = per_section_markdown(per_section)
    (out / "per_section.md").write_text(sections_md + "\n")
    shares = [neighbour_shares(d) for d in dirs
              if d.name in ("mclstexp", "bleep")]
    if shares:
        import pandas as pd

        nb = pd.concat(shares, ignore_index=True)
        (out / "neighbours.csv").write_text(nb.to_csv(index=False))
        nb_md = nb.round(3).to_csv(sep="|", index=False)
    print(md)
    print()
    print(sections_md)
    if shares:
        print("\nsources of the retrieved neighbours (neighbours.csv):\n" + nb_md)
    print(f"\nwall time this invocation: {time.time() - t_start:.0f} s; per run: "
          + json.dumps({k: round(v) for k, v in timings.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
