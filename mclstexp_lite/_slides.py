"""Reading H&E slides without decoding more than needed, finding tissue, laying spots.

A *slide* here is any H&E image a user brings: a JPEG or PNG of a section, or a tiled,
pyramidal (Big)TIFF as whole-slide scanners and HEST-1k write them. :func:`open_slide`
gives one interface to both:

- ``read_region(x, y, w, h)``: the RGB pixels of a window of the full-resolution image
  (white outside the image). For a TIFF only the tiles (or strips) that overlap the
  window are decoded (through ``tifffile``'s zarr store); a JPEG/PNG has no tiles, so
  it is decoded whole, once, on the first region read.
- ``thumbnail(max_px)``: a small RGB copy. A TIFF reads the smallest pyramid level that
  is still at least ``max_px`` on its long side; a JPEG decodes at 1/2, 1/4 or 1/8 size
  (``PIL.Image.draft``).
- ``um_per_px_embedded``: the pixel size the file states, if any (TIFF resolution tags in
  centimetres or inches, or an Aperio ``MPP =`` description), else ``None``.

Images must be 8-bit RGB. Grayscale and 16-bit images are refused with a message that
says how to convert them; an alpha channel that is fully opaque is dropped, one with
transparent pixels is refused (flatten it onto white first).

Tissue and virtual spots
------------------------
:func:`tissue_mask` finds tissue on a thumbnail: HSV saturation (stained tissue is
pink/purple; glass is white and a blacked-out background is black, both unsaturated),
a threshold by Otsu's method (never below :data:`MIN_SATURATION`), then a morphological
clean-up: closing and opening with a disk of about 20 um, holes filled, and connected
pieces smaller than :data:`MIN_PIECE_MM2` removed. :func:`lay_spots` puts spot centres
on a square (legacy ST 1k), checkerboard (legacy ST 2k) or hexagonal (Visium) grid at a given pitch and keeps those whose
spot disk is at least half tissue.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ._util import pil_pixel_limit

__all__ = ["Slide", "open_slide", "tissue_mask", "lay_spots", "MAX_DECODE_PIXELS",
           "MIN_SATURATION", "MIN_PIECE_MM2", "is_tiff"]

#: A JPEG/PNG above this many pixels is refused (it would be decoded whole); PIL's own
#: decompression-bomb limit is lifted only up to this, and only while we decode.
MAX_DECODE_PIXELS = 2_000_000_000
#: Lowest saturation threshold for tissue, whatever Otsu's method says (an image that is
#: all glass has no second mode; its Otsu threshold would cut noise).
MIN_SATURATION = 0.07
#: Tissue pieces smaller than this (mm^2) are dropped as dust or debris.
MIN_PIECE_MM2 = 0.05
#: The virtual spot grids of :func:`lay_spots` (legacy ST 1k, legacy ST 2k, Visium).
GRIDS = ("square", "checkerboard", "hex")
#: Embedded pixel sizes outside this range (um/px) are not microscope scales (e.g. a
#: 72 dpi default) and are ignored.
_PLAUSIBLE_UM_PER_PX = (0.05, 50.0)

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ome.tif")


def is_tiff(path) -> bool:
    """True for a TIFF file (by its first bytes, whatever the name)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class Slide:
    """One H&E image opened for region reads (see the module docstring).

    Use :func:`open_slide`; close with :meth:`close` or a ``with`` block.

    Attributes
    ----------
    path
        The file (``None`` for an in-memory array).
    width, height
        Full-resolution size in pixels.
    um_per_px_embedded
        Pixel size stated by the file, or ``None`` (also for a value no microscope has,
        outside 0.05-50 um/px, e.g. a 72 dpi default).
    um_per_px_tags
        The pixel size as stated, without that plausibility check (``None`` if absent).
    levels
        ``(width, height)`` of every resolution level, full resolution first.
    """

    path: Path | None
    width: int
    height: int
    um_per_px_embedded: float | None
    um_per_px_tags: float | None = None
    levels: list[tuple[int, int]]

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden where there is something to close
        pass

    # ---- to implement
    def _level_array(self, level: int) -> np.ndarray:
        raise NotImplementedError

    def _region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    # ---- shared
    def read_region(self, x: int, y: int, w: int, h: int, *, pad_value=255) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` window with top-left pixel ``(x, y)``; ``pad_value``
        outside the image."""
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"read_region: width and height must be positive, got {w} x {h}")
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + w, self.width), min(y + h, self.height)
        if ix0 == x and iy0 == y and ix1 == x + w and iy1 == y + h:
            return np.ascontiguousarray(self._region(ix0, iy0, ix1, iy1))
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = np.asarray(pad_value, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = self._region(ix0, iy0, ix1, iy1)
        return out

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """A downscaled RGB copy with long side ``<= max_px`` and its scale (thumbnail
        px per full-resolution px, the same on both axes up to rounding)."""
        from PIL import Image

        max_px = int(max_px)
        if max_px < 1:
            raise ValueError(f"max_px must be positive, got {max_px}")
        scale = min(1.0, max_px / max(self.width, self.height))
        target = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        level = 0
        for i, (w, h) in enumerate(self.levels):
            if w >= target[0] and h >= target[1]:
                level = i  # the smallest level still at least as large as the target
        arr = self._level_array(level)
        if (arr.shape[1], arr.shape[0]) != target:
            arr = np.asarray(Image.fromarray(arr).resize(target, Image.Resampling.LANCZOS))
        return np.ascontiguousarray(arr, dtype=np.uint8), target[0] / self.width


def _rgb_or_error(arr: np.ndarray, name: str, channels_last: bool = True) -> np.ndarray:
    """Check dtype and channels of an image array; return (H, W, 3) uint8."""
    if arr.dtype != np.uint8:
        bits = arr.dtype.itemsize * 8
        raise ValueError(
            f"{name}: {bits}-bit pixels ({arr.dtype}); H&E models need 8-bit RGB. Convert "
            "it, e.g. with tifffile/numpy: (a / 257).astype(np.uint8) for 16-bit data, or "
            "export an 8-bit RGB image from the scanner software.")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2)):
        raise ValueError(
            f"{name}: a grayscale image; H&E needs the colour (RGB) image. Use the colour "
            "scan, not a single channel or a fluorescence image.")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an RGB image (height, width, 3), got shape "
                         f"{arr.shape}.")
    if arr.shape[2] == 4:
        alpha = arr[..., 3]
        if (alpha < 255).any():
            raise ValueError(
                f"{name}: an RGBA image with {int((alpha < 255).sum()):,} transparent "
                "pixels. Flatten it onto a white background first, e.g. with PIL: "
                "bg = Image.new('RGB', im.size, 'white'); bg.paste(im, mask=im.split()[3]).")
        arr = arr[..., :3]
    return arr


# ============================================================================ PIL files
def _pil_open(path: Path):
    """``Image.open`` with PIL's size guard off: :class:`_PILSlide` applies its own
    limit (:data:`MAX_DECODE_PIXELS`) with a message that says what to do."""
    from PIL import Image

    with pil_pixel_limit(None):
        return Image.open(path)


class _PILSlide(Slide):
    def __init__(self, path: Path):
        from PIL import UnidentifiedImageError

        self.path = path
        try:
            img = _pil_open(path)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read the image {path}: {exc}. The file is corrupt or "
                             "not an image; check it opens in an image viewer.") from exc
        self.width, self.height = img.size
        if self.width * self.height > MAX_DECODE_PIXELS:
            raise ValueError(
                f"{path}: {self.width:,} x {self.height:,} px is more than the "
                f"{MAX_DECODE_PIXELS:,} pixels this package decodes from a JPEG/PNG (which "
                "cannot be read region by region). Convert it to a tiled, pyramidal TIFF "
                "(e.g. `vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg`), "
                "which is read tile by tile, or downscale it and give the new um_per_px.")
        mode = img.mode
        if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;"):
            bits = "16-bit " if mode.startswith("I") else ""
            img.close()
            raise ValueError(
                f"{path}: a {bits}grayscale image (PIL mode {mode!r}); H&E needs the 8-bit "
                "colour (RGB) image. Use the colour scan, or convert it to 8-bit RGB.")
        if mode not in ("RGB", "RGBA", "P", "RGBX", "CMYK", "YCbCr"):
            img.close()
            raise ValueError(f"{path}: unsupported image mode {mode!r}; save it as 8-bit RGB.")
        self._img = img
        self._full: np.ndarray | None = None
        self.levels = [(self.width, self.height)]
        self.um_per_px_embedded = None  # JPEG/PNG dpi is almost never the scan's scale

    def _decode(self, img) -> np.ndarray:
        from PIL import Image

        try:
            with pil_pixel_limit(None):  # size checked in __init__
                if img.mode == "P":
                    img = img.convert("RGBA")
                elif img.mode not in ("RGB", "RGBA"):
                    img = img.convert("RGB")
                arr = np.asarray(img)
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode the image {self.path}: {exc}. The file is "
                             "truncated or corrupt; get a fresh copy.") from exc
        return _rgb_or_error(arr, str(self.path))

    def _full_image(self) -> np.ndarray:
        if self._full is None:
            self._full = self._decode(self._img)
        return self._full

    def _level_array(self, level: int) -> np.ndarray:
        return self._full_image()

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        from PIL import Image

        if self._full is not None or self._img.format != "JPEG":
            return super().thumbnail(max_px)
        scale = min(1.0, int(max_px) / max(self.width, self.height))
        target = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        img = _pil_open(self.path)
        img.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 size
        arr = self._decode(img)
        if (arr.shape[1], arr.shape[0]) != target:
            arr = np.asarray(Image.fromarray(arr).resize(target, Image.Resampling.LANCZOS))
        return np.ascontiguousarray(arr), target[0] / self.width

    def _region(self, x0, y0, x1, y1) -> np.ndarray:
        return self._full_image()[y0:y1, x0:x1]

    def close(self) -> None:
        self._img.close()
        self._full = None


# =========================================================================== TIFF files
def _tiff_um_per_px(tf, *, plausible: bool = True) -> float | None:
    """The pixel size a TIFF states (Aperio description or resolution tags); with
    ``plausible`` only values in :data:`_PLAUSIBLE_UM_PER_PX`."""
    page = tf.pages[0]
    desc = str(page.tags.get("ImageDescription").value) if "ImageDescription" in page.tags else ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)  # Aperio
    if m:
        value = float(m.group(1))
        if _PLAUSIBLE_UM_PER_PX[0] <= value <= _PLAUSIBLE_UM_PER_PX[1]:
            return value
    try:
        xres = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value)
    except KeyError:
        return None
    num, den = xres if isinstance(xres, tuple) else (xres, 1)
    if not num or not den:
        return None
    px_per_unit = num / den
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)
    if um_per_unit is None:
        return None
    value = um_per_unit / px_per_unit
    if not plausible or _PLAUSIBLE_UM_PER_PX[0] <= value <= _PLAUSIBLE_UM_PER_PX[1]:
        return float(value)
    return None


#: TIFF compressions that tifffile decodes with the standard library alone (none,
#: Deflate/zlib); every other one (LZW as HEST-1k and libvips write it, JPEG, JPEG 2000,
#: ...) needs the ``imagecodecs`` package.
_NATIVE_TIFF_CODECS = (1, 8, 32946)


def _imagecodecs_error(path, compression) -> ValueError:
    return ValueError(
        f"{path} is compressed with {compression} (HEST-1k's WSIs and libvips' TIFFs use LZW), "
        "which tifffile decodes only with the 'imagecodecs' package, not installed here. "
        "Install it (`pip install imagecodecs`; it is in this package's requirements.txt), "
        "or convert the image to an uncompressed or Deflate-compressed TIFF.")


def _check_codec(tf, path) -> None:
    """Fail at open, not at the first tile, when the TIFF's compression needs
    ``imagecodecs`` and it cannot be imported."""
    comp = tf.pages[0].compression
    if int(comp) in _NATIVE_TIFF_CODECS:
        return
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        tf.close()
        raise _imagecodecs_error(path, getattr(comp, "name", comp)) from None


class _TiffSlide(Slide):
    def __init__(self, path: Path):
        import tifffile

        self.path = path
        try:
            self._tf = tifffile.TiffFile(path)
            series = self._tf.series[0]
        except Exception as exc:
            raise ValueError(f"cannot read the TIFF {path}: {type(exc).__name__}: {exc}. The "
                             "file is corrupt or not a TIFF.") from exc
        axes = series.axes
        shape = series.levels[0].shape
        dtype = np.dtype(series.dtype)
        # validate channels and dtype on a one-pixel-deep description, without decoding
        fake = np.zeros((1, 1) + ((shape[axes.index("S")],) if "S" in axes else ()), dtype)
        if axes.startswith("S") or axes not in ("YXS", "YX"):
            self._tf.close()
            raise ValueError(f"{path}: image axes {axes!r} (shape {shape}); expected an RGB "
                             "image stored as rows x columns x samples (YXS).")
        _rgb_or_error(fake, str(path))
        _check_codec(self._tf, path)
        self._series = series
        self._samples = shape[2] if "S" in axes else 1
        self.height, self.width = int(shape[0]), int(shape[1])
        self.levels = [(int(lv.shape[1]), int(lv.shape[0])) for lv in series.levels]
        self.um_per_px_embedded = _tiff_um_per_px(self._tf)
        self.um_per_px_tags = _tiff_um_per_px(self._tf, plausible=False)
        self._zarr: dict[int, object] = {}

    def _store(self, level: int):
        import zarr

        if level not in self._zarr:
            self._zarr[level] = _Decoding(zarr.open(self._tf.aszarr(level=level), mode="r"),
                                          self.path)
        return self._zarr[level]

    def _check(self, arr: np.ndarray) -> np.ndarray:
        if self._samples == 4:
            return _rgb_or_error(np.asarray(arr), str(self.path))
        return np.asarray(arr)

    def _level_array(self, level: int) -> np.ndarray:
        w, h = self.levels[level]
        if w * h > MAX_DECODE_PIXELS:
            raise ValueError(f"{self.path}: the smallest suitable pyramid level is {w} x {h} "
                             "px; write the TIFF with a pyramid (sub-resolution levels).")
        return self._check(self._store(level)[:])

    def _region(self, x0, y0, x1, y1) -> np.ndarray:
        return self._check(self._store(0)[y0:y1, x0:x1])

    def close(self) -> None:
        self._zarr.clear()
        self._tf.close()


class _Decoding:
    """A zarr array whose reads turn tifffile's "requires the 'imagecodecs' package" into
    the message of :func:`_imagecodecs_error` (e.g. a later level with another codec)."""

    def __init__(self, arr, path):
        self._arr, self._path = arr, path

    def __getitem__(self, key):
        try:
            return self._arr[key]
        except ValueError as exc:
            if "imagecodecs" in str(exc):
                raise _imagecodecs_error(self._path, str(exc).split(" requires")[0]) from exc
            raise


# ========================================================================== array input
class _ArraySlide(Slide):
    def __init__(self, arr: np.ndarray):
        self.path = None
        self._arr = _rgb_or_error(np.asarray(arr), "image array")
        self.height, self.width = self._arr.shape[:2]
        self.levels = [(self.width, self.height)]
        self.um_per_px_embedded = None

    def _level_array(self, level: int) -> np.ndarray:
        return self._arr

    def _region(self, x0, y0, x1, y1) -> np.ndarray:
        return self._arr[y0:y1, x0:x1]


def open_slide(image) -> Slide:
    """Open an H&E image (path to a TIFF/JPEG/PNG, or an ``(H, W, 3)`` uint8 array).

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        Corrupt file, grayscale, 16-bit, transparent RGBA, or a JPEG/PNG too large to
        decode whole (the message says how to convert it).
    """
    if isinstance(image, Slide):
        return image
    if isinstance(image, np.ndarray):
        return _ArraySlide(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"image must be a file path or an (H, W, 3) uint8 array, got "
                        f"{type(image).__name__}")
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"H&E image not found: {path}. Check the path.")
    return _TiffSlide(path) if is_tiff(path) else _PILSlide(path)


# =============================================================================== tissue
def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image (0 for black and white)."""
    img = rgb.astype(np.float32)
    top = img.max(axis=2)
    return np.where(top > 0, (top - img.min(axis=2)) / np.maximum(top, 1.0), 0.0)


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= r * r


def tissue_mask(thumb: np.ndarray, *, um_per_px: float, threshold: float | None = None,
                min_piece_mm2: float = MIN_PIECE_MM2) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``um_per_px`` wide.

    Saturation above ``threshold`` (default: Otsu's threshold of the thumbnail's
    saturation, at least :data:`MIN_SATURATION`), closed and opened with a ~20 um disk,
    holes filled, pieces under ``min_piece_mm2`` removed. On a fine thumbnail the
    clean-up runs on blocks of pixels (majority vote) so that the disk stays small, and
    the result is expanded back to the thumbnail's size.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sat = saturation(thumb)
    if threshold is None:
        flat = sat.ravel()
        threshold = MIN_SATURATION
        if np.ptp(flat) > 0:
            threshold = max(MIN_SATURATION, float(threshold_otsu(flat, nbins=128)))
    full = sat > threshold
    # clean up at a resolution where the ~20 um disk is at most ~4 px wide: the cost of
    # binary morphology grows with the disk's area
    radius = 20.0 / um_per_px
    f = max(1, int(math.ceil(radius / 4)))
    if f > 1:
        h, w = full.shape
        pad = np.pad(full, ((0, -h % f), (0, -w % f)))
        mask = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).mean(axis=(1, 3)) >= 0.5
    else:
        mask = full
    um = um_per_px * f
    if radius / f >= 1:
        disk = _disk(radius / f)
        mask = ndimage.binary_closing(mask, structure=disk, border_value=0)
        mask = ndimage.binary_opening(mask, structure=disk, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        min_px = min_piece_mm2 * 1e6 / (um ** 2)
        mask = (sizes >= min_px)[labels]
    if f > 1:
        mask = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[:full.shape[0], :full.shape[1]]
    return mask


def lay_spots(mask: np.ndarray, *, mask_um_per_px: float, pitch_um: float,
              diameter_um: float, grid: str = "square", min_tissue: float = 0.5):
    """Spot centres over the tissue of ``mask``.

    Parameters
    ----------
    mask
        Boolean tissue mask (e.g. of a thumbnail).
    mask_um_per_px
        Microns per mask pixel.
    pitch_um, diameter_um
        Centre-to-centre distance and spot diameter in microns.
    grid
        ``"square"`` (legacy ST 1k: rows and columns one pitch apart), ``"checkerboard"``
        (legacy ST 2k: rows half a pitch apart, every other row shifted by half a pitch,
        so nearest neighbours are diagonal at ``pitch / sqrt(2)``) or ``"hex"`` (Visium:
        rows ``pitch * sqrt(3) / 2`` apart, every other row shifted by half a pitch).
        ``pitch_um`` is the distance of neighbouring spots in the same row.
    min_tissue
        Keep spots whose disk is at least this share tissue.

    Returns
    -------
    centres, array_xy, tissue_share
        ``(n, 2)`` float centres ``(x, y)`` in mask pixels, ``(n, 2)`` int array
        coordinates (square: column, row; checkerboard and hex: 2 * column + row parity,
        row, as a 2k array's and Visium's ``array_col``, ``array_row``), and the tissue
        share of each spot's disk.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS} (legacy ST 1k, legacy ST 2k, Visium), "
                         f"got {grid!r}")
    for name, v in (("pitch_um", pitch_um), ("diameter_um", diameter_um),
                    ("mask_um_per_px", mask_um_per_px)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        empty = np.zeros((0, 2))
        return empty, empty.astype(np.int64), np.zeros(0)
    pitch = pitch_um / mask_um_per_px
    dy = pitch * {"square": 1.0, "checkerboard": 0.5, "hex": math.sqrt(3) / 2}[grid]
    x0, y0 = xs.min() + pitch / 2, ys.min() + dy / 2
    n_rows = int((ys.max() - y0) // dy) + 1
    n_cols = int((xs.max() - x0) // pitch) + 2
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    rows, cols = rows.ravel(), cols.ravel()
    shift = (rows % 2) * 0.5 * pitch if grid != "square" else 0.0
    cx = x0 + cols * pitch + shift
    cy = y0 + rows * dy
    # tissue share inside each spot's disk, sampled at mask pixels
    r = max(0.5, diameter_um / mask_um_per_px / 2)
    ri = int(math.ceil(r))
    oy, ox = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    inside = (ox * ox + oy * oy) <= r * r
    oy, ox = oy[inside], ox[inside]
    px = np.clip(np.round(cx)[:, None].astype(int) + ox[None], 0, mask.shape[1] - 1)
    py = np.clip(np.round(cy)[:, None].astype(int) + oy[None], 0, mask.shape[0] - 1)
    share = mask[py, px].mean(axis=1)
    keep = share >= min_tissue
    array_xy = (np.stack([2 * cols + rows % 2, rows], axis=1) if grid != "square"
                else np.stack([cols, rows], axis=1))
    return (np.stack([cx, cy], axis=1)[keep], array_xy[keep].astype(np.int64), share[keep])
