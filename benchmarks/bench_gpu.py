"""GPU training throughput: fp32 vs bf16 + channels-last, and the trainer vs the bare model.

Needs a CUDA device; without one it prints why and exits with status 2 (``--smoke-cpu``
runs every code path on the CPU at toy sizes, to check the script itself; its numbers
mean nothing).

1. Model-only training steps. The paper's model (``MclSTExp(785)``, DenseNet-121 at
   224 px, random weights, which train as fast as ImageNet ones), Adam, batch 128, on
   SYNTHETIC tensors already on the device (normalised images, expression, positions):
   forward, symmetric contrastive loss, backward, optimiser step. Two settings:
   ``fp32`` (NCHW, no autocast; PyTorch's default TF32 flags, printed) and ``bf16 +
   channels_last`` (autocast to bfloat16, channels-last model and images), which is
   what the trainer uses on CUDA. Reported: steps/s, spots/s and the peak memory
   (``torch.cuda.max_memory_allocated``) of each.
2. End to end. :func:`mclstexp_lite.train.train` with the ``paper`` profile (bf16,
   channels-last, on-device augmentation with flips, quarter turns and colour jitter)
   on a SYNTHETIC patch cache (uint8 patches saved as ``.npy`` and memory-mapped, as
   :func:`mclstexp_lite.patches.patch_cache` returns them), or on real HER2+ sections
   with ``--sections``. Its spots/s in the last epoch (the first one warms up) divided
   by the model-only bf16 + channels-last spots/s is the trainer's efficiency; goal
   >= 0.9.

For batch assembly alone on the GPU versus the published per-item CPU pipeline, run
``python benchmarks/bench_batches.py --device cuda``.

Run ``python benchmarks/bench_gpu.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C


def model_only(device, *, amp: bool, channels_last: bool, batch: int, size: int,
               genes: int, warmup: int, steps: int, seed: int = 0) -> dict:
    import torch

    from mclstexp_lite import models as mdl

    torch.manual_seed(seed)
    model = mdl.MclSTExp(genes, weights=None).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn((batch, 3, size, size), generator=g, device=device)
    images = images.contiguous(memory_format=fmt)
    expr = torch.rand((batch, genes), generator=g, device=device)
    pos = torch.randint(0, 30, (batch, 2), generator=g, device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(images, expr, pos)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - t0
    assert torch.isfinite(loss).item()
    out = {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
           "spots_per_s": steps * batch / seconds,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    del model, opt, images
    if cuda:
        torch.cuda.empty_cache()
    return out


def synthetic_spotdata(n: int, size: int, genes: int, folder: Path, seed: int = 0):
    """SYNTHETIC SpotData: random uint8 patches saved as .npy and memory-mapped."""
    from mclstexp_lite import train as tr

    rng = np.random.default_rng(seed)
    halves = [n // 2, n - n // 2]
    patches = []
    for k, m in enumerate(halves):
        path = folder / f"synthetic_{k}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(m, size, size, 3))
        for i in range(0, m, 256):
            arr[i:i + 256] = rng.integers(0, 256, arr[i:i + 256].shape, dtype=np.uint8)
        arr.flush()
        del arr
        patches.append(np.load(path, mmap_mode="r"))
    return tr.SpotData(patches=patches, expr=rng.random((n, genes), dtype=np.float32),
                       pos=rng.integers(0, 30, (n, 2)), groups=np.repeat([0, 1], halves),
                       sections=["synthetic_0", "synthetic_1"],
                       genes=[f"g{i}" for i in range(genes)], obs_names=[f"s{i}" for i in range(n)])


def real_spotdata(sections, cache_dir):
    from mclstexp_lite import datasets as dsets
    from mclstexp_lite import pp
    from mclstexp_lite import train as tr

    C.need_data(sections)
    adatas = {s: dsets.her2st(s, download=False, progress=False) for s in sections}
    prepared = pp.prepare(adatas, pp.published_panel("her2st"), missing="zero")
    return tr.SpotData.from_anndata(prepared, cache_dir=cache_dir, progress=False)


def trainer_rate(data, device, *, batch: int, size: int, epochs: int, smoke: bool) -> dict:
    import torch

    from mclstexp_lite import train as tr

    over = dict(epochs=epochs, batch_size=batch, image_size=size, device=str(device),
                model={"weights": None})
    if smoke:  # exercise the CUDA settings' code paths on the CPU
        over.update(amp="bf16", channels_last=True)
    config = tr.TrainConfig.profile("paper", **over)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = tr.train(data, config, progress=False)
    last = result.history[-1]
    return {"epochs": epochs, "spots": len(data), "spots_per_s_last_epoch": last["spots_per_s"],
            "spots_per_s_per_epoch": [h["spots_per_s"] for h in result.history],
            "amp": config.amp, "channels_last": config.channels_last,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda" else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and spots")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; quick 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10; quick 3)")
    ap.add_argument("--spots", type=int, default=None,
                    help="synthetic spots for the trainer (default 24 batches; quick 8)")
    ap.add_argument("--epochs", type=int, default=3, help="trainer epochs (the last is timed)")
    ap.add_argument("--sections", nargs="*", default=None,
                    help="train on these real HER2+ sections instead of synthetic patches")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check the script on the CPU at toy sizes (numbers are meaningless)")
    args = ap.parse_args(argv)
    C.header("bench_gpu", args)

    import torch

    smoke = args.smoke_cpu
    if smoke:
        device = torch.device("cpu")
        args.batch_size, args.image_size, args.genes = 4, 32, 50
        args.steps, args.warmup, args.spots, args.epochs = 2, 1, 12, 2
        C.set_threads(2)
    else:
        if not torch.cuda.is_available():
            msg = ("bench_gpu needs a CUDA GPU, and torch.cuda.is_available() is False here "
                   f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a "
                   "machine with an NVIDIA GPU; use --smoke-cpu only to check the script.")
            print(msg, file=sys.stderr)
            C.emit({"benchmark": "gpu", "skipped": msg,
                    "machine": C.machine(torch.get_num_threads())})
            return 2
        device = torch.device(args.device)
        if device.type != "cuda":
            raise SystemExit(f"--device must be a CUDA device, got {args.device!r}")
        if not torch.cuda.is_bf16_supported():
            raise SystemExit(f"{torch.cuda.get_device_name(device)} does not support bfloat16")
    steps = args.steps or (10 if args.quick else 30)
    warmup = args.warmup or (3 if args.quick else 10)
    n_spots = args.spots or args.batch_size * (8 if args.quick else 24)
    load_before = C.load_average()
    tf32 = {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    common = dict(batch=args.batch_size, size=args.image_size, genes=args.genes,
                  warmup=warmup, steps=steps)

    fp32 = model_only(device, amp=False, channels_last=False, **common)
    bf16 = model_only(device, amp=True, channels_last=True, **common)
    speedup = bf16["spots_per_s"] / fp32["spots_per_s"]
    for name, r in (("fp32", fp32), ("bf16 + channels_last", bf16)):
        mem = f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else ""
        print(f"model only, {name}: {r['steps_per_s']:.2f} steps/s, "
              f"{r['spots_per_s']:.0f} spots/s{mem}")
    print(f"bf16 + channels_last speed-up over fp32: {speedup:.2f}x (TF32 flags {tf32})")

    with tempfile.TemporaryDirectory() as tmp:
        if args.sections:
            data = real_spotdata(args.sections, args.cache_dir)
        else:
            data = synthetic_spotdata(n_spots, 224 if not smoke else args.image_size,
                                      args.genes, Path(tmp))
        trainer = trainer_rate(data, device, batch=args.batch_size, size=args.image_size,
                               epochs=args.epochs, smoke=smoke)
        del data
    efficiency = trainer["spots_per_s_last_epoch"] / bf16["spots_per_s"]
    print(f"trainer end to end: {trainer['spots_per_s_last_epoch']:.0f} spots/s in epoch "
          f"{args.epochs} ({trainer['spots']} spots); / model only bf16 = {efficiency:.2f} "
          f"(goal >= 0.9: {'met' if efficiency >= 0.9 else 'NOT met'})")
    if smoke:
        print("SMOKE RUN ON THE CPU: the code paths work; the numbers mean nothing.")
    C.emit({
        "benchmark": "gpu", "smoke_cpu": smoke, "quick": args.quick, "device": str(device),
        "batch_size": args.batch_size, "image_size": args.image_size, "genes": args.genes,
        "model_only_fp32": fp32, "model_only_bf16_channels_last": bf16,
        "bf16_speedup": speedup, "tf32": tf32, "trainer": trainer,
        "ratio": efficiency, "goal": 0.9, "goal_met": efficiency >= 0.9,
        "load_before": load_before, "load_after": C.load_average(),
        "machine": C.machine(torch.get_num_threads()),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
