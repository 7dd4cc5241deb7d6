#!/usr/bin/env python
"""Choose the quick profile's learning rate and epochs: leave-one-section-out retrieval
scores of frozen-feature training, at several epochs of one run per fold.

For every learning rate in ``--lrs`` and every held-out section, one model is trained
with ``TrainConfig.profile(--profile, lr=..., epochs=max(--epochs))`` on the other
sections; after each epoch listed in ``--epochs`` the held-out section is predicted by
retrieval (``--top-k``) and scored. Prints and writes (``--out``) one row per
(lr, epochs, section) and the mean over sections.

    MCLSTEXP_DATA=../shared/data .venv/bin/python tools/sweep_quick.py \\
        --lrs 1e-4 3e-4 1e-3 --epochs 5 10 20 40 --out outputs/sweep_quick.csv

Note: the folds are the same ones the results page reports, so a setting chosen here
is slightly favoured on them; the grid is kept small for that reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["A1", "B4", "C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--epochs", nargs="+", type=int, default=[5, 10, 20, 40])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--feature-views", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/sweep_quick.csv")
    args = ap.parse_args(argv)

    import pandas as pd

    from mclstexp_lite import datasets, _inputs as inputs, metrics, pp, tl, train
    from mclstexp_lite._util import atomic_write_text

    genes = pp.published_panel("her2st")
    prepared = {s: pp.prepare(datasets.her2st(s, progress=False), genes) for s in args.sections}
    single = {s: train.SpotData.from_anndata({s: a}, progress=False) for s, a in prepared.items()}
    rows = []
    stops = sorted(set(args.epochs))
    for lr in args.lrs:
        for test in args.sections:
            over = {"lr": lr, "epochs": stops[-1], "seed": args.seed}
            if args.batch_size:
                over["batch_size"] = args.batch_size
            if args.feature_views:
                over["feature_views"] = args.feature_views
            cfg = train.TrainConfig.profile(args.profile, **over)
            data = train.SpotData.from_anndata(
                {s: a for s, a in prepared.items() if s != test}, progress=False)
            import torch

            torch.manual_seed(cfg.seed)
            model = train.build_model(cfg, data.n_genes)

            def score(epoch, history, model=model, data=data, test=test, lr=lr):
                if epoch not in stops:
                    return
                model.eval()
                keys = train.embed_spots(model, data)
                q = train.embed_images(model, single[test], progress=False)
                pred = tl.retrieve(q, keys, inputs.model_expression(model, data),
                                   top_k=args.top_k)
                m = metrics.section_metrics(pred, single[test].expr)
                rows.append({"lr": lr, "epochs": epoch, "test": test,
                             "pcc_acg": m["pcc_acg"], "pcc_heg": m["pcc_heg"], "mse": m["mse"],
                             "loss": history[-1]["loss"],
                             "train_seconds": sum(h["seconds"] for h in history)})
                model.train()

            t0 = time.time()
            train.train(data, cfg, model=model, progress=False, callback=score)
            print(f"lr {lr:g} test {test}: {time.time() - t0:.1f} s; "
                  + ", ".join(f"e{r['epochs']} {r['pcc_heg']:.3f}" for r in rows
                              if r["lr"] == lr and r["test"] == test), flush=True)
    df = pd.DataFrame(rows)
    atomic_write_text(Path(args.out), df.to_csv(index=False))
    mean = df.groupby(["lr", "epochs"])[["pcc_acg", "pcc_heg", "mse", "loss",
                                         "train_seconds"]].mean()
    print(mean.round(4).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
