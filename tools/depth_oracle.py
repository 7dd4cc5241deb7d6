#!/usr/bin/env python
"""How much of PCC-ACG / PCC-HEG is sequencing depth? A diagnostic for docs/results.md.

For every section, a "depth oracle" predicts every gene at a spot as the spot's log total
count (``log1p`` of the raw counts over its whole transcriptome, the very number
``pp.prepare`` divides by) and is scored like any method (``metrics.section_metrics``). Then,
for every results folder given (``--runs``), the correlation across spots between a
method's mean predicted expression (over the panel) and the spot's log total count, per
held-out section: how much a method's predictions follow depth.

    MCLSTEXP_DATA=../shared/data MCLSTEXP_OFFLINE=1 .venv/bin/python tools/depth_oracle.py \\
        --runs outputs/study/patient/mclstexp outputs/study/patient/ridge_color
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["A1", "B4", "C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--runs", nargs="*", default=[], help="run_cv results folders")
    args = ap.parse_args(argv)

    import numpy as np

    import run_results as rr
    from mclstexp_lite import datasets, metrics, pp

    genes = pp.published_panel("her2st")
    prepared, depth = {}, {}
    for s in args.sections:
        raw = datasets.her2st(s, progress=False)
        a = pp.prepare(raw, genes)
        prepared[s] = a
        depth[s] = np.log1p(np.asarray(raw[a.obs_names].X.sum(axis=1), dtype=np.float64).ravel())
    print("| section | median counts per spot | depth oracle PCC-ACG | PCC-HEG |")
    print("|---|---|---|---|")
    acg, heg = [], []
    for s, a in prepared.items():
        X = rr._dense_f32(a.X)
        pred = np.repeat(depth[s][:, None], X.shape[1], axis=1).astype(np.float32)
        m = metrics.section_metrics(pred, X)
        acg.append(m["pcc_acg"])
        heg.append(m["pcc_heg"])
        print(f"| {s} | {np.median(np.expm1(depth[s])):.0f} | {m['pcc_acg']:.3f} | "
              f"{m['pcc_heg']:.3f} |")
    print(f"| mean | | {np.mean(acg):.3f} | {np.mean(heg):.3f} |")
    for d in args.runs:
        preds = rr.load_predictions(d, prepared)
        r = {s: float(np.corrcoef(p.mean(axis=1), depth[s])[0, 1]) for s, p in preds.items()}
        print(f"\n{d}: correlation of the mean prediction with log depth, per section: "
              + ", ".join(f"{s} {v:+.2f}" for s, v in r.items())
              + f"; mean {np.mean(list(r.values())):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
