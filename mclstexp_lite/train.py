"""The contrastive trainer: the loop and its command line.

Reads top to bottom like a small training script: a :class:`TrainConfig` (the paper's
defaults, or a named profile of :data:`PROFILES` as overrides of the same code path), the
data (:class:`SpotData`: cached uint8 patches plus expression, positions and section
ids), the model (:class:`mclstexp_lite.models.MclSTExp`), the optimiser and the loop.

On CUDA the loop uses bf16 autocast, channels-last images, pinned host memory and
augments uint8 batches on the device (:func:`mclstexp_lite.patches.gpu_augment`); no
PIL work happens per item. A checkpoint (one dict: model, optimiser, config, epoch,
history, RNG states) is written atomically after an epoch once ``checkpoint_every``
seconds have passed since the last one, after the last epoch, and when an epoch's
callback raises; ``resume=True`` continues an
interrupted run and, on CPU with a fixed seed, reaches exactly the weights of an
uninterrupted run, because every epoch's randomness is derived from ``(seed, epoch)``.

Multi-GPU: run the same code under ``torchrun --nproc_per_node N``; :func:`train`
notices the process group (``WORLD_SIZE`` > 1), wraps the model in
``DistributedDataParallel`` and gives each rank its share of every epoch's batches.

The pieces live in their own modules and are re-exported here, so ``ml.train.<name>``
keeps working: :mod:`~mclstexp_lite._config` (:class:`TrainConfig`, :data:`PROFILES`,
:func:`resolve_device`, :func:`autocast_dtype`, :func:`input_size_of`),
:mod:`~mclstexp_lite._spotdata` (:class:`SpotData`), :mod:`~mclstexp_lite._checkpoint`
(:data:`CHECKPOINT`, :func:`load_checkpoint`, :func:`load_model`, :func:`build_model`,
:func:`run_mismatch`, :func:`same_run`...) and
:mod:`~mclstexp_lite._embed` (:func:`embed_images`, :func:`embed_spots`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import datasets as ds
from . import features as fx
from . import _inputs as inputs, pp
from . import tl
from . import models as mdl
from ._progress import progress_bar
from ._util import atomic_write_json
from ._checkpoint import (CHECKPOINT, build_model, load_checkpoint, load_model, run_identity,
                         run_mismatch, same_run, save_checkpoint)
from ._config import PROFILES, TrainConfig, autocast_dtype, input_size_of, resolve_device
from ._embed import embed_images, embed_spots, prepare_images
from ._spotdata import SpotData
from ._checkpoint import save_checkpoint

__all__ = ["TrainConfig", "PROFILES", "SpotData", "TrainResult", "train", "main",
           "resolve_device", "autocast_dtype", "input_size_of", "CHECKPOINT",
           "load_checkpoint", "load_model", "build_model", "same_run", "run_identity",
           "run_mismatch", "embed_images", "embed_spots", "save_checkpoint",
           "CHECKPOINT_EVERY_S"]

log = logging.getLogger(__name__)

#: Default of ``train(checkpoint_every=...)``: seconds between checkpoints. Writing one
#: (model, optimiser, fsync) took about 0.3 s on a 2-core machine, as long as one of the
#: quick profile's epochs: after every epoch, 6.7 s of its 16 s of training.
CHECKPOINT_EVERY_S = 30.0


# ========================================================================= the loop
def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_batches(n: int, config: TrainConfig, epoch: int, rank: int, world: int):
    g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    bs = config.batch_size
    batches = [perm[i:i + bs] for i in range(0, n, bs)]
    batches = [b for b in batches if len(b) >= config.min_batch]
    if world > 1:  # every rank gets the same number of batches
        per = len(batches) // world
        batches = batches[rank * per:(rank + 1) * per]
    return batches


@dataclass
class TrainResult:
    model: mdl.MclSTExp
    history: list
    out_dir: Path | None
    config: TrainConfig


def train(data: SpotData, config: TrainConfig | None = None, *,
          out_dir: str | os.PathLike | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True,
          callback: Callable[[int, list], None] | None = None,
          model: mdl.MclSTExp | None = None,
          checkpoint_every: float = CHECKPOINT_EVERY_S) -> TrainResult:
    """Train mclSTExp on ``data``.

    Parameters
    ----------
    data
        Training spots (:class:`SpotData`).
    config
        :class:`TrainConfig`; default the paper profile.
    out_dir
        Folder for ``checkpoint.pt`` and ``history.json``. ``None`` keeps everything in
        memory.
    resume
        Continue from ``out_dir/checkpoint.pt`` if it exists (its config, sections and
        genes must match the ones given).
    overwrite
        Start afresh even though ``out_dir`` holds a checkpoint (it is replaced by the
        first new one). Without ``resume`` or ``overwrite`` an existing checkpoint is an
        error: earlier results are never silently replaced.
    progress
        One progress bar over the whole run (every batch of every epoch, with the epoch
        and its running loss), and a log line per epoch; the bar is off where
        ``MCLSTEXP_PROGRESS=0`` (unattended notebook runs).
    callback
        Called as ``callback(epoch, history)`` after each epoch (1-based), e.g. to plot.
    model
        Train this model instead of building one from ``config.model``.
    checkpoint_every
        Seconds: after an epoch, the checkpoint is written when at least this long has
        passed since the last one (0: after every epoch). It is always written after the
        last epoch and when ``callback`` raises (e.g. a ``KeyboardInterrupt``), so an
        interrupted run loses at most this long plus one epoch. Each write of the quick
        profile's checkpoint took about 0.3 s, as long as one of its epochs.

    Returns
    -------
    TrainResult
        The trained model (eval mode, on the training device), per-epoch history, the
        output folder and the config.
    """
    config = (config or TrainConfig()).validate()
    if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float))
            or not checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be 0 or more seconds, got {checkpoint_every!r}")
    device = resolve_device(config.device)
    rank, world = _dist_info()
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    start_epoch, history = 0, []
    ckpt = None
    if ckpt_path is not None and ckpt_path.exists():
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            why = run_mismatch(ckpt, config, sections=data.sections, genes=data.genes,
                               finished=False)
            if why is not None:
                raise ValueError(f"{ckpt_path} cannot be resumed: {why}. Resume with the "
                                 "same config and data, or use another out_dir (or "
                                 "overwrite=True to start afresh).")
            start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        elif not overwrite:
            raise FileExistsError(
                f"{ckpt_path} already exists. Pass resume=True to continue that run, "
                "overwrite=True to start afresh, or choose another out_dir.")
    if model is None:
        torch.manual_seed(config.seed)  # same initial weights for the same seed (and on every rank)
        model = build_model(config, data.n_genes) if ckpt is None else load_model(ckpt)
    elif ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if inputs.options_of(model) != inputs.options_of(config):
        raise ValueError(f"the model reads other inputs {inputs.options_of(model)} than the "
                         f"config says {inputs.options_of(config)}; build the model from the "
                         "config (train.build_model) or pass matching TrainConfig options")
    if model.config["n_genes"] != data.n_genes:
        raise ValueError(f"model expects {model.config['n_genes']} genes, data has {data.n_genes}")
    tl.check_gene_order(getattr(model, "genes", None), data.genes,
                        "the model was trained on", "the training data has")
    model.genes = [str(g) for g in data.genes]  # what a reference must match, name by name
    max_pos = int(data.pos.max()) if len(data) else 0
    if model.spot_encoder is not None and max_pos >= model.config["n_pos"]:
        raise ValueError(f"array coordinates reach {max_pos} but the model's position tables "
                         f"have n_pos={model.config['n_pos']} rows; set "
                         f"config.model['n_pos'] to at least {max_pos + 1}")

    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(config.amp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel: same update, one pass over the parameters (1.6x faster per step on
    # a 2-core CPU for the quick profile's heads and spot Transformer)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    if ckpt is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    bank = None
    if config.mode == "frozen" and world > 1:
        raise ValueError("mode='frozen' trains only small heads on cached features; run it in "
                         "one process, not under torchrun")
    if config.mode == "frozen":
        if not model.image_encoder.freeze:
            raise ValueError("mode='frozen' needs a model whose image encoder is frozen "
                             "(MclSTExp(..., freeze_image=True)); build it with build_model")
        # the frozen encoder's cached features, with the model's input options
        # (per-section standardisation, neighbourhood, wide crop: mclstexp_lite._inputs)
        bank = inputs.image_inputs(model, data, views=config.feature_views, device=device,
                                   amp=config.amp, progress=progress and rank == 0)
    size = model.image_encoder.image_size

    expr_all = torch.from_numpy(inputs.model_expression(model, data))
    pos_all = torch.from_numpy(data.pos)
    groups_all = torch.from_numpy(data.groups)
    pin = device.type == "cuda"
    per_epoch = len(_epoch_batches(len(data), config, start_epoch, rank, world))
    bar = progress_bar(total=per_epoch * max(config.epochs - start_epoch, 0), desc="training",
                       unit="batch", leave=False, progress=progress and rank == 0)
    saved_epoch, last_save = start_epoch, time.monotonic()

    def save(done: int) -> None:
        nonlocal saved_epoch, last_save
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, config=config,
                        epoch=done, history=history, genes=data.genes, sections=data.sections)
        atomic_write_json(out / "history.json", history)
        saved_epoch, last_save = done, time.monotonic()

    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout etc.: resumable
        aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
        aug_gen.manual_seed(config.seed * 7_919 + epoch)
        view_gen = torch.Generator().manual_seed(config.seed * 6_007 + epoch)
        batches = _epoch_batches(len(data), config, epoch, rank, world)
        net.train()
        t0, seen, total = time.time(), 0, 0.0
        for b in batches:
            bt = torch.from_numpy(b)
            expr = expr_all[bt]
            pos = pos_all[bt]
            grp = groups_all[bt]
            if pin:
                expr, pos, grp = expr.pin_memory(), pos.pin_memory(), grp.pin_memory()
            expr = expr.to(device, non_blocking=True)
            pos = pos.to(device, non_blocking=True)
            grp = grp.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                if bank is None:  # "full": pixels through the whole model
                    imgs = prepare_images(fx.batch_images(data, b, size, device),
                                           model.image_encoder, config, train=True,
                                           generator=aug_gen, channels_last=channels_last)
                    loss = net(imgs, expr, pos, grp)["loss"]
                else:  # "frozen": the encoder's cached features of one view per spot
                    view = (torch.randint(len(bank), (len(b),), generator=view_gen)
                            if len(bank) > 1 else torch.zeros(len(b), dtype=torch.long))
                    feats = bank[view, bt].to(device, non_blocking=True)
                    loss = net(None, expr, pos, grp, features=feats)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(
                    f"loss became {lv} at epoch {epoch + 1}; lower lr (now {config.lr}) or "
                    "check the expression values for outliers")
            total += lv * len(b)
            seen += len(b)
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs}, loss "
                                f"{total / max(seen, 1):.4f}", refresh=False)
        secs = time.time() - t0
        rec = {"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": secs,
               "spots_per_s": seen * world / secs if secs > 0 else float("nan"),
               "lr": config.lr}
        history.append(rec)
        if progress and rank == 0:
            log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs, rec["loss"], secs)
        if ckpt_path is not None and rank == 0:
            if epoch + 1 == config.epochs or time.monotonic() - last_save >= checkpoint_every:
                save(epoch + 1)
        if callback is not None:
            try:
                callback(epoch + 1, history)
            except BaseException:
                if ckpt_path is not None and rank == 0 and saved_epoch != epoch + 1:
                    save(epoch + 1)  # keep what is finished
                raise
    bar.close()
    if world > 1:
        # gradients are all-reduced every step, but batch-norm running statistics are
        # updated from each rank's own last batch: take rank 0's so all ranks agree
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    model.eval()
    return TrainResult(model=model, history=history, out_dir=out, config=config)


# ============================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Train one fold from the command line; works under ``torchrun`` for several GPUs.

    One GPU or CPU::

        python -m mclstexp_lite.train --sections B4 C2 C3 C4 C5 C6 --test C3 \\
            --profile quick --out runs/quick_C3

    Several GPUs on one machine (one process per GPU; gradients are averaged)::

        torchrun --nproc_per_node 4 -m mclstexp_lite.train --profile paper \\
            --sections A2 A3 ... G3 --test B1 --out runs/paper_B1
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mclstexp_lite.train",
                                 description="Train mclSTExp on all sections except --test.")
    ap.add_argument("--dataset", default="her2st")
    ap.add_argument("--sections", nargs="+", required=True)
    ap.add_argument("--test", default=None, help="section left out of training")
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="output folder (checkpoint, history)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S,
                    metavar="SECONDS",
                    help="write the checkpoint after an epoch once this many seconds have "
                         "passed since the last one (0: every epoch; always after the last)")
    args = ap.parse_args(argv)
    if args.checkpoint_every < 0:
        ap.error(f"--checkpoint-every must be 0 or more seconds, got {args.checkpoint_every}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    over = {"seed": args.seed, "device": device}
    if args.epochs is not None:
        over["epochs"] = args.epochs
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    config = TrainConfig.profile(args.profile, **over)
    genes = pp.published_panel(args.dataset)
    names = [s for s in args.sections if s != args.test]
    adatas = {s: pp.prepare(ds.load(args.dataset, s, progress=False), genes) for s in names}
    data = SpotData.from_anndata(adatas, progress=_dist_info()[0] == 0)
    res = train(data, config, out_dir=args.out, resume=args.resume,
                checkpoint_every=args.checkpoint_every)
    if _dist_info()[0] == 0:
        print(json.dumps(res.history[-1]))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
