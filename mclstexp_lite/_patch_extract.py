"""H&E patches at a physical scale: crop geometry and extraction (private).

Public through :mod:`mclstexp_lite.patches` (the patch stage's namespace, whose
docstring states the conventions). A module of its own, below the patch cache
(:mod:`mclstexp_lite._patch_cache`), which cuts its patches with :func:`extract_patches`,
and below ``patches``, which re-exports both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import _slides as slides
from ._progress import progress_bar
from ._util import pil_pixel_limit, positive_float, positive_int

__all__ = ["DEFAULT_PATCH_UM", "center_pixels", "crop_size_px", "extract_patches"]


#: Microns per pixel of the full-resolution HER2+ H&E images: legacy ST spots are
#: 200 um apart centre to centre and about 290 px apart in those images.
_HER2ST_FULLRES_UM_PER_PX = 200.0 / 290.0

#: Default tissue width of a patch in microns: 224 px at the full-resolution HER2+
#: scale (224 * 200 / 290 = 154.48 um), the crop the published mclSTExp code uses.
DEFAULT_PATCH_UM = 224 * _HER2ST_FULLRES_UM_PER_PX

#: Pixel limit for decoding a source image (PIL refuses larger images as possible
#: decompression bombs). Applied only while one of our images is being opened.
_MAX_IMAGE_PIXELS = slides.MAX_DECODE_PIXELS

_RESIZE_FILTER = Image.Resampling.BILINEAR


# --------------------------------------------------------------------------------------
# small validators and the crop geometry
# --------------------------------------------------------------------------------------
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


def center_pixels(centers) -> np.ndarray:
    """The pixel under each spot centre: ``(x, y)`` rounded half up, as ``int64``.

    A patch of :func:`extract_patches` is centred on this pixel (it is the crop's pixel
    ``(crop_px // 2, crop_px // 2)``), and the patch cache names and matches its entries
    by it.

    Parameters
    ----------
    centers
        ``(n_spots, 2)`` spot centres ``(x, y)`` in image pixels, e.g.
        ``adata.obsm['spatial']``.

    Returns
    -------
    numpy.ndarray
        ``int64`` array ``(n_spots, 2)``.

    Raises
    ------
    TypeError
        If ``centers`` holds values that are not numbers.
    ValueError
        If ``centers`` is not of shape ``(n_spots, 2)`` or holds non-finite values.

    Examples
    --------
    >>> center_pixels([[10.5, 20.49], [-0.5, 3.0]]).tolist()
    [[11, 20], [0, 3]]
    """
    return _round_half_up(_as_centers(centers))


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
    um_per_px = positive_float(um_per_px, "um_per_px")
    patch_um = positive_float(patch_um, "patch_um")
    # Guard the ratio against float noise (224 * r / r may come out as 223.99999...).
    ratio = round(patch_um / um_per_px, 9)
    return max(1, int(math.floor(ratio + 0.5)))


# --------------------------------------------------------------------------------------
# decoding the source image
# --------------------------------------------------------------------------------------
def _corrupt_image_error(name: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Could not decode the H&E image {name} ({type(err).__name__}: {err}). The file is "
        "corrupt or truncated. If it is one of this package's downloads, delete it so that "
        "the loader re-downloads it (its sha256 is in data_manifest.csv); if it is your own "
        "image, check that it opens in an image viewer and export it again."
    )


def _decode_pil(image: Image.Image, name: str) -> Image.Image:
    try:
        with pil_pixel_limit(_MAX_IMAGE_PIXELS):
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
            with pil_pixel_limit(_MAX_IMAGE_PIXELS):
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
    crop_px = positive_int(crop_px, "crop_px", strict_type=True)
    out_size = positive_int(out_size, "out_size", strict_type=True)
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
        iterator = progress_bar(iterator, desc="patches", unit="spot")

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
    with slides.open_slide(path) as slide:
        _check_inside(centers, slide.width, slide.height, crop_px, ids)
        rounded = _round_half_up(centers)
        order = np.lexsort((rounded[:, 0], rounded[:, 1]))  # row by row: sequential reads
        iterator = order
        if progress:
            iterator = progress_bar(order, desc="patches", unit="spot")
        for i in iterator:
            crop = slide.read_region(int(rounded[i, 0]) - crop_px // 2,
                                     int(rounded[i, 1]) - crop_px // 2, crop_px, crop_px,
                                     pad_value=fill)
            if crop_px != out_size:
                crop = np.asarray(Image.fromarray(crop).resize((out_size, out_size), _RESIZE_FILTER))
            out[i] = crop
    return out
