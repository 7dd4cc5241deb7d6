"""File helpers shared by the loaders: images, tables, gzipped files.

Private to :mod:`mclstexp_lite.datasets` (the names carry no underscore because the
module is private).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np

from .. import _util
from .. import download as dl
from .._slides import open_slide

#: Longest side of the downscaled image stored in ``uns['spatial'][lib]['images']['hires']``.
HIRES_MAX_PX = 2000
#: Share of a spot file's rows that may be dropped before a warning says so.
DROPPED_WARN_SHARE = 0.10
#: PIL's decompression-bomb limit while a loader reads an image (full-resolution H&E
#: scans exceed PIL's default of ~89 megapixels); set for that read only
#: (:func:`mclstexp_lite._util.pil_pixel_limit`), never for the whole process.
MAX_IMAGE_PIXELS = 2_000_000_000


def image_pixel_limit():
    """PIL's size guard at :data:`MAX_IMAGE_PIXELS` (or the process's own limit, if
    higher) for one read: a context manager."""
    from PIL import Image

    return _util.pil_pixel_limit(max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS))


#: What to do about an unreadable image: one of the manifest's files (download it again)
#: or the user's own (check and export it again).
FIX_MANIFEST = ("delete it and download it again (its checksum is in data_manifest.csv; "
                "the loader fetches it again)")
FIX_OWN = ("check that it opens in an image viewer, and export or copy it again from the "
           "scanner software or wherever it came from")


def open_image(path: Path, *, fix: str = FIX_OWN):
    """Open an image (plain or .gz) with PIL, with a clear error for broken files.

    ``fix`` is the advice for an unreadable file (:data:`FIX_OWN` for a user's image,
    :data:`FIX_MANIFEST` for one of the manifest's). Call it inside
    :func:`image_pixel_limit` (PIL checks the size when it opens a file).
    """
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path}. Check the path.")
    try:
        img = Image.open(path)
        img.size  # noqa: B018 - forces the header to be read
        return img
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(
            f"cannot read the image {path}: {exc}. The file is corrupt or not an image; "
            f"{fix}.") from exc


def downscaled_rgb(path: Path, max_px: int, *, fix: str = FIX_OWN
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (RGB uint8 array with longest side <= max_px, (width, height) of the source).
    ``fix``: the advice for an unreadable file (:func:`open_image`)."""
    from PIL import Image

    with image_pixel_limit():  # PIL checks the size at open and (TIFF) at decode
        img = open_image(path, fix=fix)
        src_size = img.size
        scale = min(1.0, max_px / max(src_size))
        target = (max(1, round(src_size[0] * scale)), max(1, round(src_size[1] * scale)))
        try:
            if img.format == "JPEG":
                img.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale: much faster
            img = img.convert("RGB")
            if img.size != target:
                img = img.resize(target, Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8).copy()
        except OSError as exc:
            raise ValueError(
                f"cannot decode the image {path}: {exc}. The file is truncated or corrupt; "
                f"{fix}.") from exc
    return arr, src_size


def image_array_file(arr: np.ndarray, *, what: str = "image array") -> Path:
    """Save an ``(H, W, 3)`` uint8 image held in memory as a PNG in the cache (named by
    its content, written once, atomically) and return its path: patches are cut from
    files (:mod:`mclstexp_lite._patch_cache`), so an image given as an array needs one.

    Raises ``ValueError`` for anything but 8-bit RGB (or fully opaque RGBA)."""
    import hashlib

    from PIL import Image

    with open_slide(np.asarray(arr)) as slide:  # dtype, channels, transparency checked
        rgb = np.ascontiguousarray(slide.read_region(0, 0, slide.width, slide.height))
    digest = hashlib.sha256(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()[:24]
    out = dl.cache_dir() / "arrays" / f"{digest}.png"
    if not out.exists():
        _util.atomic_write(out, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG",
                                                                      compress_level=1),
                           suffix=".png")
    return out


def integer_counts(matrix, what: str):
    """Return ``(csr int32, None)`` if ``matrix`` holds non-negative whole numbers that fit
    int32, else ``(None, reason)``."""
    from scipy import sparse

    m = sparse.csr_matrix(matrix) if not sparse.issparse(matrix) else matrix.tocsr()
    data = np.asarray(m.data)
    if data.size and not np.issubdtype(data.dtype, np.number):
        return None, f"{what} is not numeric ({data.dtype})"
    if data.size:
        if np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all():
                return None, f"{what} holds NaN or infinite values"
            frac = data != np.round(data)
            if frac.any():
                return None, (f"{what} holds non-integer values (e.g. "
                              f"{float(data[frac][0]):.4g}): normalised or log data, not "
                              "raw counts")
        if data.min() < 0:
            return None, f"{what} holds negative values (e.g. {data.min()})"
        if data.max() > np.iinfo(np.int32).max:
            return None, f"{what} holds values above the int32 range (max {data.max()})"
    out = sparse.csr_matrix(m, dtype=np.int32)
    out.eliminate_zeros()
    return out, None


def raw_counts(adata, what: str = ""):
    """The raw integer counts of an AnnData: ``X``, else ``layers['counts']``, else
    ``raw.X`` (:func:`integer_counts`). Returns ``(csr int32, where, var)`` (``var`` of
    the matrix taken), or ``(None, reasons, None)`` when none holds counts; ``what``
    heads each place's name in the reasons (e.g. the file name)."""
    reasons = []
    for where, matrix, var in (
            ("X", adata.X, adata.var),
            ("layers['counts']", adata.layers["counts"] if "counts" in adata.layers else None,
             adata.var),
            ("raw.X", adata.raw.X if adata.raw is not None else None,
             adata.raw.var if adata.raw is not None else None)):
        if matrix is None:
            continue
        X, why = integer_counts(matrix, f"{what} {where}" if what else where)
        if X is not None:
            return X, where, var
        reasons.append(why)
    return None, reasons, None


def plain_var(var):
    """A copy of ``var`` with a plain string index and its columns kept (gene ids,
    symbols: other names a panel can match) as numbers, booleans or strings."""
    import pandas as pd

    out = pd.DataFrame(index=pd.Index(np.asarray(var.index).astype(str), name=None))
    for col in var.columns:
        values = var[col]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            out[col] = values.to_numpy()
        else:
            out[col] = values.astype(str).to_numpy()
    return out


def read_table(path: Path, **kw):
    """A count / spot / label table: tab-separated, or comma-separated for a ``.csv``
    name (gzip allowed), with an error that names the file and the likely fix."""
    import pandas as pd

    as_csv = str(path).endswith((".csv", ".csv.gz"))
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the file was not written completely or "
                         "is the wrong file; write or copy it again.")
    try:
        df = pd.read_csv(path, sep=None if as_csv else "\t",
                         engine="python" if as_csv else "c", **kw)
    except Exception as exc:  # pandas raises many kinds; give them context
        raise ValueError(f"cannot read the table {path}: {type(exc).__name__}: {exc}") from exc
    if not as_csv and df.shape[1] <= 1:
        header = str(df.index.name or "") + " " + " ".join(map(str, df.columns))
        if header.count(",") >= 2 or header.count(";") >= 2:
            sep = "," if header.count(",") >= header.count(";") else ";"
            raise ValueError(
                f"{path}: read as tab-separated (its name does not end in .csv) but its header "
                f"is separated by '{sep}' ({header.strip()[:60]!r}...). Rename it to .csv, or "
                "save it with tabs.")
    return df


def looks_like_spot_file(columns) -> bool:
    """The columns of a legacy-ST spot file (``pixel_x``, ``pixel_y``)?"""
    return {"pixel_x", "pixel_y"} <= {str(c) for c in columns}


def looks_like_spot_ids(names) -> bool:
    """Do most of the first 50 names look like legacy-ST spot ids (``"12x7"``)?"""
    import re

    names = [str(n) for n in list(names)[:50]]
    return bool(names) and sum(bool(re.fullmatch(r"\d+(\.\d+)?x\d+(\.\d+)?", n))
                               for n in names) > len(names) / 2


def unpack_gz(path: Path) -> Path:
    """Decompress ``x.jpg.gz`` once into the cache; return the plain file's path."""
    if not str(path).endswith(".gz"):
        return path
    out_dir = dl.cache_dir() / "unpacked"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name[:-3]
    if out.exists() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    def unpack(tmp):
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    _util.atomic_write(out, unpack)
    return out
