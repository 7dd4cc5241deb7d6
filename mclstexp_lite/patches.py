"""H&E patch extraction at a physical scale, and an on-disk patch cache.

mclSTExp encodes the H&E image under every spot with a DenseNet-121 that takes a
224 x 224 px patch. The published code cuts those patches at the full resolution of the
HER2+ images, where 224 px covers about 155 um of tissue. Here patches are cut at a
fixed *physical* width (``patch_um``) instead, so that a reduced-resolution image (HER2+
A1) or a Visium image at another scale yields patches that show the same amount of
tissue; every crop is then resized to the model's input size.

Cropping a JPEG per training item is slow (decode, crop, resize for every spot and every
epoch). :func:`patch_cache` therefore decodes each source image once, stores all patches
of a section as one ``uint8`` array ``(n_spots, out_size, out_size, 3)`` in a ``.npy``
file and returns it memory-mapped; a training batch is then a gather of rows
(:func:`to_torch_batch`), and augmentation runs on the batch on the device
(:func:`gpu_augment`).

Conventions
-----------
- Centres are ``(x, y)`` pixel coordinates of the source image (``adata.obsm['spatial']``),
  pixel ``(x, y)`` being the pixel whose centre lies at that coordinate. A centre is
  rounded half up to a pixel; the crop is the ``crop_px x crop_px`` window whose pixel
  ``(crop_px // 2, crop_px // 2)`` is that pixel.
- Parts of a crop outside the image are filled with ``pad_value`` (white by default:
  the background of an H&E slide is white, so padding looks like empty glass).
- Resizing uses PIL's bilinear filter, which widens its support when shrinking (an
  area-like, antialiased reduction) and is a plain bilinear interpolation when enlarging.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import numbers
import os
import re
import secrets
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_PATCH_UM",
    "PatchDataset",
    "crop_size_px",
    "extract_patches",
    "gpu_augment",
    "patch_cache",
    "to_torch_batch",
]

logger = logging.getLogger(__name__)

#: Microns per pixel of the full-resolution HER2+ H&E images: legacy ST spots are
#: 200 um apart centre to centre and about 290 px apart in those images.
_HER2ST_FULLRES_UM_PER_PX = 200.0 / 290.0

#: Default tissue width of a patch in microns: 224 px at the full-resolution HER2+
#: scale (224 * 200 / 290 = 154.48 um), the crop the published mclSTExp code uses.
DEFAULT_PATCH_UM = 224 * _HER2ST_FULLRES_UM_PER_PX

#: Pixel limit for decoding a source image (PIL refuses larger images as possible
#: decompression bombs). Applied only while one of our images is being opened.
_MAX_IMAGE_PIXELS = 2_000_000_000

#: Version of the cache entry layout; bump when the crop/resize algorithm changes so
#: that entries written by older code are rebuilt instead of reused.
_CACHE_FORMAT = 1

_RESIZE_FILTER = Image.Resampling.BILINEAR
_PIL_LIMIT_LOCK = threading.Lock()
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------------------
# small validators
# --------------------------------------------------------------------------------------
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}.")
    return int(value)


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number, got {value}.")
    return value


def _pad_rgb(pad_value) -> np.ndarray:
    values = np.atleast_1d(np.asarray(pad_value))
    if values.size not in (1, 3) or values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise TypeError(
            f"pad_value must be an integer 0..255 or three of them (R, G, B), got {pad_value!r}."
        )
    if (values < 0).any() or (values > 255).any():
        raise ValueError(f"pad_value must lie in 0..255, got {pad_value!r}.")
    return np.broadcast_to(values.astype(np.uint8), (3,)).copy()


def _as_centers(centers) -> np.ndarray:
    try:
        arr = np.asarray(centers, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"centers must hold numbers, (x, y) pixel coordinates of shape (n_spots, 2); got "
            f"values that are not numbers ({err})."
        ) from err
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"centers must have shape (n_spots, 2) holding (x, y) pixel coordinates, got shape {arr.shape}."
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"centers holds {int(bad.sum())} non-finite row(s) (first at index {int(np.argmax(bad))}); "
            "drop spots without pixel coordinates first."
        )
    return arr


def _round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.int64)


def crop_size_px(um_per_px, *, patch_um=DEFAULT_PATCH_UM) -> int:
    """Crop width in pixels that covers ``patch_um`` microns of tissue.

    Parameters
    ----------
    um_per_px
        Microns per pixel of the source image
        (``adata.uns['spatial'][library_id]['metadata']['um_per_px']``).
    patch_um
        Tissue width of a patch in microns. The default, :data:`DEFAULT_PATCH_UM`
        (about 154.5 um), is 224 px at the full-resolution HER2+ scale.

    Returns
    -------
    int
        ``patch_um / um_per_px`` rounded half up, at least 1.

    Raises
    ------
    TypeError
        If an argument is not a real number.
    ValueError
        If an argument is not positive and finite.

    Examples
    --------
    >>> crop_size_px(200 / 290)
    224
    """
    um_per_px = _positive_float(um_per_px, "um_per_px")
    patch_um = _positive_float(patch_um, "patch_um")
    # Guard the ratio against float noise (224 * r / r may come out as 223.99999...).
    ratio = round(patch_um / um_per_px, 9)
    return max(1, int(math.floor(ratio + 0.5)))


# --------------------------------------------------------------------------------------
# decoding the source image
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pil_pixel_limit(limit: int):
    """Raise PIL's decompression-bomb limit for the duration of one decode."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _corrupt_image_error(name: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Could not decode the H&E image {name} ({type(err).__name__}: {err}). The file is "
        "corrupt or truncated: re-download it and verify its sha256 against the data "
        "manifest (mclstexp_lite.download)."
    )


def _decode_pil(image: Image.Image, name: str) -> Image.Image:
    try:
        with _pil_pixel_limit(_MAX_IMAGE_PIXELS):
            image.load()
            # convert() copies the whole image, so only call it when the mode differs.
            return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"The H&E image {name} has {image.width} x {image.height} pixels, more than the "
            f"{_MAX_IMAGE_PIXELS:,} this package decodes; downscale it and scale the spot "
            "coordinates and um_per_px accordingly."
        ) from err
    except (UnidentifiedImageError, SyntaxError) as err:
        raise _corrupt_image_error(name, err) from err
    except OSError as err:
        if isinstance(err, (PermissionError, FileNotFoundError, IsADirectoryError)):
            raise
        raise _corrupt_image_error(name, err) from err


def _open_image(image) -> tuple[Image.Image | np.ndarray, str]:
    """Return a decoded RGB PIL image or a validated (H, W, 3) uint8 array, and a name."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"H&E image not found: {path}. Check the path (source_image_path) or download "
                "the section's files first."
            )
        try:
            with _pil_pixel_limit(_MAX_IMAGE_PIXELS):
                opened = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ValueError(
                f"The H&E image {path} has more than {_MAX_IMAGE_PIXELS:,} pixels; downscale it "
                "and scale the spot coordinates and um_per_px accordingly."
            ) from err
        except (UnidentifiedImageError, SyntaxError) as err:
            raise _corrupt_image_error(str(path), err) from err
        except OSError as err:
            if isinstance(err, (PermissionError, IsADirectoryError)):
                raise
            raise _corrupt_image_error(str(path), err) from err
        return _decode_pil(opened, str(path)), str(path)
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "<PIL image>"
        return _decode_pil(image, name), name
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image as an array must have shape (height, width, 3) RGB, got {image.shape}."
            )
        if image.dtype != np.uint8:
            raise TypeError(
                f"image as an array must have dtype uint8, got {image.dtype}; convert with "
                "np.clip(a, 0, 255).astype(np.uint8) if it holds 0..255 values."
            )
        return image, "<array>"
    raise TypeError(
        "image must be a file path, a PIL.Image.Image or an (H, W, 3) uint8 numpy array, "
        f"got {type(image).__name__}."
    )


# --------------------------------------------------------------------------------------
# patch extraction
# --------------------------------------------------------------------------------------
def _check_inside(centers, width, height, crop_px, ids) -> None:
    half = crop_px / 2.0
    x, y = centers[:, 0], centers[:, 1]
    bad = (x < -half) | (x > width - 1 + half) | (y < -half) | (y > height - 1 + half)
    if not bad.any():
        return
    where = np.flatnonzero(bad)
    shown = []
    for i in where[:5]:
        label = str(ids[i]) if ids is not None else f"#{i}"
        shown.append(f"{label} at ({x[i]:.1f}, {y[i]:.1f})")
    raise ValueError(
        f"{where.size} of {len(centers)} spot centres lie outside the {width} x {height} px image "
        f"by more than half a crop ({half:g} px): {', '.join(shown)}"
        f"{' ...' if where.size > 5 else ''}. Coordinates outside the image usually mean the "
        "centres are in a different pixel frame than the image (e.g. full-resolution "
        "coordinates with a downscaled image, or array coordinates); check the pixel scale, "
        "and that centres are (x, y), not (y, x)."
    )


def extract_patches(
    image,
    centers,
    *,
    crop_px,
    out_size=224,
    pad_value=255,
    ids=None,
    out=None,
    progress=False,
) -> np.ndarray:
    """Cut one square patch per spot centre out of an H&E image.

    The image is decoded once; every crop is taken directly from the decoded image, filled
    with ``pad_value`` where it extends beyond the image border, and resized to
    ``out_size`` with PIL's bilinear filter (antialiased when shrinking).

    Parameters
    ----------
    image
        The source H&E image: a file path, a ``PIL.Image.Image`` or an ``(H, W, 3)``
        ``uint8`` RGB array. Other PIL modes are converted to RGB (an alpha channel is
        dropped). Images up to 2e9 pixels are decoded (PIL's own, lower
        decompression-bomb limit is lifted for this call only).
    centers
        ``(n_spots, 2)`` spot centres ``(x, y)`` in the image's pixel frame, e.g.
        ``adata.obsm['spatial']``. Centres are rounded half up to whole pixels.
    crop_px
        Crop width in source pixels (see :func:`crop_size_px`). The crop of a centre at
        pixel ``(cx, cy)`` spans columns ``cx - crop_px // 2`` to
        ``cx - crop_px // 2 + crop_px - 1`` (rows likewise).
    out_size
        Side of the returned patches in pixels.
    pad_value
        Fill for crop pixels outside the image: one value or ``(R, G, B)``. Default 255,
        white, the colour of the glass background of an H&E slide.
    ids
        Optional spot ids (length ``n_spots``) used in error messages.
    out
        Optional writable ``uint8`` array of shape ``(n_spots, out_size, out_size, 3)``
        (e.g. a memory-mapped file) to write into instead of allocating one.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(n_spots, out_size, out_size, 3)``; ``out`` if given.

    Raises
    ------
    FileNotFoundError
        If ``image`` is a path that does not exist.
    ValueError
        If the image file is corrupt or truncated (the message names the file), if any
        centre lies outside the image by more than half a crop (the message names how
        many, the first few and the image size), or if an argument has a bad value.
    TypeError
        If an argument has the wrong type.

    Notes
    -----
    Crops are cut from the decoded PIL image, which is neither turned into a numpy
    array nor padded as a whole: for a 9,300 x 9,900 px JPEG either would add a copy of
    about 280 MB and about a second, more than the decode itself; only the crops that
    cross the border are padded, each on its own.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    >>> p = extract_patches(img, [[10.0, 20.0], [60.2, 50.7]], crop_px=9, out_size=9)
    >>> p.shape, bool((p[1, 4, 4] == img[51, 60]).all())
    ((2, 9, 9, 3), True)
    """
    crop_px = _positive_int(crop_px, "crop_px")
    out_size = _positive_int(out_size, "out_size")
    fill = _pad_rgb(pad_value)
    centers = _as_centers(centers)
    n = len(centers)
    if ids is not None:
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries but centers has {n} rows; pass one id per centre.")
    shape = (n, out_size, out_size, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.uint8:
        raise ValueError(
            f"out must be a uint8 numpy array of shape {shape}, got "
            f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}."
        )
    elif not out.flags.writeable:
        raise ValueError("out must be writable.")

    if isinstance(image, (str, os.PathLike)) and Path(image).expanduser().is_file():
        from . import slides

        if slides.is_tiff(Path(image).expanduser()):
            return _extract_from_slide(Path(image).expanduser(), centers, crop_px=crop_px,
                                       out_size=out_size, fill=fill, ids=ids, out=out,
                                       progress=progress)
    src, _ = _open_image(image)
    if isinstance(src, np.ndarray):
        height, width = src.shape[:2]
    else:
        width, height = src.size
    _check_inside(centers, width, height, crop_px, ids)

    rounded = _round_half_up(centers)
    lefts = rounded[:, 0] - crop_px // 2
    tops = rounded[:, 1] - crop_px // 2
    resize = crop_px != out_size

    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="patches", unit="spot")

    for i in iterator:
        x0, y0 = int(lefts[i]), int(tops[i])
        x1, y1 = x0 + crop_px, y0 + crop_px
        if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
            if isinstance(src, np.ndarray):
                crop = src[y0:y1, x0:x1]
                if not resize:
                    out[i] = crop
                    continue
                crop_img = Image.fromarray(np.ascontiguousarray(crop))
            else:
                crop_img = src.crop((x0, y0, x1, y1))
                if not resize:
                    out[i] = np.asarray(crop_img)
                    continue
        else:
            buf = np.empty((crop_px, crop_px, 3), dtype=np.uint8)
            buf[:] = fill
            ix0, iy0 = max(x0, 0), max(y0, 0)
            ix1, iy1 = min(x1, width), min(y1, height)
            if ix1 > ix0 and iy1 > iy0:
                if isinstance(src, np.ndarray):
                    part = src[iy0:iy1, ix0:ix1]
                else:
                    part = np.asarray(src.crop((ix0, iy0, ix1, iy1)))
                buf[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = part
            if not resize:
                out[i] = buf
                continue
            crop_img = Image.fromarray(buf)
        out[i] = np.asarray(crop_img.resize((out_size, out_size), _RESIZE_FILTER))
    return out


def _extract_from_slide(path: Path, centers, *, crop_px, out_size, fill, ids, out, progress):
    """:func:`extract_patches` for a TIFF: each crop is a region read, so only the tiles
    under the spots are decoded (a whole-slide image is never held in memory)."""
    from . import slides

    with slides.open_slide(path) as slide:
        _check_inside(centers, slide.width, slide.height, crop_px, ids)
        rounded = _round_half_up(centers)
        order = np.lexsort((rounded[:, 0], rounded[:, 1]))  # row by row: sequential reads
        iterator = order
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(order, desc="patches", unit="spot")
        for i in iterator:
            crop = slide.read_region(int(rounded[i, 0]) - crop_px // 2,
                                     int(rounded[i, 1]) - crop_px // 2, crop_px, crop_px,
                                     pad_value=fill)
            if crop_px != out_size:
                crop = np.asarray(Image.fromarray(crop).resize((out_size, out_size), _RESIZE_FILTER))
            out[i] = crop
    return out


# --------------------------------------------------------------------------------------
# cache location and keys
# --------------------------------------------------------------------------------------
def _default_cache_dir() -> Path:
    """Directory for patch cache entries: ``<mclstexp_lite.download.cache_dir()>/patches``.

    That is ``$MCLSTEXP_CACHE`` when set, else the per-user cache folder; derived files
    never go inside the data root, which may be a shared or read-only copy.
    """
    from mclstexp_lite import download

    return download.cache_dir() / "patches"


def _file_sha256(path: Path) -> str:
    """sha256 of a file, streamed and memoised per (path, mtime, size)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    cached = _SHA256_MEMO.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        cached = _SHA256_MEMO[key] = digest.hexdigest()
    return cached


def _spots_digest(obs_names: list[str], rounded: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(obs_names).encode("utf-8"))
    digest.update(np.ascontiguousarray(rounded, dtype="<i8").tobytes())
    return digest.hexdigest()[:12]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-.") or "section"


# --------------------------------------------------------------------------------------
# atomic writes and entry validation
# --------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, payload: dict) -> None:
    from .download import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=1))


def _write_entry(directory: Path, key: str, shape: tuple, fill_fn, meta: dict) -> None:
    """Write ``<key>.npy`` (filled by ``fill_fn``) then ``<key>.json``, each atomically.

    The array is filled in a temporary file first, so a failure while filling leaves any
    existing entry untouched. The JSON marks a complete entry: it is removed before the
    new array takes the old one's place and written only after it.
    """
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"
    tmp = directory / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.npy.tmp"
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        try:
            fill_fn(arr)
            arr.flush()
        finally:
            del arr
        _fsync_path(tmp)
        json_path.unlink(missing_ok=True)
        os.replace(tmp, npy_path)
        _fsync_dir(directory)
        _atomic_write_json(json_path, meta)
        _fsync_dir(directory)
    finally:
        tmp.unlink(missing_ok=True)


class _StaleEntry(Exception):
    """A cache entry that exists but cannot be used."""


def _open_entry(directory: Path, key: str) -> tuple[np.memmap, dict] | None:
    """Open a cache entry read-only; ``None`` if absent, :class:`_StaleEntry` if broken."""
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"
    if not json_path.exists():
        if npy_path.exists():
            raise _StaleEntry(f"{npy_path.name} has no {json_path.name} (an interrupted write)")
        return None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _StaleEntry(f"unreadable metadata {json_path.name} ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        raise _StaleEntry(f"{json_path.name} has another cache format than {_CACHE_FORMAT}")
    try:
        n, size = int(meta["n_spots"]), int(meta["out_size"])
        if len(meta["obs_names"]) != n or len(meta["centers_px"]) != n:
            raise _StaleEntry(f"{json_path.name} lists a wrong number of spots")
    except (KeyError, TypeError, ValueError) as err:
        raise _StaleEntry(f"{json_path.name} lacks a field ({err})") from err
    try:
        arr = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise _StaleEntry(f"cannot memory-map {npy_path.name} ({err})") from err
    expected = (n, size, size, 3)
    if not isinstance(arr, np.memmap) or arr.dtype != np.uint8 or arr.shape != expected:
        raise _StaleEntry(
            f"{npy_path.name} holds {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}, "
            f"expected uint8 {expected}"
        )
    if npy_path.stat().st_size != arr.offset + arr.nbytes:
        raise _StaleEntry(f"{npy_path.name} has {npy_path.stat().st_size} bytes, expected {arr.offset + arr.nbytes}")
    return arr, meta


# --------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------
def _resolve_library(adata, library_id) -> str:
    spatial = adata.uns.get("spatial") if isinstance(adata.uns, Mapping) else None
    if not isinstance(spatial, Mapping) or len(spatial) == 0:
        raise ValueError(
            "adata.uns['spatial'] is missing or empty; load the section with a loader from "
            "mclstexp_lite.datasets, which records the source image there."
        )
    if library_id is None:
        if len(spatial) != 1:
            raise ValueError(
                f"adata.uns['spatial'] holds {len(spatial)} libraries {sorted(map(str, spatial))}; "
                "pass library_id= to choose the one whose image the spots are on."
            )
        return next(iter(spatial))
    if library_id not in spatial:
        raise ValueError(
            f"library_id={library_id!r} is not in adata.uns['spatial']; choose one of "
            f"{sorted(map(str, spatial))}."
        )
    if "section" in adata.obs.columns and len(spatial) > 1:
        sections = adata.obs["section"].astype(str)
        other = sections != str(library_id)
        if other.any():
            raise ValueError(
                f"{int(other.sum())} of {adata.n_obs} spots belong to other sections than "
                f"{library_id!r} (adata.obs['section']); subset first, e.g. "
                f"adata[adata.obs['section'] == {str(library_id)!r}]."
            )
    return library_id


def _section_inputs(adata, library_id) -> dict:
    lib = _resolve_library(adata, library_id)
    entry = adata.uns["spatial"][lib]
    meta = entry.get("metadata") if isinstance(entry, Mapping) else None
    required = ("source_image_path", "um_per_px")
    if not isinstance(meta, Mapping) or any(k not in meta for k in required):
        raise ValueError(
            f"adata.uns['spatial'][{lib!r}]['metadata'] must hold {list(required)} (and "
            "'source_image_sha256'); load the section with mclstexp_lite.datasets."
        )
    if "spatial" not in adata.obsm:
        raise ValueError("adata.obsm['spatial'] (spot centres in source-image pixels) is missing.")
    centers = _as_centers(adata.obsm["spatial"])
    if adata.n_obs == 0:
        raise ValueError("adata has no spots; there are no patches to extract.")
    path = Path(str(meta["source_image_path"])).expanduser()
    try:
        um_per_px = _positive_float(meta["um_per_px"], "metadata['um_per_px']")
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.uns['spatial'][{lib!r}]['metadata']['um_per_px'] is invalid: {err}") from err
    sha = str(meta.get("source_image_sha256") or "").lower()
    sha_computed = False
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        if not path.is_file():
            raise FileNotFoundError(
                f"H&E image not found: {path} (adata.uns['spatial'][{lib!r}]['metadata']"
                "['source_image_path']); download the section's files first."
            )
        sha, sha_computed = _file_sha256(path), True
    return {
        "library_id": lib,
        "path": path,
        "um_per_px": um_per_px,
        "sha256": sha,
        "sha256_computed": sha_computed,
        "centers": centers,
    }


def _gather_from_sibling(directory: Path, prefix: str, own_key: str, rounded: np.ndarray, pad: list):
    """Find a complete entry of the same image and geometry holding every wanted centre.

    Returns ``(array, rows, key)`` or ``None``; ``rows[i]`` is the sibling row holding
    the crop of ``rounded[i]`` (a crop depends only on the image, the geometry and its
    rounded centre, all of which the sibling shares).
    """
    for json_path in sorted(directory.glob(f"{prefix}*.json")):
        key = json_path.name[: -len(".json")]
        if key == own_key:
            continue
        try:
            opened = _open_entry(directory, key)
        except _StaleEntry:
            continue
        if opened is None:
            continue
        arr, meta = opened
        if meta.get("pad_value") != pad:
            continue
        lookup = {}
        for row, (x, y) in enumerate(meta["centers_px"]):
            lookup.setdefault((int(x), int(y)), row)
        rows = [lookup.get((int(x), int(y))) for x, y in rounded]
        if all(r is not None for r in rows):
            return arr, np.asarray(rows, dtype=np.int64), key
    return None


def patch_cache(
    adata,
    *,
    patch_um=DEFAULT_PATCH_UM,
    out_size=224,
    cache_dir=None,
    library_id=None,
    overwrite=False,
    progress=True,
    stain=None,
) -> np.memmap:
    """H&E patches of every spot, cached on disk and returned memory-mapped.

    The first call for a section decodes its source image once, cuts a
    ``patch_um``-wide patch under each spot (:func:`extract_patches`, white padding at the
    image border) and stores them; later calls open the stored array without touching
    the image.

    Parameters
    ----------
    adata
        One section, laid out as in ``docs/data_model.md``. Read:
        ``adata.obsm['spatial']`` (spot centres, source-image pixels), ``adata.obs_names``
        and ``adata.uns['spatial'][library_id]['metadata']`` (``source_image_path``,
        ``source_image_sha256``, ``um_per_px``).
    patch_um
        Tissue width of a patch in microns; the crop width in pixels is
        ``crop_size_px(um_per_px, patch_um=patch_um)``.
    out_size
        Side of the stored patches in pixels (the model's input size).
    cache_dir
        Directory for the entries. Default: ``$MCLSTEXP_CACHE/patches`` if that variable
        is set, else ``<user cache directory>/cache/patches``; never inside the data root.
    library_id
        Key of ``adata.uns['spatial']``; needed only when there are several.
    overwrite
        Rebuild the entry from the image even if a valid one exists.
    progress
        Show a progress bar while cropping.
    stain
        Optional fitted :class:`mclstexp_lite.stain.StainNormalizer`: return the patches
        stain-normalised, from an entry of their own (see Notes). ``None`` (default):
        the patches as cut.

    Returns
    -------
    numpy.memmap
        Read-only ``uint8`` array ``(n_obs, out_size, out_size, 3)``, row ``i`` the patch
        of ``adata.obs_names[i]``.

    Notes
    -----
    Each entry is two files in the cache directory, named by the key
    ``<library>_<out_size>px_c<crop_px>_<sha16>_<spots>``: ``sha16`` is the first 16 hex
    digits of the source image's sha256 (taken from the metadata, or computed by
    streaming the file and memoised per path, mtime and size when the metadata has
    none), ``spots`` a short hash of the obs names and rounded centres in order, so any
    other spot set or order gets its own entry.

    - ``<key>.npy``: the patches (``numpy.save`` format).
    - ``<key>.json``: obs names and rounded centres in row order, ``crop_px``,
      ``out_size``, ``patch_um``, ``um_per_px``, ``pad_value``, source path and sha256,
      creation time and package version.

    Both are written to a temporary file in the same directory, fsynced and renamed
    into place, the JSON last: an entry without its JSON is incomplete and is rebuilt.
    On a hit the JSON must match the request (format, obs names, centres, geometry) and
    the ``.npy`` must memory-map to the recorded shape and size; otherwise a warning is
    logged and the entry is rebuilt, never used. A new spot set whose centres are all
    in an existing entry of the same image and geometry (e.g. after filtering spots) is
    built by copying those rows instead of decoding the image again.

    When ``adata`` is not a view, ``adata.uns['mclstexp']['patches']`` is set to
    ``{'path': ..., 'json': ..., 'params': {...}}`` for provenance (the patches
    themselves are not stored in ``adata``).

    With ``stain=``, the unnormalised entry is opened (or built) first and its patches,
    normalised with ``stain.transform``, are written as a separate entry in the
    subfolder ``stained/`` of the cache directory, named
    ``<unnormalised key>_<method>-<fingerprint>`` and written atomically in the same way.
    Its JSON adds ``stain`` (the normaliser's ``to_dict()``), ``stain_fingerprint``,
    ``stain_stats`` (patches normalised / left unchanged) and the key and creation time
    of the entry it was built from; it is reused only while all of these match, so a
    rebuilt unnormalised entry or another normaliser gives a new one. Because the key
    differs, :func:`mclstexp_lite.features.patch_identity` and hence the feature cache
    tell normalised and unnormalised patches apart. The provenance in ``adata.uns``
    then points at the normalised entry and adds ``params['stain']`` (method and
    fingerprint).

    Raises
    ------
    ValueError
        If a required slot is missing or invalid, spots lie outside the image, or the
        image is corrupt.
    FileNotFoundError
        If the source image is needed and missing.
    """
    if stain is not None:
        return _stained_patch_cache(adata, stain, patch_um=patch_um, out_size=out_size,
                                    cache_dir=cache_dir, library_id=library_id,
                                    overwrite=overwrite, progress=progress)
    out_size = _positive_int(out_size, "out_size")
    patch_um = _positive_float(patch_um, "patch_um")
    inputs = _section_inputs(adata, library_id)
    lib = inputs["library_id"]
    crop_px = crop_size_px(inputs["um_per_px"], patch_um=patch_um)
    obs_names = [str(name) for name in adata.obs_names]
    rounded = _round_half_up(inputs["centers"])
    pad = [255, 255, 255]

    prefix = f"{_safe_name(lib)}_{out_size}px_c{crop_px}_{inputs['sha256'][:16]}_"
    key = prefix + _spots_digest(obs_names, rounded)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"

    meta = {
        "format": _CACHE_FORMAT,
        "key": key,
        "library_id": str(lib),
        "n_spots": len(obs_names),
        "out_size": out_size,
        "crop_px": crop_px,
        "patch_um": patch_um,
        "um_per_px": inputs["um_per_px"],
        "pad_value": pad,
        "resize": "PIL bilinear",
        "source_image_path": str(inputs["path"]),
        "source_image_sha256": inputs["sha256"],
        "sha256_computed": inputs["sha256_computed"],
    }

    result = None
    if not overwrite:
        try:
            opened = _open_entry(directory, key)
        except _StaleEntry as err:
            logger.warning("Patch cache entry %s is unusable (%s); rebuilding it.", npy_path, err)
            opened = None
        if opened is not None:
            arr, stored = opened
            mismatch = [
                field
                for field in ("library_id", "crop_px", "out_size", "source_image_sha256", "pad_value")
                if stored.get(field) != meta[field]
            ]
            if stored["obs_names"] != obs_names:
                mismatch.append("obs_names")
            if not np.array_equal(np.asarray(stored["centers_px"], dtype=np.int64).reshape(-1, 2), rounded):
                mismatch.append("centers_px")
            if mismatch:
                logger.warning(
                    "Patch cache entry %s does not match this section (%s); rebuilding it.",
                    npy_path,
                    ", ".join(mismatch),
                )
            else:
                result = arr

    if result is None:
        shape = (len(obs_names), out_size, out_size, 3)
        sibling = None if overwrite else _gather_from_sibling(directory, prefix, key, rounded, pad)
        if sibling is not None:
            source, rows, sibling_key = sibling
            meta["built_from"] = f"cache entry {sibling_key}"

            def fill(dest):
                order = np.argsort(rows, kind="stable")
                for i in order:  # ascending source rows: sequential reads
                    dest[i] = source[rows[i]]

        else:
            meta["built_from"] = "source image"

            def fill(dest):
                extract_patches(
                    inputs["path"],
                    inputs["centers"],
                    crop_px=crop_px,
                    out_size=out_size,
                    pad_value=pad,
                    ids=obs_names,
                    out=dest,
                    progress=progress,
                )

        from mclstexp_lite import __version__

        meta.update(
            obs_names=obs_names,
            centers_px=rounded.tolist(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            package_version=__version__,
        )
        _write_entry(directory, key, shape, fill, meta)
        logger.info("Cached %d patches of %s in %s (%s).", shape[0], lib, npy_path, meta["built_from"])
        opened = _open_entry(directory, key)
        if opened is None:  # pragma: no cover - removed by another process meanwhile
            raise RuntimeError(f"Patch cache entry {json_path} vanished right after it was written.")
        result = opened[0]

    if not getattr(adata, "is_view", False):
        record = adata.uns.get("mclstexp")
        if record is None:
            record = adata.uns["mclstexp"] = {}
        if not isinstance(record, MutableMapping):
            raise TypeError(
                f"adata.uns['mclstexp'] must be a dict to record patch provenance, got {type(record).__name__}."
            )
        record["patches"] = {
            "path": str(npy_path),
            "json": str(json_path),
            "params": {
                "library_id": str(lib),
                "patch_um": patch_um,
                "out_size": out_size,
                "crop_px": crop_px,
                "um_per_px": inputs["um_per_px"],
                "source_image_sha256": inputs["sha256"],
            },
        }
    return result


#: Subfolder of the patch cache for stain-normalised entries. They must stay out of the
#: folder itself, where ``_gather_from_sibling`` looks for unnormalised crops to copy.
_STAINED_SUBDIR = "stained"


def _stained_patch_cache(adata, stain, *, patch_um, out_size, cache_dir, library_id, overwrite,
                         progress) -> np.memmap:
    """:func:`patch_cache` with ``stain=``: the normalised entry, built from the plain one."""
    from . import stain as st

    if isinstance(stain, str):
        raise TypeError(
            f"stain must be a fitted mclstexp_lite.stain.StainNormalizer, got the string "
            f"{stain!r}; fit one on the reference sections first, e.g. "
            f"stain.fit_on_sections(training_sections, {stain!r}) (cv.run_cv(stain={stain!r}) "
            "does this per fold)."
        )
    if not isinstance(stain, st.StainNormalizer):
        raise TypeError(
            f"stain must be a fitted mclstexp_lite.stain.StainNormalizer or None, got "
            f"{type(stain).__name__}."
        )
    if not stain.is_fitted:
        raise ValueError(
            "stain is not fitted; call stain.fit(reference_patches) or use "
            "stain.fit_on_sections(...) before passing it to patch_cache."
        )
    base = patch_cache(adata, patch_um=patch_um, out_size=out_size, cache_dir=cache_dir,
                       library_id=library_id, overwrite=overwrite, progress=progress)
    base_json = Path(base.filename).with_suffix(".json")
    base_meta = json.loads(base_json.read_text(encoding="utf-8"))
    fingerprint = stain.fingerprint
    key = f"{base_meta['key']}_{stain.method}-{fingerprint}"
    directory = base_json.parent / _STAINED_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"
    expected = {"stain_fingerprint": fingerprint, "source_entry": base_meta["key"],
                "source_created": base_meta.get("created"), "obs_names": base_meta["obs_names"]}

    result = None
    if not overwrite:
        try:
            opened = _open_entry(directory, key)
        except _StaleEntry as err:
            logger.warning("Stained patch cache entry %s is unusable (%s); rebuilding it.", npy_path, err)
            opened = None
        if opened is not None:
            arr, stored = opened
            mismatch = [field for field, value in expected.items() if stored.get(field) != value]
            if mismatch:
                logger.warning("Stained patch cache entry %s does not match (%s); rebuilding it.",
                               npy_path, ", ".join(mismatch))
            else:
                result = arr

    if result is None:
        from mclstexp_lite import __version__

        stats: dict = {}

        def fill(dest):
            stain.transform(base, out=dest, progress=progress)
            stats.update(stain.last_stats)

        meta = {k: v for k, v in base_meta.items() if k not in ("built_from", "created", "package_version")}
        meta.update(expected)
        meta.update(
            key=key,
            stain=stain.to_dict(),
            stain_stats=stats,  # filled by fill() before the JSON is written
            built_from=f"cache entry {base_meta['key']} + stain normalisation ({stain.method})",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            package_version=__version__,
        )
        _write_entry(directory, key, tuple(base.shape), fill, meta)
        logger.info("Stain-normalised %d patches of %s into %s (%s).", len(base),
                    base_meta.get("library_id"), npy_path, stats)
        opened = _open_entry(directory, key)
        if opened is None:  # pragma: no cover - removed by another process meanwhile
            raise RuntimeError(f"Patch cache entry {json_path} vanished right after it was written.")
        result = opened[0]

    record = adata.uns.get("mclstexp") if not getattr(adata, "is_view", False) else None
    if isinstance(record, MutableMapping) and isinstance(record.get("patches"), MutableMapping):
        record["patches"]["path"] = str(npy_path)
        record["patches"]["json"] = str(json_path)
        record["patches"]["params"]["stain"] = {"method": stain.method, "fingerprint": fingerprint}
    return result


# --------------------------------------------------------------------------------------
# training-time helpers
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


class PatchDataset:
    """Spots as training items: a cached patch, an expression vector and a position.

    A map-style dataset (``__len__`` and ``__getitem__``, usable with
    ``torch.utils.data.DataLoader``) that returns ``uint8`` patches as they are stored:
    no PIL and no per-item augmentation. Augment whole batches on the device with
    :func:`gpu_augment`; :meth:`batch` and :meth:`iter_batches` gather batches in one go,
    which is much faster than collating single items.

    Parameters
    ----------
    patches
        ``uint8`` array ``(n_spots, H, W, 3)`` from :func:`patch_cache`.
    expr
        ``(n_spots, n_genes)`` expression matrix (numpy array or scipy sparse matrix);
        returned as ``float32``.
    pos
        ``(n_spots, 2)`` non-negative integer spot positions (array ``x``, ``y``), the
        indices of mclSTExp's position embeddings.
    groups
        Optional ``(n_spots,)`` labels (e.g. section names). Returned per item as an
        integer code under ``'group'``; :attr:`group_names` maps codes back.

    Attributes
    ----------
    group_names : numpy.ndarray or None
        Sorted unique labels of ``groups``; code ``k`` means ``group_names[k]``.

    Examples
    --------
    >>> ds = PatchDataset(np.zeros((4, 8, 8, 3), np.uint8), np.ones((4, 5)), np.zeros((4, 2), int))
    >>> item = ds[1]
    >>> item["image"].shape, item["expression"].dtype
    (torch.Size([3, 8, 8]), torch.float32)
    """

    def __init__(self, patches, expr, pos, groups=None):
        _check_patch_array(patches)
        n = len(patches)
        if not hasattr(expr, "shape") or len(expr.shape) != 2:
            raise TypeError(
                f"expr must be a 2-D (n_spots, n_genes) array or sparse matrix, got {type(expr).__name__}."
            )
        if expr.shape[0] != n:
            raise ValueError(f"expr has {expr.shape[0]} rows but patches has {n}; pass one row per spot.")
        pos_arr = np.asarray(pos)
        if pos_arr.shape != (n, 2):
            raise ValueError(f"pos must have shape ({n}, 2), got {pos_arr.shape}.")
        if not np.issubdtype(pos_arr.dtype, np.number) or not np.all(np.isfinite(pos_arr)):
            raise TypeError("pos must hold finite integer spot positions (array x, y).")
        if not np.array_equal(pos_arr, np.round(pos_arr)) or (pos_arr < 0).any():
            raise ValueError(
                "pos must hold non-negative whole numbers (array coordinates); round them, "
                "e.g. adata.obs[['array_x', 'array_y']].to_numpy()."
            )
        self.patches = patches
        self.expr = expr
        self.pos = pos_arr.astype(np.int64)
        self._sparse = not isinstance(expr, np.ndarray)
        if groups is None:
            self.group_names, self._group_codes = None, None
        else:
            labels = np.asarray(groups)
            if labels.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {labels.shape}.")
            self.group_names, self._group_codes = np.unique(labels, return_inverse=True)

    def __len__(self) -> int:
        return len(self.patches)

    def _expr_rows(self, idx) -> torch.Tensor:
        rows = self.expr[idx]
        if self._sparse:
            rows = rows.toarray()
        return torch.as_tensor(np.asarray(rows, dtype=np.float32))

    def __getitem__(self, i) -> dict:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"index must be an integer, got {type(i).__name__}.")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} spots.")
        i = int(i) % n
        item = {
            "image": torch.from_numpy(np.array(self.patches[i])).permute(2, 0, 1),
            "expression": self._expr_rows([i])[0],
            "position": torch.from_numpy(self.pos[i].copy()),
            "index": i,
        }
        if self._group_codes is not None:
            item["group"] = int(self._group_codes[i])
        return item

    def batch(self, idx, *, device=None) -> dict:
        """Gather a batch of spots in one go.

        Parameters
        ----------
        idx
            1-D integer row numbers.
        device
            Device for the returned tensors (``None``: CPU).

        Returns
        -------
        dict
            ``'image'``: ``uint8`` ``(B, 3, H, W)`` (see :func:`to_torch_batch`);
            ``'expression'``: ``float32`` ``(B, n_genes)``; ``'position'``: ``int64``
            ``(B, 2)``; ``'index'``: ``int64`` ``(B,)``; ``'group'``: ``int64`` ``(B,)``
            if groups were given.
        """
        idx = _as_index(idx, len(self))
        out = {
            "image": to_torch_batch(self.patches, idx, device=device),
            "expression": self._expr_rows(idx),
            "position": torch.from_numpy(self.pos[idx]),
            "index": torch.from_numpy(idx.copy()),
        }
        if self._group_codes is not None:
            out["group"] = torch.from_numpy(self._group_codes[idx].astype(np.int64))
        if device is not None:
            for name in ("expression", "position", "index", "group"):
                if name in out:
                    out[name] = out[name].to(device)
        return out

    def iter_batches(self, batch_size, *, shuffle=True, drop_last=False, generator=None, device=None):
        """Yield :meth:`batch` dicts covering every spot once (one epoch).

        Parameters
        ----------
        batch_size
            Spots per batch.
        shuffle
            Visit spots in a random order drawn with ``generator``.
        drop_last
            Skip a last batch smaller than ``batch_size``.
        generator
            ``torch.Generator`` for the order (reproducible epochs).
        device
            Device for the batches.

        Yields
        ------
        dict
            As returned by :meth:`batch`.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size], device=device)


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
