#!/usr/bin/env python
"""Does stain normalisation change the results on a held-out section from another source?

Trains the leave-one-section-out fold of ``--test`` (default HER2+ A1: reduced-resolution
image, black background) once per ``--stains`` setting with
:func:`mclstexp_lite.cv.run_cv` (scheme ``section``, that fold only, same profile, seed and
``top_k``): ``none``, or ``macenko`` / ``reinhard`` fitted on the fold's training
sections (:func:`mclstexp_lite._stain.fit_on_sections`) and applied to the training,
reference and held-out patches. Then it tabulates the held-out section's PCC-ACG,
PCC-HEG, MSE and MAE per setting, and each normalised run minus the unnormalised one with
a paired bootstrap over the held-out spots (:func:`mclstexp_lite.metrics.paired_bootstrap`,
``unit="spot"``, seed 0). With ``--montage`` it also saves a picture of held-out patches
before and after each normalisation, with training patches for comparison.

Command of docs/results.md ("Stain normalisation and A1")::

    MCLSTEXP_DATA=../shared/data MCLSTEXP_OFFLINE=1 MCLSTEXP_CACHE=/tmp/mlcache_h2 \\
        .venv/bin/python tools/stain_a1.py --stains none macenko reinhard \\
        --out outputs/stain_a1 --montage /tmp/stain_a1_montage.png

Writes ``<out>/<stain>/<method>/`` (a ``run_cv`` results folder each), ``<out>/stain.csv``,
``<out>/stain.md`` and ``<out>/stain_differences.csv``. A rerun reads finished folders back.
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

_LABELS = {"pcc_acg": "PCC-ACG", "pcc_heg": "PCC-HEG", "mse": "MSE", "mae": "MAE"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6", "A1"],
                   help="HER2+ sections, in the order of docs/results.md's run")
    p.add_argument("--test", default="A1", help="held-out section (its section-scheme fold)")
    p.add_argument("--stains", nargs="+", default=["none", "macenko"],
                   choices=["none", "macenko", "reinhard"])
    p.add_argument("--methods", nargs="+", default=["mclstexp"],
                   choices=["mclstexp", "bleep", "ridge_features", "ridge_color"])
    p.add_argument("--profile", default="quick")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", default="outputs/stain_a1")
    p.add_argument("--montage", default=None, help="PNG path for a before/after picture")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.test not in args.sections:
        p.error(f"--test {args.test} must be one of --sections {args.sections}")
    if "none" not in args.stains:
        p.error("--stains must include 'none' (the unnormalised run every other is compared with)")
    return args


def _dense(X):
    import numpy as np
    from scipy import sparse

    return np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float32)


def montage(adatas, test, train, stains, path, *, n=8):
    """Save held-out patches before/after each normaliser and training patches (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mclstexp_lite import patches as pt
    from mclstexp_lite import _stain as st

    raw = pt.patch_cache(adatas[test], progress=False)
    rows_idx = np.round(np.linspace(0, len(raw) - 1, n)).astype(int)
    panels = [(f"{test} as cut", np.asarray(raw[rows_idx]))]
    for method in stains:
        norm = st.fit_on_sections({s: adatas[s] for s in train}, method)
        panels.append((f"{test} {method}", norm.transform(np.asarray(raw[rows_idx]))))
    for s in train[:2]:
        ref = pt.patch_cache(adatas[s], progress=False)
        idx = np.round(np.linspace(0, len(ref) - 1, n)).astype(int)
        panels.append((f"{s} (training) as cut", np.asarray(ref[idx])))
    fig, axes = plt.subplots(len(panels), n, figsize=(1.6 * n, 1.75 * len(panels)))
    for r, (label, imgs) in enumerate(panels):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"{test} patches (spot rows {rows_idx.tolist()}) before and after stain "
                 f"normalisation fitted on {', '.join(train)}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("stain_a1")
    import anndata as ad
    import pandas as pd
    import torch

    from mclstexp_lite import cv, datasets, pp
    from mclstexp_lite import metrics as mt
    from mclstexp_lite import patches as pt
    from mclstexp_lite.train import TrainConfig

    torch.set_num_threads(args.threads)
    config = TrainConfig.profile(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    genes = pp.published_panel("her2st")
    adatas = {s: pp.prepare(datasets.her2st(s, progress=args.progress), genes) for s in args.sections}
    train = [s for s in args.sections if s != args.test]
    truth = _dense(adatas[args.test].X)

    rows, preds, stats = [], {}, {}
    for stain in args.stains:
        for method in args.methods:
            d = out / stain / method
            t0 = time.time()
            # a complete folder is read back by run_cv, not run again
            cv.run_cv(adatas, scheme="section", method=method, config=config, out_dir=d,
                      folds=[args.test], top_k=args.top_k, progress=args.progress,
                      stain=None if stain == "none" else stain)
            log.info("%s/%s ready in %.0f s", stain, method, time.time() - t0)
            m = pd.read_csv(d / "metrics.csv")
            r = m[m["test_section"] == args.test].iloc[0]
            rows.append({"stain": stain, "method": method,
                         **{k: float(r[k]) for k in _LABELS}, "seconds": float(r["seconds"])})
            preds[stain, method] = _dense(ad.read_h5ad(d / args.test / f"pred_{args.test}.h5ad").X)
            fold_metrics = json.loads((d / args.test / "metrics.json").read_text())
            if "stain" in fold_metrics:  # how many held-out patches were changed
                from mclstexp_lite import _stain as st

                norm = st.StainNormalizer.from_dict(fold_metrics["stain"])
                pt.patch_cache(adatas[args.test], stain=norm, progress=False)
                meta = json.loads(Path(adatas[args.test].uns["mclstexp"]["patches"]["json"]).read_text())
                stats[stain] = {"fingerprint": norm.fingerprint, **meta["stain_stats"]}

    table = pd.DataFrame(rows)
    (out / "stain.csv").write_text(table.to_csv(index=False))
    diffs = []
    if args.n_boot > 0:
        for stain in args.stains:
            if stain == "none":
                continue
            for method in args.methods:
                res = mt.paired_bootstrap({args.test: preds[stain, method]},
                                          {args.test: preds["none", method]},
                                          {args.test: truth}, unit="spot", n_boot=args.n_boot,
                                          seed=0)
                for _, r in res.iterrows():
                    diffs.append({"method": method, "comparison": f"{stain} - none",
                                  "metric": r["metric"], "diff": r["diff"],
                                  "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                  "n_boot": int(r["n_boot"])})
    dtab = pd.DataFrame(diffs)
    (out / "stain_differences.csv").write_text(dtab.to_csv(index=False))

    lines = [f"Held-out {args.test} (section-scheme fold; training and reference: "
             f"{', '.join(train)}), profile {args.profile}, top_k {args.top_k}.", "",
             "| method | stain | PCC-ACG | PCC-HEG | MSE | MAE |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['stain']} | {r['pcc_acg']:.3f} | {r['pcc_heg']:.3f} | "
                     f"{r['mse']:.3f} | {r['mae']:.3f} |")
    if len(dtab):
        lines += ["", f"Normalised minus unnormalised, 95 % paired bootstrap over {args.test}'s "
                  f"spots ({args.n_boot} replicates, seed 0):", "",
                  "| method | comparison | metric | diff [95 % CI] |", "|---|---|---|---|"]
        for _, r in dtab.iterrows():
            lines.append(f"| {r['method']} | {r['comparison']} | {_LABELS[r['metric']]} | "
                         f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] |")
    if stats:
        lines += ["", f"{args.test} patches per normaliser: "
                  + "; ".join(f"{k} ({v['fingerprint']}): {v['normalised']} normalised, "
                              f"{v['low_tissue']} unchanged (little tissue), {v['failed']} "
                              "unchanged (failed)" for k, v in stats.items())]
    md = "\n".join(lines)
    (out / "stain.md").write_text(md + "\n")
    print(md)
    if args.montage:
        montage(adatas, args.test, train, [s for s in args.stains if s != "none"], args.montage)
        print(f"\nmontage: {args.montage}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
