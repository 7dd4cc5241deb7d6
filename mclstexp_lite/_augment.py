"""Training batches on the device: gather cached patch rows, then augment them there.

A training step reads its patches from the memory-mapped patch cache
(:func:`mclstexp_lite.patches.patch_cache`) with :func:`to_torch_batch` (one gather of
``uint8`` rows, in pinned memory for a CUDA device) and augments the whole batch on its
device with :func:`gpu_augment` (flips, rotations, colour jitter; every sample its own
draws from one generator). No PIL and no per-item work: the cache already holds the
patches at the model's input size.

Both are re-exported by :mod:`mclstexp_lite.patches`, where users find them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = ["gpu_augment", "to_torch_batch"]


# --------------------------------------------------------------------------------------
# gathering a batch
# --------------------------------------------------------------------------------------
def _as_index(idx, n: int, name: str = "idx") -> np.ndarray:
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{name} must be a 1-D sequence of integer row numbers, got {arr.dtype} {arr.shape}.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} holds row numbers outside 0..{n - 1}: min {arr.min()}, max {arr.max()}.")
    return arr


def _check_patch_array(patches) -> None:
    if not isinstance(patches, np.ndarray) or patches.ndim != 4 or patches.shape[3] != 3:
        raise TypeError(
            "patches must be a numpy array (n, height, width, 3), e.g. from patch_cache(), got "
            f"{type(patches).__name__} {getattr(patches, 'shape', '')}."
        )
    if patches.dtype != np.uint8:
        raise TypeError(f"patches must have dtype uint8, got {patches.dtype}.")


def to_torch_batch(patches, idx, *, device=None) -> torch.Tensor:
    """Gather patch rows into a ``uint8`` NCHW tensor, optionally on a device.

    Rows are read in ascending order (sequential reads from a memory-mapped cache) and
    written straight into their batch position, so the batch keeps the order of
    ``idx``. For a CUDA device the batch is assembled in pinned host memory and copied
    asynchronously.

    Parameters
    ----------
    patches
        ``uint8`` array ``(n, H, W, 3)``, typically the memory map from
        :func:`patch_cache`.
    idx
        1-D integer row numbers (numpy array, list or tensor); repeats allowed.
    device
        Target device (``"cuda"``, a ``torch.device``...). ``None`` keeps the batch on
        the CPU.

    Returns
    -------
    torch.Tensor
        ``uint8`` tensor of shape ``(len(idx), 3, H, W)``. Its memory is channels-last
        (a permuted view of NHWC rows); call ``.contiguous()`` if a kernel needs NCHW
        memory.

    Raises
    ------
    TypeError
        If ``patches`` or ``idx`` have the wrong type or dtype.
    ValueError
        If ``idx`` holds row numbers outside ``0..n-1``.
    """
    _check_patch_array(patches)
    idx = _as_index(idx, len(patches))
    device = torch.device(device) if device is not None else None
    pin = device is not None and device.type == "cuda" and torch.cuda.is_available()
    n, (h, w, c) = len(idx), patches.shape[1:]
    if pin:
        buf = torch.empty((n, h, w, c), dtype=torch.uint8, pin_memory=True)
        dest = buf.numpy()
    else:
        dest = np.empty((n, h, w, c), dtype=np.uint8)
        buf = torch.from_numpy(dest)
    for pos in np.argsort(idx, kind="stable"):
        dest[pos] = patches[idx[pos]]
    batch = buf
    if device is not None and device.type != "cpu":
        batch = buf.to(device, non_blocking=pin)
    return batch.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------
# batch augmentation
# --------------------------------------------------------------------------------------
def _grayscale(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, the weights torchvision and PIL use.
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _jitter_op(j: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Apply colour operation ``j`` in place to ``x`` (a gathered copy), factors ``f``."""
    f = f.view(-1, 1, 1, 1)
    if j == 0:  # brightness: blend with black
        return x.mul_(f).clamp_(0.0, 1.0)
    if j == 1:  # contrast: blend with the mean grey level of the image
        target = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    else:  # saturation: blend with the grey version of the image
        target = _grayscale(x)
    return x.mul_(f).add_(target.mul_(1.0 - f)).clamp_(0.0, 1.0)


def _rotate_any(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle (counter-clockwise, degrees).

    Nearest-neighbour sampling, zeros (black) outside the source, output the same size:
    the behaviour of ``torchvision.transforms.v2.functional.rotate`` with its defaults,
    vectorised over per-sample angles.
    """
    n, _, h, w = x.shape
    theta = torch.deg2rad(degrees.to(device=x.device, dtype=torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    c, s = cos.view(n, 1, 1), sin.view(n, 1, 1)
    src_x = (c * gx - s * gy) / (0.5 * w)
    src_y = (s * gx + c * gy) / (0.5 * h)
    grid = torch.stack((src_x, src_y), dim=-1)
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _jitter_range(strength, name: str) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) or strength < 0:
        raise ValueError(f"{name} must be a non-negative number, got {strength!r}.")
    return float(strength)


def gpu_augment(
    batch,
    *,
    generator=None,
    flips=True,
    rotation="90",
    brightness=0.5,
    contrast=0.5,
    saturation=0.5,
    return_params=False,
):
    """Randomly flip, rotate and colour-jitter a batch of patches on its own device.

    Every sample gets its own random draws; all of them come from ``generator`` (on its
    device, CPU by default), so the draws depend only on the generator's state, not on
    the batch's device.

    Parameters
    ----------
    batch
        ``uint8`` tensor ``(N, 3, H, W)`` (values 0..255), e.g. from
        :func:`to_torch_batch`; a floating tensor is taken as already in [0, 1].
    generator
        ``torch.Generator`` for the random draws; ``None`` uses torch's global generator.
    flips
        Flip each sample horizontally and vertically, each with probability 0.5.
    rotation
        ``"90"`` (default): rotate each sample by a random multiple of 90 degrees. With
        the flips this draws uniformly from the 8 symmetries of the square, which moves
        pixels without interpolation or empty corners. ``"any"``: rotate by an angle
        uniform in [-180, 180) degrees, as ``RandomRotation(180)`` in the published
        mclSTExp training code: nearest-neighbour, corners filled with black, size kept.
        ``None``: no rotation. ``"90"`` needs square patches.
    brightness, contrast, saturation
        Colour-jitter strengths as in ``torchvision.transforms.ColorJitter``: each
        sample's factor is uniform in ``[max(0, 1 - s), 1 + s]``; 0 turns the operation
        off. Defaults 0.5, as the published code (hue is not jittered). The three are
        applied in a random order per sample, with torchvision's definitions (blend with
        black, with the mean grey level, with the grey image; clamped to [0, 1]).
    return_params
        Also return the draws, for inspection and tests.

    Returns
    -------
    torch.Tensor or (torch.Tensor, dict)
        ``float32`` ``(N, 3, H, W)`` in [0, 1] on the batch's device; with
        ``return_params`` also a dict of CPU tensors: ``hflip``, ``vflip`` (bool, N),
        ``k90`` (number of counter-clockwise quarter turns, N) or ``angle`` (degrees, N),
        ``factors`` (N, 3: brightness, contrast, saturation) and ``order`` (N, 3:
        operation indices in the order applied). Geometry is applied first
        (horizontal flip, vertical flip, rotation), colour after.

    Raises
    ------
    TypeError
        If ``batch`` is not a 4-D tensor with 3 channels.
    ValueError
        If ``rotation`` or a jitter strength is invalid, or ``rotation="90"`` is asked
        for non-square patches.
    """
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        raise TypeError(
            "batch must be a (N, 3, H, W) tensor, e.g. from to_torch_batch(), got "
            f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}."
        )
    if batch.dtype != torch.uint8 and not batch.is_floating_point():
        raise TypeError(f"batch must be uint8 (0..255) or floating point (0..1), got {batch.dtype}.")
    if rotation not in ("90", "any", None):
        raise ValueError(f"rotation must be '90', 'any' or None, got {rotation!r}.")
    if rotation == "90" and batch.shape[2] != batch.shape[3]:
        raise ValueError(
            f"rotation='90' needs square patches, got {batch.shape[2]} x {batch.shape[3]}; use rotation='any' or None."
        )
    strengths = [
        _jitter_range(brightness, "brightness"),
        _jitter_range(contrast, "contrast"),
        _jitter_range(saturation, "saturation"),
    ]

    n = batch.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=gen_device).cpu()

    # Draw everything up front, always the same amount, in a fixed order.
    hflip = uniform(n) < 0.5
    vflip = uniform(n) < 0.5
    rot_u = uniform(n)
    lows = torch.tensor([max(0.0, 1.0 - s) for s in strengths])
    highs = torch.tensor([1.0 + s for s in strengths])
    factors = lows + (highs - lows) * uniform(n, 3)
    order = torch.argsort(uniform(n, 3), dim=1)
    params = {"hflip": hflip, "vflip": vflip, "factors": factors, "order": order}
    if not flips:
        params["hflip"] = hflip = torch.zeros(n, dtype=torch.bool)
        params["vflip"] = vflip = torch.zeros(n, dtype=torch.bool)

    dev = batch.device
    if rotation == "90":
        params["k90"] = k90 = torch.clamp((rot_u * 4).long(), max=3)
    else:
        k90 = torch.zeros(n, dtype=torch.long)
    # Each sample's flips and quarter turns are one symmetry of the square: move every
    # sample once, group by group.
    code = hflip.long() * 8 + vflip.long() * 4 + k90
    if bool((code == 0).all()):
        x = batch
    else:
        x = torch.empty_like(batch)
        for c in torch.unique(code).tolist():
            sel = torch.nonzero(code == c).flatten().to(dev)
            part = batch[sel]
            if c & 8:
                part = part.flip(-1)
            if c & 4:
                part = part.flip(-2)
            if c & 3:
                part = torch.rot90(part, c & 3, dims=(-2, -1))
            x[sel] = part
    if batch.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    else:
        x = x.to(torch.float32, copy=x is batch)
    if rotation == "any":
        angle = rot_u * 360.0 - 180.0
        params["angle"] = angle
        x = _rotate_any(x, angle)

    active = [s > 0 for s in strengths]
    if any(active):
        order_dev, factors_dev = order.to(dev), factors.to(dev)
        for stage in range(3):
            for j in range(3):
                if not active[j]:
                    continue
                sel = torch.nonzero(order_dev[:, stage] == j).flatten()
                if sel.numel():
                    x[sel] = _jitter_op(j, x[sel], factors_dev[sel, j])
    if return_params:
        return x, params
    return x
