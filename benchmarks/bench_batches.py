"""Training batch assembly: our patch cache + batch augmentation vs the published per-item way.

Ours
    Patches of every spot are cut once into the on-disk cache
    (:func:`mclstexp_lite.patches.patch_cache`, memory-mapped uint8). A training batch is
    a gather of 128 rows (:meth:`mclstexp_lite.train.SpotData.images`) followed by
    :func:`mclstexp_lite.patches.gpu_augment` on the batch's device (here the CPU unless
    ``--device cuda``), which returns the float32 ``(128, 3, 224, 224)`` tensor in [0, 1].
    Two augmentation settings are timed: ``rotation="any"`` (flips, any-angle rotation,
    colour jitter 0.5/0.5/0.5: the published transform family, the like-for-like
    comparison) and ``rotation="90"`` (the trainer's default).

Reference (re-implemented here after the published mclSTExp training code)
    The full-resolution H&E of each section is held in memory as a PIL image; every
    item crops 224 x 224 px around its spot and applies torchvision
    ``ColorJitter(0.5, 0.5, 0.5)``, ``RandomHorizontalFlip``, ``RandomVerticalFlip``,
    ``RandomRotation(180)`` and ``ToTensor``; a ``torch.utils.data.DataLoader`` with
    ``batch_size=128, shuffle=True, num_workers=0`` collates the items.

Both sides read the same real HER2+ sections (default C2 and C3) in the same process,
alternating round by round so that both see the same machine load. The result is items
per second for each side and their ratio (goal: ours >= 20x the reference), the same
ratio in CPU time per item (less sensitive to other jobs on a shared machine), and a
profile of where each side spends its time.

Run ``python benchmarks/bench_batches.py [--quick]``; needs ``MCLSTEXP_DATA``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import _common as C

CROP = 224


def build_ours(adatas: dict, cache_dir):
    """SpotData over the sections (published HER2+ panel, missing genes zero-filled)."""
    from mclstexp_lite import pp
    from mclstexp_lite import train as tr

    panel = pp.published_panel("her2st")
    prepared = pp.prepare(adatas, panel, missing="zero")
    t0 = time.perf_counter()
    data = tr.SpotData.from_anndata(prepared, cache_dir=cache_dir, progress=False)
    return data, time.perf_counter() - t0


class PublishedStyleDataset:
    """Per-item dataset of the published code: crop the in-memory H&E, PIL transforms.

    Items are dicts with ``image`` (float32 ``(3, 224, 224)`` from ``ToTensor``),
    ``expression`` and ``position``, as the published dataset returns them.
    """

    def __init__(self, images, centers, section_of, expr, pos, transform):
        self.images, self.centers, self.section_of = images, centers, section_of
        self.expr, self.pos, self.transform = expr, pos, transform

    def __len__(self):
        return len(self.centers)

    def crop(self, i):
        cx, cy = (int(np.floor(v + 0.5)) for v in self.centers[i])
        half = CROP // 2
        return self.images[self.section_of[i]].crop((cx - half, cy - half, cx + half, cy + half))

    def __getitem__(self, i):
        import torch

        return {"image": self.transform(self.crop(i)),
                "expression": torch.from_numpy(self.expr[i]),
                "position": torch.from_numpy(self.pos[i])}


def published_transform():
    import torchvision.transforms as T

    return T.Compose([T.ColorJitter(0.5, 0.5, 0.5), T.RandomHorizontalFlip(),
                      T.RandomVerticalFlip(), T.RandomRotation(180), T.ToTensor()])


def build_reference(adatas: dict, data):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the HER2+ images are ~9,300 x 9,900 px
    images, centers, section_of = [], [], []
    t0 = time.perf_counter()
    for k, a in enumerate(adatas.values()):
        lib = next(iter(a.uns["spatial"]))
        path = a.uns["spatial"][lib]["metadata"]["source_image_path"]
        img = Image.open(path)
        img.load()
        images.append(img.convert("RGB"))
        centers.append(np.asarray(a.obsm["spatial"], dtype=float))
        section_of.append(np.full(a.n_obs, k))
    decode_s = time.perf_counter() - t0
    ds = PublishedStyleDataset(images, np.concatenate(centers), np.concatenate(section_of),
                               data.expr, data.pos, published_transform())
    return ds, decode_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    ap.add_argument("--sections", nargs="+", default=["C2", "C3"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds (default 4; quick 1)")
    ap.add_argument("--batches", type=int, default=None,
                    help="batches per side per round (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where ours augments: cpu or cuda")
    ap.add_argument("--cache-dir", default=None, help="patch cache folder (default: the package's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 4)
    per_round = args.batches or (2 if args.quick else 3)

    C.header("bench_batches", args)
    threads = C.set_threads(args.threads)
    load_before = C.load_average()
    C.need_data(args.sections)

    import torch

    from mclstexp_lite import datasets as dsets
    from mclstexp_lite import patches as pt
    from mclstexp_lite import train as tr

    device = tr.resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    adatas = {s: dsets.her2st(s, download=False, progress=False) for s in args.sections}
    data, cache_s = build_ours(adatas, args.cache_dir)
    ref_ds, decode_s = build_reference(adatas, data)
    n = len(data)
    ref_mib = sum(im.width * im.height * 3 for im in ref_ds.images) / 2**20
    cache_mib = sum(p.nbytes for p in data.patches) / 2**20
    print(f"{n} spots in {args.sections}; patch cache ready in {cache_s:.1f} s "
          f"({cache_mib:.0f} MiB on disk, memory-mapped); reference decoded the full images in "
          f"{decode_s:.1f} s and holds {ref_mib:.0f} MiB of them in memory", flush=True)

    bs = args.batch_size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).numpy()
    starts = [i for i in range(0, n - bs + 1, bs)] or [0]
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def ours_batch(k, rotation):
        idx = order[starts[k % len(starts)]:][:bs]
        x = data.images(idx, device=device)
        x = pt.gpu_augment(x, generator=gen, rotation=rotation, brightness=0.5,
                           contrast=0.5, saturation=0.5)
        expr = torch.from_numpy(data.expr[idx]).to(device)
        pos = torch.from_numpy(data.pos[idx]).to(device)
        return x, expr, pos

    ref_batch = reference_batches(ref_ds, bs, args.seed)
    # warm-up: first touches of the memory map, allocator, torchvision imports
    ours_batch(0, "any")
    ours_batch(0, "90")
    ref_batch()

    timers, per_round_ratio = time_rounds(ours_batch, ref_batch, rounds=rounds,
                                          per_round=per_round, bs=bs, sync=sync)
    rate = {name: t.count * bs / t.seconds for name, t in timers.items()}
    ratio_any = rate["ours_any"] / rate["reference"]
    ratio_90 = rate["ours_90"] / rate["reference"]
    cpu_ms = {name: t.cpu_seconds / (t.count * bs) * 1000 for name, t in timers.items()}
    cpu_ratio_any = cpu_ms["reference"] / cpu_ms["ours_any"]
    cpu_ratio_90 = cpu_ms["reference"] / cpu_ms["ours_90"]

    # ------------------------------------------------------------------ profile
    prof = profile(data, ref_ds, order[:bs], device, sync, gen)
    print("\nwhere the time goes (ms per batch of %d):" % bs)
    for side in ("ours", "reference"):
        print(f"  {side}: " + ", ".join(f"{k} {v:.0f}" for k, v in prof[side].items()
                                        if not isinstance(v, bool)))
    same = prof["ours"]["alternative_identical"]
    print(f"  (per-sample jitter bitwise identical to ours: {same})")

    load_after = C.load_average()
    print(f"\nours(any) {rate['ours_any']:.0f} items/s, ours(90) {rate['ours_90']:.0f} items/s, "
          f"reference {rate['reference']:.0f} items/s")
    print(f"ratio ours/reference: {ratio_any:.2f}x like-for-like (rotation any), "
          f"{ratio_90:.2f}x trainer default (rotation 90); goal >= 20x "
          f"({'met' if ratio_any >= 20 else 'NOT met'}); device {device}, {threads} threads, "
          f"load {load_before} -> {load_after}")
    print(f"CPU time per item: ours(any) {cpu_ms['ours_any']:.2f} ms, ours(90) "
          f"{cpu_ms['ours_90']:.2f} ms, reference {cpu_ms['reference']:.2f} ms -> ratio "
          f"{cpu_ratio_any:.2f}x (any), {cpu_ratio_90:.2f}x (90)")
    C.emit({
        "benchmark": "batches", "quick": args.quick, "device": str(device),
        "sections": args.sections, "n_spots": n, "batch_size": bs,
        "batches_per_side": timers["reference"].count,
        "ours_any_items_per_s": rate["ours_any"], "ours_90_items_per_s": rate["ours_90"],
        "reference_items_per_s": rate["reference"],
        "ratio": ratio_any, "ratio_rotation90": ratio_90, "cpu_ms_per_item": cpu_ms,
        "cpu_ratio": cpu_ratio_any, "cpu_ratio_rotation90": cpu_ratio_90,
        "ratio_per_round_min": min(per_round_ratio), "ratio_per_round_max": max(per_round_ratio),
        "ratio_per_round_median": statistics.median(per_round_ratio),
        "goal": 20.0, "goal_met": ratio_any >= 20,
        "profile_ms_per_batch": prof, "patch_cache_s": cache_s, "reference_decode_s": decode_s,
        "patch_cache_mib": cache_mib, "reference_decoded_images_mib": ref_mib,
        "load_before": load_before, "load_after": load_after, "machine": C.machine(threads),
    })
    return 0


def reference_batches(ref_ds, bs: int, seed: int):
    """The reference side's next batch, endlessly: the published DataLoader (shuffled,
    ``num_workers=0``), started again when it runs out."""
    import torch

    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(ref_ds, batch_size=bs, shuffle=True, num_workers=0,
                                         drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    ref_iter = iter(loader)

    def ref_batch():
        nonlocal ref_iter
        try:
            return next(ref_iter)
        except StopIteration:
            ref_iter = iter(loader)
            return next(ref_iter)

    return ref_batch


def time_rounds(ours_batch, ref_batch, *, rounds: int, per_round: int, bs: int, sync):
    """Both sides in alternating rounds (the same machine load for both): the timers
    and the reference / ours ratio of every round."""
    import torch

    timers = {"ours_any": C.Timer(sync), "ours_90": C.Timer(sync), "reference": C.Timer()}
    per_round_ratio = []
    k = 0
    for r in range(rounds):
        before = {name: t.seconds for name, t in timers.items()}
        for _ in range(per_round):
            with timers["ours_any"]:
                x, _, _ = ours_batch(k, "any")
            with timers["ours_90"]:
                ours_batch(k, "90")
            with timers["reference"]:
                b = ref_batch()
            k += 1
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, CROP, CROP)
        assert b["image"].dtype == torch.float32 and tuple(b["image"].shape) == (bs, 3, CROP, CROP)
        spent = {name: t.seconds - before[name] for name, t in timers.items()}
        per_round_ratio.append(spent["reference"] / spent["ours_any"])
        print(f"round {r + 1}/{rounds}: ours(any) {per_round * bs / spent['ours_any']:.0f}, "
              f"ours(90) {per_round * bs / spent['ours_90']:.0f}, reference "
              f"{per_round * bs / spent['reference']:.0f} items/s; load {C.load_average()}",
              flush=True)
    return timers, per_round_ratio


def profile(data, ref_ds, idx, device, sync, gen, reps: int = 3) -> dict:
    """Median milliseconds per batch of each stage, both sides (stages timed alone)."""
    import torch

    from mclstexp_lite import _augment as augment
    from mclstexp_lite import patches as pt

    def ms(fn):
        times = []
        for _ in range(reps):
            t = C.Timer(sync)
            with t:
                fn()
            times.append(t.seconds * 1000)
        return statistics.median(times)

    x8 = data.images(idx, device=device)
    off = dict(brightness=0, contrast=0, saturation=0)
    gather = ms(lambda: data.images(idx, device=device))
    to_float = ms(lambda: pt.gpu_augment(x8, generator=gen, flips=False, rotation=None, **off))
    flips = ms(lambda: pt.gpu_augment(x8, generator=gen, rotation=None, **off))
    rot90 = ms(lambda: pt.gpu_augment(x8, generator=gen, rotation="90", **off))
    rot_any = ms(lambda: pt.gpu_augment(x8, generator=gen, rotation="any", **off))
    full_any = ms(lambda: pt.gpu_augment(x8, generator=gen, rotation="any"))
    ours = {"gather_uint8": gather, "to_float": to_float, "flips": flips - to_float,
            "rotate_90": rot90 - flips, "rotate_any": rot_any - flips,
            "colour_jitter": full_any - rot_any, "total_any": gather + full_any}

    # an alternative for the colour jitter on a CPU, for comparison: one sample at a time
    # (a 224 px sample stays in the cache through the three blends), same draws
    jittered, params = pt.gpu_augment(x8, generator=torch.Generator(device=device).manual_seed(5),
                                      flips=False, rotation=None, return_params=True)
    order, factors = params["order"], params["factors"].to(device)

    def jitter_per_sample():
        z = x8.to(torch.float32).div_(255.0)
        for i in range(len(z)):
            for j in order[i].tolist():
                augment._jitter_op(j, z[i:i + 1], factors[i:i + 1, j])  # the kernel itself
        return z

    ours["alternative_jitter_per_sample"] = ms(jitter_per_sample) - to_float
    ours["alternative_identical"] = bool(torch.equal(jitter_per_sample(), jittered))

    import torchvision.transforms as T

    crops = [ref_ds.crop(int(i)) for i in idx]
    jitter = T.ColorJitter(0.5, 0.5, 0.5)
    hflip, vflip = T.RandomHorizontalFlip(), T.RandomVerticalFlip()
    rotate, to_tensor = T.RandomRotation(180), T.ToTensor()
    items = [ref_ds[int(i)] for i in idx]
    reference = {
        "crop": ms(lambda: [ref_ds.crop(int(i)) for i in idx]),
        "colour_jitter": ms(lambda: [jitter(c) for c in crops]),
        "flips": ms(lambda: [vflip(hflip(c)) for c in crops]),
        "rotate_any": ms(lambda: [rotate(c) for c in crops]),
        "to_tensor": ms(lambda: [to_tensor(c) for c in crops]),
        "collate": ms(lambda: torch.utils.data.default_collate(items)),
    }
    reference["total"] = sum(reference.values())
    return {"ours": {k: v if isinstance(v, bool) else round(v, 1) for k, v in ours.items()},
            "reference": {k: round(v, 1) for k, v in reference.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
