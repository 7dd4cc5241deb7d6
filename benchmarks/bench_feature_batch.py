"""Frozen-encoder features on the CPU: how many patches per forward pass.

:func:`mclstexp_lite.features.section_features` (cache switched off, so every
repetition computes) on the real patches of one HER2+ section, once per batch size,
repeated in alternating order so that every size sees the same machine load. Reported
per size: patches per second (median over repetitions), the user and system CPU seconds
of this process, and the largest difference from the features of the first size (the
features must not depend on the batch size beyond float rounding).

On a 2-core machine, batches of 64 spent most of their time in the kernel (mapping and
unmapping the large activations), which is why the CPU default is
``features.CPU_BATCH_SIZE``.

Run ``python benchmarks/bench_feature_batch.py [--quick]``; needs ``MCLSTEXP_DATA``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import _common as C


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 spots and one repetition")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--arch", default="efficientnet_lite0",
                    help="an encoder with weights available offline (default: the quick "
                         "profile's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 16, 8, 4, 2],
                    help="batch sizes; the first is the reference for the differences")
    ap.add_argument("--spots", type=int, default=256)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    n_spots = 64 if args.quick else args.spots

    C.header("bench_feature_batch", args)
    threads = C.set_threads(args.threads)
    root = C.need_data([args.section])

    from mclstexp_lite import datasets as dsets
    from mclstexp_lite import features as fx
    from mclstexp_lite import models
    from mclstexp_lite import patches as pt

    adata = dsets.her2st(args.section, data_dir=root, download=False, progress=False)
    patches = np.asarray(pt.patch_cache(adata, progress=False)[:n_spots])
    encoder = models.ImageEncoder(args.arch, weights="imagenet").eval()
    load_before = C.load_average()
    times = {b: [] for b in args.sizes}
    cpu = {b: [0.0, 0.0] for b in args.sizes}
    feats = {}
    for _ in range(args.reps):
        for b in args.sizes:
            t0, c0 = time.perf_counter(), os.times()
            feats[b] = fx.section_features(encoder, patches, device="cpu", batch_size=b,
                                           cache_dir=False, progress=False)
            c1 = os.times()
            times[b].append(time.perf_counter() - t0)
            cpu[b][0] += c1.user - c0.user
            cpu[b][1] += c1.system - c0.system
    ref = feats[args.sizes[0]]
    rows = []
    print(f"{len(patches)} patches of {args.section}, {args.arch}, {threads} threads, "
          f"{args.reps} repetition(s)")
    print(f"{'batch':>6} {'patches/s':>10} {'user s':>8} {'system s':>9} {'max |diff|':>11}")
    for b in args.sizes:
        rate = len(patches) / statistics.median(times[b])
        diff = float(np.abs(feats[b] - ref).max())
        rows.append({"batch_size": b, "patches_per_s": rate, "user_s": cpu[b][0],
                     "system_s": cpu[b][1], "max_abs_diff": diff})
        print(f"{b:>6} {rate:>10.1f} {cpu[b][0]:>8.1f} {cpu[b][1]:>9.1f} {diff:>11.2e}")
    print(f"default on the CPU: batch_size={fx.CPU_BATCH_SIZE}")
    C.emit({"benchmark": "feature_batch", "quick": args.quick, "section": args.section,
            "arch": args.arch, "n_patches": len(patches), "rows": rows,
            "cpu_default": fx.CPU_BATCH_SIZE, "load_before": load_before,
            "load_after": C.load_average(), "machine": C.machine(threads)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
