"""Train one leave-one-section-out fold with a profile and compare held-out retrieval
with chance.

    MCLSTEXP_DATA=../shared/data python tools/quick_fold.py --test C3 --profile quick

Chance is measured two ways on the same trained model: (1) retrieval from a reference
bank whose embeddings are shuffled relative to their expression (same expression
values, random matching), averaged over 20 shuffles; (2) the held-out rank of each
patch's own spot among all spots of the section (chance: the middle).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6"])
    ap.add_argument("--test", default="C3")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="TrainConfig overrides of the profile, VALUE as JSON, e.g. "
                         "expr_norm='\"center\"' feature_views=4 epochs=40")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from mclstexp_lite import datasets, _inputs as inputs, metrics, pp, tl, train

    genes = pp.published_panel("her2st")
    ad = {s: pp.prepare(datasets.her2st(s, progress=False), genes) for s in args.sections}
    tr_data = train.SpotData.from_anndata({s: a for s, a in ad.items() if s != args.test},
                                          progress=False)
    te_data = train.SpotData.from_anndata({args.test: ad[args.test]}, progress=False)
    over = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            over[key] = json.loads(value)
        except ValueError:
            over[key] = value  # a bare string, e.g. expr_norm=center
    cfg = train.TrainConfig.profile(args.profile, seed=args.seed, **over)
    t0 = time.time()
    res = train.train(tr_data, cfg, progress=False)
    train_s = time.time() - t0
    keys = train.embed_spots(res.model, tr_data)
    q = train.embed_images(res.model, te_data, config=cfg, progress=False)
    bank = inputs.model_expression(res.model, tr_data)  # what retrieval averages
    pred = tl.retrieve(q, keys, bank, top_k=args.top_k)
    got = metrics.section_metrics(pred, te_data.expr)
    rng = np.random.default_rng(args.seed)
    shuffled = [metrics.section_metrics(tl.retrieve(q, keys[rng.permutation(len(keys))], bank,
                                              top_k=args.top_k), te_data.expr)
                for _ in range(20)]
    own = train.embed_spots(res.model, te_data)
    sim = q @ own.T
    ranks = (sim > np.diag(sim)[:, None]).sum(1)
    out = {
        "profile": args.profile, "overrides": over, "test": args.test, "train_sections": tr_data.sections,
        "n_train_spots": len(tr_data), "epochs": cfg.epochs, "train_seconds": round(train_s, 1),
        "loss_first_last": [round(res.history[0]["loss"], 3), round(res.history[-1]["loss"], 3)],
        "top_k": args.top_k,
        "pcc_acg": round(got["pcc_acg"], 4), "pcc_heg": round(got["pcc_heg"], 4),
        "shuffled_pcc_acg_mean": round(float(np.mean([s["pcc_acg"] for s in shuffled])), 4),
        "shuffled_pcc_acg_max": round(float(np.max([s["pcc_acg"] for s in shuffled])), 4),
        "shuffled_pcc_heg_mean": round(float(np.mean([s["pcc_heg"] for s in shuffled])), 4),
        "shuffled_pcc_heg_max": round(float(np.max([s["pcc_heg"] for s in shuffled])), 4),
        "median_rank_own_spot": float(np.median(ranks)), "n_test_spots": len(ranks),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
