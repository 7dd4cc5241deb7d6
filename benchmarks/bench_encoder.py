"""Encoder inference: the package's pipeline vs the bare model on prepared tensors.

Pipeline
    :func:`mclstexp_lite.train.embed_images` (projected embeddings, pixel path of a
    trainable encoder) and the feature cache's computation
    (:func:`mclstexp_lite.features.spot_features` with the cache switched off, so every
    repetition computes: the frozen mode's input, and what the first run of the
    tutorials pays once) on a :class:`mclstexp_lite.train.SpotData` of real HER2+ spots:
    each batch is read from the memory-mapped patch cache as uint8, resized to the
    model's input size when that differs from the cached 224 px, normalised, encoded
    and copied back to the CPU.

Model only
    The same model (``eval``, ``torch.no_grad``) on SYNTHETIC float32 tensors of the
    same shape and memory layout as the pipeline hands to the model (checked on one
    batch), already normalised and in memory: ``model.encode_image`` and
    ``model.image_encoder``.

Overhead = pipeline time / model-only time - 1: the median, over ``--reps``
repetitions, of the ratio of one pipeline run and one model-only run made back to back
(in alternating order, so that both see the same machine load); the same ratio in CPU
time (summed over all repetitions) is printed too. It is reported for the
configurations the tutorials use: the ``quick`` profile's EfficientNet-Lite0 at 224 px
(ImageNet weights from its pip package), the paper's architecture (DenseNet-121 at 224 px;
random weights, which run exactly as fast as ImageNet ones) and the old quick profile's
ResNet-18 at 64 px. Goal: overhead <= 10 % (for features: a rate >= 0.9x the model's).

Run ``python benchmarks/bench_encoder.py [--quick]``; needs ``MCLSTEXP_DATA``.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import _common as C

#: (label, TrainConfig profile, model overrides, spots, batch size)
CASES = [
    ("efficientnet_lite0@224 (quick profile)", "quick", {}, {}, 256, 64),
    ("densenet121@224 (paper architecture)", "paper", {"weights": None}, {}, 64, 32),
    ("resnet18@64 (old quick profile)", "paper", {"image_arch": "resnet18", "weights": None},
     {"image_size": 64}, 512, 256),
]


def spots_of(section: str, n: int, cache_dir):
    """SpotData of the first ``n`` spots of a real section (published panel)."""
    from mclstexp_lite import datasets as dsets
    from mclstexp_lite import pp
    from mclstexp_lite import train as tr

    a = dsets.her2st(section, download=False, progress=False)
    parts = {}
    k = 0
    while sum(p.n_obs for p in parts.values()) < n:  # repeat the section if it is short
        take = min(a.n_obs, n - sum(p.n_obs for p in parts.values()))
        parts[f"{section}#{k}"] = a[:take].copy()
        k += 1
    prepared = pp.prepare(parts, pp.published_panel("her2st"), missing="zero")
    return tr.SpotData.from_anndata(prepared, cache_dir=cache_dir, progress=False)


def pipeline_stages(data, encoder, config, idx, size: int, reps: int) -> dict:
    """Where the pipeline's extra time goes, as embed_images / the feature cache do it:
    gather (and, when the model input is smaller than the cache, resize a few spots at a
    time), then normalise; the full-size gather alone, and the resize alone three ways.
    Median milliseconds per batch."""
    import torch

    from mclstexp_lite import _embed as embed
    from mclstexp_lite import features as fx

    gather_resize, normalise, gather = [], [], []
    for _ in range(reps):
        t = C.Timer()
        with t:
            x8 = fx.batch_images(data, idx, size, None, memory_format=torch.channels_last)
        gather_resize.append(t.seconds)
        t = C.Timer()
        with t:
            embed.prepare_images(x8, encoder, config, train=False, generator=None,
                               channels_last=False)
        normalise.append(t.seconds)
        t = C.Timer()
        with t:
            u8 = data.images(idx, memory_format=torch.channels_last)
        gather.append(t.seconds)
    extra = {"gather_and_resize_ms_per_batch": statistics.median(gather_resize) * 1000,
             "normalise_ms_per_batch": statistics.median(normalise) * 1000,
             "full_size_gather_alone_ms_per_batch": statistics.median(gather) * 1000}
    if size != u8.shape[-1]:
        # the resize alone: as the pipeline does it (float32, a few images at a time),
        # the whole batch at once in float32 (before 2026-11-24; same result) and, for
        # comparison, PyTorch's uint8 resize (faster, but up to 1 grey level different)
        import torch.nn.functional as F

        resize = dict(size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        u8_cl = u8
        u8 = u8.contiguous()
        grouped, as_float, as_uint8 = [], [], []
        for _ in range(reps):
            t = C.Timer()
            with t:
                g = fx.resize_u8(u8_cl, size)
            grouped.append(t.seconds)
            t = C.Timer()
            with t:
                a = F.interpolate(u8.float(), **resize).round_().clamp_(0, 255).to(torch.uint8)
            as_float.append(t.seconds)
            assert torch.equal(a, g)
            t = C.Timer()
            with t:
                b = F.interpolate(u8_cl, **resize)
            as_uint8.append(t.seconds)
        extra["resize_grouped_float32_ms_per_batch"] = statistics.median(grouped) * 1000
        extra["old_resize_whole_batch_float32_ms_per_batch"] = statistics.median(as_float) * 1000
        extra["alternative_resize_uint8_ms_per_batch"] = statistics.median(as_uint8) * 1000
        extra["alternative_max_grey_level_diff"] = int((a.int() - b.int()).abs().max())
    return extra


def measure(label, profile, overrides, fields, n_spots, batch, args, timings_out):
    import torch

    from mclstexp_lite import _embed as embed
    from mclstexp_lite import features as fx
    from mclstexp_lite import train as tr

    # mode "full": embed_images then runs the pixels through the encoder every time
    config = tr.TrainConfig.profile(profile, device="cpu", model=overrides, mode="full",
                                    **fields)
    torch.manual_seed(0)
    model = tr.build_model(config, n_genes=785).eval()
    encoder = model.image_encoder
    data = spots_of(args.section, n_spots, args.cache_dir)
    size = encoder.image_size
    # the model-only tensors get the memory layout the pipeline hands to the model (NCHW or
    # channels-last: convolutions run at different speeds), so that only the pipeline differs
    probe = embed.prepare_images(data.images(np.arange(2)), encoder, config, train=False,
                               generator=None, channels_last=False)
    layout = (torch.channels_last if probe.is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)
    g = torch.Generator().manual_seed(1)
    synthetic = [torch.randn((min(batch, n_spots - i), 3, size, size), generator=g)
                 .contiguous(memory_format=layout) for i in range(0, n_spots, batch)]
    # the feature cache always hands the model channels-last input (faster convolutions
    # on a CPU too): its model-only reference gets the same layout
    synthetic_cl = [x.contiguous(memory_format=torch.channels_last) for x in synthetic]

    def pipeline_embed():
        return tr.embed_images(model, data, config=config, device="cpu", batch_size=batch,
                               progress=False)

    def pipeline_features():
        return fx.spot_features(encoder, data, views=1, device="cpu", batch_size=batch,
                                cache_dir=False, progress=False)[0]

    @torch.no_grad()
    def raw_embed():
        return torch.cat([model.encode_image(x).float().cpu() for x in synthetic]).numpy()

    @torch.no_grad()
    def raw_features():
        return torch.cat([model.image_encoder(x).float().cpu() for x in synthetic_cl])

    # warm-up and shape checks
    e, f = pipeline_embed(), pipeline_features()
    assert e.shape == raw_embed().shape and tuple(f.shape) == tuple(raw_features().shape)
    times = {"embed_pipeline": [], "embed_model": [], "features_pipeline": [], "features_model": []}
    cpu = {k: [] for k in times}
    pairs = [("embed_pipeline", pipeline_embed, "embed_model", raw_embed),
             ("features_pipeline", pipeline_features, "features_model", raw_features)]
    for rep in range(args.reps):
        for a_name, a_fn, b_name, b_fn in pairs:
            # back to back, in alternating order, so both see the same load
            for name, fn in ((a_name, a_fn), (b_name, b_fn))[:: 1 if rep % 2 == 0 else -1]:
                t = C.Timer()
                with t:
                    fn()
                times[name].append(t.seconds)
                cpu[name].append(t.cpu_seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    # overhead: median over repetitions of the ratio of each back-to-back pair
    over_e = statistics.median(np.divide(times["embed_pipeline"], times["embed_model"])) - 1
    over_f = statistics.median(np.divide(times["features_pipeline"], times["features_model"])) - 1
    cpu_over_e = sum(cpu["embed_pipeline"]) / sum(cpu["embed_model"]) - 1
    cpu_over_f = sum(cpu["features_pipeline"]) / sum(cpu["features_model"]) - 1
    # where the pipeline's extra time goes, as embed_images / the feature cache do it:
    # gather (and, when the model input is smaller than the cache, resize a few spots
    # at a time), then normalise; and the full-size gather alone, for reference
    extra = pipeline_stages(data, encoder, config, np.arange(min(batch, n_spots)), size,
                            args.reps)
    extra["model_ms_per_batch"] = med["embed_model"] / len(synthetic) * 1000
    print(f"{label}: {n_spots} spots, batch {batch}, {size} px, model input "
          f"{'channels-last' if layout is torch.channels_last else 'NCHW'} (embed_images), "
          "channels-last (features)")
    print(f"  embed_images {med['embed_pipeline']:.2f} s vs model {med['embed_model']:.2f} s -> "
          f"overhead {over_e * 100:+.1f} %")
    print(f"  features (cache computation) {med['features_pipeline']:.2f} s vs model "
          f"{med['features_model']:.2f} s -> overhead {over_f * 100:+.1f} %; "
          f"{n_spots / med['features_pipeline']:.1f} vs {n_spots / med['features_model']:.1f} "
          f"images/s = {1 / (1 + over_f):.2f}x the model's rate")
    print(f"  overhead in CPU time (all repetitions): embed_images {cpu_over_e * 100:+.1f} %, "
          f"features {cpu_over_f * 100:+.1f} %")
    print("  per batch (ms): " + ", ".join(f"{k[:-13]} {v:.1f}" for k, v in extra.items()
                                         if k.endswith("_ms_per_batch")))
    if "alternative_max_grey_level_diff" in extra:
        print(f"  (the uint8 resize differs from the float32 one by at most "
              f"{extra['alternative_max_grey_level_diff']} grey level)")
    timings_out.append({"case": label, "arch": config.model["image_arch"], "image_size": size,
                        "features_rate_vs_model": 1 / (1 + over_f),
                        "spots": n_spots, "batch_size": batch, "median_s": med,
                        "runs_s": times, "runs_cpu_s": cpu,
                        "overhead_embed": over_e, "overhead_features": over_f,
                        "cpu_overhead_embed": cpu_over_e, "cpu_overhead_features": cpu_over_f,
                        "model_input_layout": "channels_last" if layout is torch.channels_last
                        else "nchw", "breakdown": extra})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer spots and one repetition")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--arch", choices=["all", "efficientnet_lite0", "resnet18", "densenet121"],
                    default="all",
                    help="measure only this configuration")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)

    C.header("bench_encoder", args)
    threads = C.set_threads(args.threads)
    load_before = C.load_average()
    C.need_data([args.section])
    results = []
    for label, profile, overrides, fields, n_spots, batch in CASES:
        if args.arch != "all" and not label.startswith(args.arch):
            continue
        if args.quick:
            n_spots, batch = n_spots // 4, batch // 4
        measure(label, profile, overrides, fields, n_spots, batch, args, results)
    worst = max(max(r["overhead_embed"], r["overhead_features"]) for r in results)
    load_after = C.load_average()
    verdict = "met" if worst <= 0.10 else "NOT met"
    print(f"\nworst overhead {worst * 100:+.1f} % (goal <= 10 %: {verdict}); {threads} threads, "
          f"load {load_before} -> {load_after}")
    C.emit({"benchmark": "encoder", "quick": args.quick, "section": args.section,
            "cases": results, "worst_overhead": worst, "goal": 0.10, "goal_met": worst <= 0.10,
            "load_before": load_before, "load_after": load_after, "machine": C.machine(threads)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
