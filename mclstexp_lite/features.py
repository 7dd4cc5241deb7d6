"""Frozen image features, computed once and cached on disk (the field's frozen-encoder path).

A frozen image encoder (``freeze_image=True``, the ``quick`` profile's
EfficientNet-Lite0 with ImageNet weights) gives the same features for a patch every
time, so they are computed once and reused by training (``TrainConfig.mode="frozen"``),
by retrieval and by the ``ridge_features`` linear probe. This is how HEST-Benchmark and
STP-Bench compare models: one frozen encoder, cached features, heads on top.

Feature cache
-------------
One entry per (section's patch-cache entry, encoder, exact weights, input size and
normalisation, view, precision) in ``<cache>/features/`` beside the patch cache
(``$MCLSTEXP_CACHE`` or the per-user cache folder):

- ``<key>.npy``: float32 ``(n_spots, feature_dim)``, row ``i`` the patch of row ``i`` of
  the section's patch array;
- ``<key>.json``: the identity (below) plus ``n_spots``, ``feature_dim``, seconds,
  images/s, creation time and package version. Written last: an entry without it is
  incomplete.

The identity holds the patch entry (its cache key, which already encodes the source
image's sha256, the spot set and the patch geometry, and its creation time; or the
sha256 of the pixels for arrays that are not whole cache entries), the encoder name and
its construction arguments (``encoder_kwargs``), the sha256 of its weights
(:meth:`mclstexp_lite.models.ImageEncoder.fingerprint`, so other weights, a fine-tuned
backbone or another random seed never reuse an entry), the input size, mean and std, the
view, the device type and the precision. The key is a hash of the identity; on a
hit the stored identity and the array's shape are checked again, and an entry that does
not match or cannot be read is refused with a warning and recomputed, never used.

Views
-----
``view`` 0 is the patch as cut; views 1-7 are the other elements of the dihedral group
(quarter turns, then the same after a horizontal flip). ``TrainConfig.feature_views=n``
caches views ``0..n-1`` and picks one at random per spot and epoch during training (a
cheap augmentation in feature space); prediction always uses view 0.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, download
from ._device import autocast_dtype, resolve_device
from ._progress import progress_bar
from ._util import atomic_write, atomic_write_json, safe_name
from ._image_encoder import normalize_uint8
from ._encoders import EncoderSpec, get_spec, lite_weights_path, registry_table

log = logging.getLogger(__name__)

__all__ = [
    "N_VIEWS",
    "resize_u8",
    "batch_images",
    "apply_view",
    "patch_identity",
    "section_features",
    "default_batch_size",
    "CPU_BATCH_SIZE",
    "ACCELERATOR_BATCH_SIZE",
    "spot_features",
    "cached_array",
    "safe_name",
    "default_cache_dir",
    "EncoderSpec",
    "get_spec",
    "registry_table",
    "lite_weights_path",
]

#: Number of dihedral views (4 quarter turns x optional flip).
N_VIEWS = 8
_FORMAT = 1

#: Images resized together by :func:`resize_u8` on the CPU. Each image is resized on
#: its own, so the result does not depend on this; a few at a time keep the float32
#: copy in the processor's cache (the whole batch at once took 3x longer on a CPU,
#: ``benchmarks/bench_encoder.py``).
_RESIZE_GROUP = 8


# ------------------------------------------------------------------ pixels
def resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 NCHW batch, rounded back to uint8.

    Computed in float32 (the same numbers on every device); on the CPU in groups of
    :data:`_RESIZE_GROUP` images, bitwise equal to resizing the whole batch at once.
    """
    def one(part):
        part = part.to(torch.float32, memory_format=torch.contiguous_format)
        return F.interpolate(part, size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False).round_().clamp_(0, 255)

    if x.device.type != "cpu":
        return one(x).to(torch.uint8)
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], _RESIZE_GROUP):
        out[i:i + _RESIZE_GROUP] = one(x[i:i + _RESIZE_GROUP])
    return out


def batch_images(data, idx: np.ndarray, size: int, device, *,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 batch of spots ``idx`` of ``data`` (a ``SpotData``) at ``size``, NCHW shape.

    On the CPU, when the cached patches must be resized, a few spots are gathered and
    resized at a time, so no full-size copy of the batch is made; the result is bitwise
    what :func:`resize_u8` gives for the whole gathered batch.
    """
    cached = data.patches[0].shape[1] if len(data.patches) else size
    on_cpu = device is None or torch.device(device).type == "cpu"
    if cached == size or not on_cpu:
        return data.images(idx, device=device, memory_format=memory_format)
    idx = np.asarray(idx, dtype=np.int64)
    out = torch.empty((len(idx), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(idx), _RESIZE_GROUP):
        part = data.images(idx[i:i + _RESIZE_GROUP], memory_format=torch.channels_last)
        out[i:i + _RESIZE_GROUP] = resize_u8(part, size)
    return out


def apply_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """Dihedral view ``view`` (0-7) of an NCHW batch: a horizontal flip for views 4-7,
    then ``view % 4`` quarter turns counter-clockwise. View 0 returns ``x`` itself."""
    view = _check_view(view)
    if view >= 4:
        x = torch.flip(x, dims=(-1,))
    if view % 4:
        x = torch.rot90(x, k=view % 4, dims=(-2, -1))
    return x


def _check_view(view) -> int:
    if isinstance(view, bool) or not isinstance(view, (int, np.integer)) or not 0 <= view < N_VIEWS:
        raise ValueError(f"view must be an integer from 0 to {N_VIEWS - 1}, got {view!r}.")
    return int(view)


def _views(views) -> list[int]:
    """``views``: a count ``n`` (views ``0..n-1``) or an explicit list of view ids."""
    if isinstance(views, (int, np.integer)) and not isinstance(views, bool):
        if not 1 <= views <= N_VIEWS:
            raise ValueError(f"views must be a count from 1 to {N_VIEWS} (or a list of view "
                             f"ids), got {views!r}.")
        return list(range(int(views)))
    out = [_check_view(v) for v in views]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"views must be distinct view ids, got {list(views)!r}.")
    return out


# ---------------------------------------------------------------- identity
def default_cache_dir() -> Path:
    """``<mclstexp_lite.download.cache_dir()>/features`` (beside the patch cache)."""
    return download.cache_dir() / "features"


def patch_identity(patches) -> str:
    """What a section's patch array is, for the feature cache key.

    A whole patch-cache memory map (:func:`mclstexp_lite.patches.patch_cache`) is named
    by its cache key and creation time (the key encodes the image's sha256, the spots and
    the geometry); any other array, including a slice or a reordering of an entry (which
    keeps the entry's file name), by the sha256 of its pixels and shape.
    """
    fn = getattr(patches, "filename", None)
    if fn and getattr(patches, "flags", None) is not None and patches.flags.c_contiguous:
        meta_path = Path(fn).with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        # a C-contiguous view with as many rows as the entry is the entry itself
        if (isinstance(meta, dict) and meta.get("key") and Path(fn).stem == meta["key"]
                and len(patches) == meta.get("n_spots")):
            return f"patch-cache:{meta['key']}:{meta.get('created', '')}"
    arr = np.ascontiguousarray(np.asarray(patches))
    h = hashlib.sha256(f"{arr.dtype}|{arr.shape}|".encode())
    h.update(memoryview(arr).cast("B"))
    return f"pixels:{h.hexdigest()}"


# ---------------------------------------------------------------- compute
#: Patches per forward pass when ``batch_size`` is not given. On the CPU small batches
#: are much faster: EfficientNet-Lite0 ran 82.8 patches/s in batches of 4 against 31.2 in
#: batches of 64, which spent 18.3 s in the kernel against 0.1 s (187 C2 patches, 2
#: cores; ``python benchmarks/bench_feature_batch.py``). The features agree up to float
#: rounding (a batch of one patch takes another convolution path: 5e-7).
CPU_BATCH_SIZE = 4
ACCELERATOR_BATCH_SIZE = 64


def default_batch_size(device) -> int:
    """Patches per forward pass on ``device`` when none is given (:data:`CPU_BATCH_SIZE`
    on the CPU, :data:`ACCELERATOR_BATCH_SIZE` on CUDA/MPS)."""
    return CPU_BATCH_SIZE if resolve_device(device).type == "cpu" else ACCELERATOR_BATCH_SIZE


@torch.inference_mode()
def _compute(encoder, patches, view: int, device: torch.device, batch_size: int, amp_dtype,
             progress: bool, desc: str) -> np.ndarray:
    n = len(patches)
    size = encoder.image_size
    out = np.empty((n, encoder.out_dim), dtype=np.float32)
    for i in progress_bar(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        u8 = torch.from_numpy(np.array(patches[i:i + batch_size]))  # a writable copy
        u8 = u8.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW (channels-last)
        if u8.shape[-1] != size or u8.shape[-2] != size:
            u8 = resize_u8(u8, size)
        u8 = apply_view(u8.to(device, non_blocking=True), view)
        x = normalize_uint8(u8, layout="nchw", mean=encoder.mean, std=encoder.std)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out[i:i + len(x)] = encoder(x).float().cpu().numpy()
    return out


def section_features(encoder, patches, *, view: int = 0, device="auto",
                     batch_size: int | None = None, cache_dir: str | os.PathLike | None = None, name: str | None = None,
                     amp: str = "auto", progress: bool = True) -> np.ndarray:
    """Pooled features of one section's patches through ``encoder``, cached on disk.

    Parameters
    ----------
    encoder
        :class:`mclstexp_lite.models.ImageEncoder` (its input size, normalisation and
        weights define the features).
    patches
        uint8 ``(n, H, W, 3)`` patches of one section, normally a patch-cache memory map.
    view
        Dihedral view 0-7 (:func:`apply_view`); 0 is the patch as cut.
    device
        Where to compute (``"auto"``: cuda > mps > cpu).
    batch_size
        Patches per forward pass (speed and memory only); default
        :func:`default_batch_size` of ``device``.
    cache_dir
        Folder of the entries; default :func:`default_cache_dir`. ``False`` disables the
        cache (compute only).
    name
        Section name, used in the file name only.
    amp
        ``"auto"`` (bf16 on CUDA devices that support it), ``"bf16"`` or ``"off"``;
        recorded in the identity.
    progress
        Progress bar while computing.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, encoder.out_dim)`` (a read-only memory map when cached).
    """
    view = _check_view(view)
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer))
                                   or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if getattr(patches, "ndim", None) != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise ValueError("patches must be a uint8 (n, H, W, 3) array (a patch-cache entry), got "
                         f"{getattr(patches, 'dtype', type(patches).__name__)} "
                         f"{getattr(patches, 'shape', '')}.")
    device = resolve_device(device)
    batch_size = int(batch_size) if batch_size is not None else default_batch_size(device)
    amp_dtype = autocast_dtype(amp, device)
    was_training = encoder.training
    encoder = encoder.to(device).eval()
    identity = {
        "format": _FORMAT,
        "patches": patch_identity(patches),
        "n_spots": int(len(patches)),
        "encoder": encoder.arch,
        "encoder_kwargs": json.dumps(encoder.encoder_kwargs or {}, sort_keys=True),
        "weights_sha256": encoder.fingerprint(),
        "image_size": int(encoder.image_size),
        "mean": [float(v) for v in encoder.mean],
        "std": [float(v) for v in encoder.std],
        "pre_pool_relu": bool(getattr(encoder, "pre_pool_relu", False)),
        "view": view,
        "device_type": device.type,
        "precision": "bf16" if amp_dtype is not None else "fp32",
    }
    label = name or "section"
    desc = f"features {label} ({encoder.arch}, view {view})"

    def compute():
        return _compute(encoder, patches, view, device, batch_size, amp_dtype, progress, desc)

    try:
        return cached_array(identity, compute, dim=encoder.out_dim, cache_dir=cache_dir,
                            label=f"{safe_name(label)}_{safe_name(encoder.arch)}_{encoder.image_size}px_v{view}",
                            extra={"device": str(device)})
    finally:
        encoder.train(was_training)


def cached_array(identity: dict, compute, *, dim: int, cache_dir=None, label: str = "x",
                 extra: dict | None = None, dtype=np.float32) -> np.ndarray:
    """A ``(identity["n_spots"], dim)`` array of ``dtype`` from the feature cache, or computed.

    ``identity`` (JSON-able, with ``n_spots``) names what the array is; its hash is the
    entry's key, ``<label>_<hash>``. On a hit the stored identity, dtype and shape are
    checked; an entry that does not match or cannot be read is refused with a warning and
    recomputed. ``compute()`` returns the array; it is written atomically (``.npy`` then
    ``.json``). ``cache_dir=False`` computes without caching.
    """
    if cache_dir is False:
        return compute()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    key = f"{label}_{digest}"
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    cached = _open(npy, meta_path, identity, dim, np.dtype(dtype))
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    out = np.ascontiguousarray(compute(), dtype=dtype)
    secs = time.perf_counter() - t0
    if out.shape != (identity["n_spots"], dim):
        raise RuntimeError(f"computed {out.shape} for cache entry {key}, expected "
                           f"{(identity['n_spots'], dim)}")

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, out)

    meta_path.unlink(missing_ok=True)
    atomic_write(npy, write, suffix=".npy")
    atomic_write_json(meta_path, {
        **identity, **(extra or {}), "key": key, "feature_dim": int(dim),
        "seconds": round(secs, 3),
        "images_per_s": round(len(out) / secs, 2) if secs > 0 else None,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    log.info("cached %d x %d features (%s) in %s: %.1f s", len(out), dim, label, npy, secs)
    return out


def _open(npy: Path, meta_path: Path, identity: dict, dim: int,
          dtype=np.dtype(np.float32)) -> np.ndarray | None:
    """A matching entry, or ``None`` (absent, or refused with a warning)."""
    if not meta_path.exists():
        if npy.exists():
            log.warning("feature cache entry %s has no %s (an interrupted write); recomputing",
                        npy, meta_path.name)
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        stored = {k: meta.get(k) for k in identity}
        if stored != identity:
            diff = sorted(k for k in identity if stored.get(k) != identity[k])
            log.warning("feature cache entry %s was computed for other inputs (%s); it is not "
                        "used, recomputing", npy, ", ".join(diff))
            return None
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        log.warning("cannot read feature cache entry %s (%s); recomputing", npy, err)
        return None
    if arr.dtype != dtype or arr.shape != (identity["n_spots"], dim):
        log.warning("feature cache entry %s holds %s %s, expected %s %s; recomputing",
                    npy, arr.dtype, arr.shape, dtype, (identity["n_spots"], dim))
        return None
    return arr


def spot_features(encoder, data, *, views: int | Sequence[int] = 1, device="auto",
                  batch_size: int | None = None, cache_dir=None, amp: str = "auto",
                  progress: bool = True) -> torch.Tensor:
    """Features of every spot of ``data`` (a ``SpotData``) for each view, from the cache.

    Returns
    -------
    torch.Tensor
        float32 ``(n_views, len(data), encoder.out_dim)`` on the CPU; ``[v, i]`` is the
        feature of spot ``i`` under the ``v``-th requested view.
    """
    views = _views(views)
    out = torch.empty((len(views), len(data), encoder.out_dim), dtype=torch.float32)
    offset = 0
    for s, patches in enumerate(data.patches):
        n = len(patches)
        for vi, view in enumerate(views):
            feats = section_features(encoder, patches, view=view, device=device,
                                     batch_size=batch_size, cache_dir=cache_dir,
                                     name=data.sections[s], amp=amp, progress=progress)
            out[vi, offset:offset + n].numpy()[...] = feats
        offset += n
    return out
