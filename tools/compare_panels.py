"""Compare our HVG panel recipe (pp.select_panel) with the published mclSTExp HER2+ panel.

Run from the repository root with the real data available::

    MCLSTEXP_DATA=../shared/data MCLSTEXP_OFFLINE=1 \\
        python tools/compare_panels.py --sections paper --json panel_comparison.json

Loads the HER2+ sections with ``image="none"`` (counts only), builds panels for a grid
of ``n_top_genes`` and combination rules with :func:`mclstexp_lite.pp.select_panel`,
and prints a Markdown table of each panel's size and its overlap with the 785-gene
published panel (:func:`mclstexp_lite.pp.compare_panels`), plus the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mclstexp_lite import datasets, pp# noqa: E402


def grid(n_sections: int, min_spots: int) -> list[tuple[str, dict]]:
    """(label, select_panel keywords) pairs tried for each n_top_genes."""
    out = [("union", {"how": "union"}),
           ("intersection", {"how": "intersection"})]
    for k in (2, 4, 8, 16):
        if 1 < k < n_sections:
            out.append((f"min_sections={k}", {"min_sections": k}))
    out.append((f"union, min_spots={min_spots}", {"how": "union", "min_spots": min_spots}))
    if 8 < n_sections:
        out.append((f"min_sections=8, min_spots={min_spots}",
                    {"min_sections": 8, "min_spots": min_spots}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", choices=["paper", "all"], default="paper",
                    help="paper: the 32 sections of the mclSTExp paper (A2..G3); all: all 36")
    ap.add_argument("--n-top-genes", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--min-spots", type=int, default=1000,
                    help="detection cut used in the min_spots rows (default 1000)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    names = (datasets.PAPER_HER2ST_SECTIONS if args.sections == "paper"
             else datasets.HER2ST_SECTIONS)
    t0 = time.perf_counter()
    adatas = {s: datasets.her2st(s, image="none", progress=False) for s in names}
    t_load = time.perf_counter() - t0
    published = pp.published_panel("her2st")
    # in how many spots (summed over the sections) each published gene is detected
    detected = {g: 0 for g in published}
    for a in adatas.values():
        nz = np.asarray((a.X > 0).sum(axis=0)).ravel()
        for g, n in zip(a.var_names, nz):
            if g in detected:
                detected[g] += int(n)
    n_det = sorted(detected.values())

    rows = []
    t1 = time.perf_counter()
    for n in args.n_top_genes:
        for label, kw in grid(len(names), args.min_spots):
            t = time.perf_counter()
            panel = pp.select_panel(adatas, n_top_genes=n, **kw)
            cmp = pp.compare_panels(panel, published)
            rows.append({"n_top_genes": n, "rule": label, "n_genes": cmp["n_a"],
                         "overlap": cmp["n_overlap"], "jaccard": round(cmp["jaccard"], 4),
                         "published_covered": round(cmp["frac_b_in_a"], 4),
                         "seconds": round(time.perf_counter() - t, 2)})
    t_select = time.perf_counter() - t1

    print(f"sections: {args.sections} ({len(names)}); published panel: {len(published)} genes")
    print(f"published genes detected in {n_det[0]} to {n_det[-1]} spots (median "
          f"{n_det[len(n_det) // 2]}) summed over these sections")
    print(f"load {t_load:.1f} s, {len(rows)} panels in {t_select:.1f} s\n")
    print("| n_top_genes | rule | genes | overlap with published | jaccard | "
          "published covered |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n_top_genes']} | {r['rule']} | {r['n_genes']} | {r['overlap']} | "
              f"{r['jaccard']:.3f} | {r['published_covered']:.1%} |")
    best = min(rows, key=lambda r: abs(r["n_genes"] - len(published)))
    print(f"\nclosest in size to {len(published)}: n_top_genes={best['n_top_genes']}, "
          f"{best['rule']}: {best['n_genes']} genes, overlap {best['overlap']}")
    if args.json:
        out = {"sections": list(names), "n_published": len(published),
               "published_min_spots_detected": n_det[0],
               "load_seconds": round(t_load, 1), "select_seconds": round(t_select, 1),
               "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
