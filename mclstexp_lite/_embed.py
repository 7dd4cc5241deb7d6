"""Embeddings of a trained model: the batched encoder passes used after training.

:func:`embed_images` (image embeddings of every patch: the frozen encoder's cached
features, or the pixels through a trained encoder), :func:`embed_spots` (spot
embeddings, one section at a time for a reference bank) and :func:`prepare_images`
(uint8 patches to the encoder's normalised input, augmented during training), which the
training loop shares. Re-exported by :mod:`mclstexp_lite.train`; retrieval
(:mod:`mclstexp_lite.tl`) starts from these embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from . import features as fx
from . import _inputs as inputs
from . import models as mdl
from ._progress import progress_bar
from ._augment import gpu_augment
from ._config import TrainConfig, autocast_dtype, resolve_device
from ._spotdata import SpotData

__all__ = ["embed_images", "embed_spots", "prepare_images"]


def prepare_images(batch_u8: torch.Tensor, encoder: mdl.ImageEncoder, config, *,
                   train: bool, generator: torch.Generator | None,
                   channels_last: bool) -> torch.Tensor:
    """uint8 NCHW patches -> normalised float input of ``encoder`` (resize to its
    ``image_size``, augment as ``config`` says when ``train``, normalise with its mean
    and std)."""
    size = encoder.image_size
    x = batch_u8
    if x.shape[-1] != size or x.shape[-2] != size:
        # resize first so augmentation works on the (usually smaller) model input
        x = fx.resize_u8(x, size)
    if train and config.augment:
        x = gpu_augment(x, generator=generator, rotation=config.rotation,
                        brightness=config.jitter, contrast=config.jitter,
                        saturation=config.jitter)
        mean = torch.tensor(encoder.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(encoder.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    else:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = mdl.normalize_uint8(x.contiguous(memory_format=fmt), layout="nchw",
                                mean=encoder.mean, std=encoder.std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def embed_images(model: mdl.MclSTExp, data: SpotData, *, config: TrainConfig | None = None,
                 device=None, batch_size: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """Image embeddings ``(N, proj_dim)`` of every patch (no augmentation), float32.

    The input size and normalisation come from the model's image encoder
    (``model.preprocessing``), so the model and the data are all that is needed. A
    frozen encoder's features come from the feature cache (:mod:`mclstexp_lite.features`,
    view 0), computed there once, with the model's input options
    (:func:`mclstexp_lite._inputs.image_inputs`: per-section statistics and neighbourhoods
    over the spots of ``data``); a trained encoder runs on the pixels.

    Parameters
    ----------
    config
        Optional: only its ``device``, ``amp`` and ``channels_last`` are read.
    batch_size
        Spots per step; default 256 for cached features, and for pixels
        :func:`mclstexp_lite.features.default_batch_size` (small on the CPU, where that
        is faster).
    """
    config = config or TrainConfig(device=str(device or "auto"))
    device = resolve_device(device or config.device)
    model = model.to(device).eval()
    if model.image_encoder.freeze:
        feats = inputs.image_inputs(model, data, views=1, device=device, amp=config.amp,
                                    progress=progress)[0]
        batch_size = batch_size or 256
        outs = [model.encode_features(feats[i:i + batch_size].to(device)).float().cpu()
                for i in range(0, len(feats), batch_size)]
        return (torch.cat(outs) if outs else torch.empty((0, model.config["proj_dim"]))).numpy()
    return _batched(model, data, config, device, batch_size or fx.default_batch_size(device),
                    progress, "embedding patches").numpy()


@torch.no_grad()
def embed_spots(model: mdl.MclSTExp, data: SpotData, *, device="auto",
                per_section: bool = True) -> np.ndarray:
    """Spot embeddings ``(N, proj_dim)``.

    The Transformer attends across the spots it is given at once; ``per_section=True``
    encodes each section as one sentence (all its spots together), which is how the
    reference bank is built for retrieval. The expression is what the model reads
    (:func:`mclstexp_lite._inputs.model_expression`).
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    expr = torch.from_numpy(inputs.model_expression(model, data))
    pos = torch.from_numpy(data.pos)
    grp = torch.from_numpy(data.groups)
    if not per_section:
        return model.encode_spot(expr.to(device), pos.to(device), grp.to(device)).float().cpu().numpy()
    outs = []
    for s in range(len(data.sections)):
        sel = torch.nonzero(grp == s).ravel()
        outs.append(model.encode_spot(expr[sel].to(device), pos[sel].to(device),
                                      grp[sel].to(device)).float().cpu())
    return torch.cat(outs).numpy()


@torch.no_grad()
def _batched(model: mdl.MclSTExp, data: SpotData, config: TrainConfig, device, batch_size,
             progress, desc):
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    amp_dtype = autocast_dtype(config.amp, device)
    encoder = model.image_encoder
    outs = []
    idx = np.arange(len(data))
    for i in progress_bar(range(0, len(idx), batch_size), desc=desc, disable=not progress, leave=False):
        b = idx[i:i + batch_size]
        x = prepare_images(fx.batch_images(data, b, encoder.image_size, device,
                                           memory_format=torch.channels_last),
                           encoder, config, train=False, generator=None,
                           channels_last=channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            outs.append(model.encode_image(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty((0, model.config["proj_dim"]))
