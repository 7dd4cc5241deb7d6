"""Colour and stain statistics (the ``ridge_color`` baseline's input): ours vs per patch.

Ours
    :func:`mclstexp_lite._baselines.color_features`: R, G, B statistics from each
    channel's 256-bin histogram, H, E, D from a tabulated ``rgb2hed``, patches spread over
    a few threads.
Reference
    The plain computation it replaced, per batch of 128 patches: ``skimage.color.rgb2hed``
    on the float image, then ``numpy`` mean, standard deviation and percentiles over the
    pixels of each patch.

Both run on the patch caches of real HER2+ sections (1,539 spots for the seven sections
available offline; the caches are cut first if missing), back to back in alternating
order, ``--reps`` times; the result is the median time of each side, their ratio and the
largest absolute difference between the two feature tables.

Run ``python benchmarks/bench_color_features.py [--quick]``; needs ``MCLSTEXP_DATA``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import _common as C

SECTIONS = ["A1", "B4", "C2", "C3", "C4", "C5", "C6"]
_PERCENTILES = (10, 50, 90)


def reference(patches, batch_size: int = 128) -> np.ndarray:
    """The per-batch NumPy/scikit-image computation (the package's code before
    2026-11-30, same columns)."""
    from skimage.color import rgb2hed

    n = patches.shape[0]
    out = np.empty((n, 30), dtype=np.float64)
    for start in range(0, n, batch_size):
        rgb = np.asarray(patches[start:start + batch_size]).astype(np.float64) / 255.0
        b = rgb.shape[0]
        hed = rgb2hed(rgb.reshape(-1, 1, 3)).reshape(rgb.shape)
        chans = np.concatenate([rgb, hed], axis=-1).reshape(b, -1, 6)
        pct = np.percentile(chans, _PERCENTILES, axis=1)
        out[start:start + b] = np.concatenate(
            [chans.mean(axis=1), chans.std(axis=1)] + [pct[i] for i in range(3)], axis=1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two sections, one repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for both sides (ours spreads patches over them)")
    args = ap.parse_args(argv)
    C.header("bench_color_features", args)
    threads = C.set_threads(args.threads)
    load_before = C.load_average()
    sections = SECTIONS[2:4] if args.quick else SECTIONS
    reps = 1 if args.quick else args.reps
    C.need_data([s for s in sections if s != "A1"])  # A1: the reduced image is enough

    from mclstexp_lite import _baselines as bl
    from mclstexp_lite import datasets as dsets
    from mclstexp_lite import patches as pt

    caches = [pt.patch_cache(dsets.her2st(s, download=False, progress=False), progress=False)
              for s in sections]
    n = sum(len(p) for p in caches)
    ours_t, ref_t = [], []
    worst = 0.0
    for rep in range(reps):
        order = ("ours", "ref") if rep % 2 == 0 else ("ref", "ours")
        got = {}
        for side in order:
            t0 = time.perf_counter()
            if side == "ours":
                got[side] = [bl.color_features(p, threads=threads) for p in caches]
            else:
                got[side] = [reference(p) for p in caches]
            (ours_t if side == "ours" else ref_t).append(time.perf_counter() - t0)
        worst = max(worst, max(float(np.abs(a - b).max())
                               for a, b in zip(got["ours"], got["ref"])))
    ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
    print(f"{n} patches of {len(sections)} sections ({', '.join(sections)}), {threads} threads")
    print(f"  ours      {ours_s:7.2f} s  ({n / ours_s:,.0f} patches/s)")
    print(f"  reference {ref_s:7.2f} s  ({n / ref_s:,.0f} patches/s)")
    print(f"  ratio     {ref_s / ours_s:.1f}x faster; largest difference {worst:.1e}")
    C.emit({"bench": "bench_color_features", "sections": sections, "patches": n,
            "reps": reps, "ours_s": ours_s, "reference_s": ref_s,
            "speedup": ref_s / ours_s, "max_abs_diff": worst,
            "load_before": load_before, "load_after": C.load_average(),
            "machine": C.machine(threads)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
