"""Loaders that turn spatial-transcriptomics sections into AnnData.

Every loader returns one :class:`anndata.AnnData` per section with the layout described
in ``docs/data_model.md``: raw integer counts in ``X`` (sparse), genes as ``var_names``,
section/patient/array and pixel coordinates in ``obs``, ``obsm['spatial']`` and
``uns['spatial'][section]`` (a downscaled image plus scale factors) so that
``scanpy.pl.spatial`` and ``squidpy.pl.spatial_scatter`` draw the spots on the tissue, and
the path of the source image that patches are cut from.

- :func:`her2st` - HER2-positive breast cancer, legacy ST (Andersson et al. 2021), 36 sections
- :func:`cscc` - cutaneous squamous cell carcinoma, legacy ST (Ji et al. 2020), 12 sections
- :func:`visium` - a 10x Visium Space Ranger ``outs`` folder
- :func:`from_files` - your own section: count table + spot file + H&E image
- :func:`hest` - one HEST-1k sample (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json)
- :func:`list_sections` - which sections exist and which are available locally
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from . import download as dl

log = logging.getLogger(__name__)

HER2ST_SECTIONS: tuple[str, ...] = tuple(
    [f"{p}{i}" for p in "ABCD" for i in range(1, 7)]
    + [f"{p}{i}" for p in "EFGH" for i in range(1, 4)]
)
#: The 32 sections the mclSTExp paper uses (sorted names[1:33]: A2 ... G3).
PAPER_HER2ST_SECTIONS: tuple[str, ...] = tuple(sorted(HER2ST_SECTIONS)[1:33])
CSCC_SECTIONS: tuple[str, ...] = tuple(
    f"{p}_ST_rep{r}" for p in ("P2", "P5", "P9", "P10") for r in (1, 2, 3)
)
#: Centre-to-centre spot distance in micrometres.
LEGACY_ST_PITCH_UM = 200.0
VISIUM_PITCH_UM = 100.0
LEGACY_ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Longest side of the downscaled image stored in ``uns['spatial'][lib]['images']['hires']``.
HIRES_MAX_PX = 2000


# ------------------------------------------------------------------------ helpers
def _open_image(path: Path):
    """Open an image (plain or .gz) with PIL, with a clear error for broken files."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 2_000_000_000)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"image file not found: {path}. Check the path, or fetch the section's files "
            "with mclstexp_lite.download.fetch(dataset, section) (see data_manifest.csv).")
    try:
        img = Image.open(path)
        img.size  # noqa: B018 - forces the header to be read
        return img
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(
            f"cannot read the image {path}: {exc}. The file is corrupt or not an image; "
            f"delete it and download it again (its checksum is in data_manifest.csv)."
        ) from exc


def _downscaled_rgb(path: Path, max_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return (RGB uint8 array with longest side <= max_px, (width, height) of the source)."""
    from PIL import Image

    img = _open_image(path)
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
            f"delete it and download it again.") from exc
    return arr, src_size


def spot_pitch_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Pixels per array step, from a least-squares fit of pixel on array coordinates.

    The fit uses every spot, so a few misplaced spots barely move it. For HER2+
    full-resolution images it gives ~291 px (200 um / 291 px = 0.69 um/px); on A1's
    reduced image ~63 px. (The median nearest-neighbour distance is biased low by spots
    detected slightly off the grid, ~272 px, so it is not used.)
    """
    steps = _axis_steps(array_xy, pixel_xy, "spot pitch")
    slopes = [s for s in steps if np.isfinite(s)]
    if not slopes or min(slopes) == 0:
        raise ValueError("cannot measure the spot pitch: spot array coordinates do not vary "
                         "or pixel coordinates do not follow them")
    return float(np.mean(slopes))


def _axis_steps(array_xy, pixel_xy, what: str) -> np.ndarray:
    """Least-squares pixels per array step along x and y (NaN for an axis that does not vary)."""
    a = np.asarray(array_xy, dtype=float)
    p = np.asarray(pixel_xy, dtype=float)
    if len(a) < 3:
        raise ValueError(f"need at least three spots to measure the {what}")
    return np.array([abs(np.polyfit(a[:, k], p[:, k], 1)[0]) if np.ptp(a[:, k]) > 0 else np.nan
                     for k in range(2)])


def grid_spacing_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Centre-to-centre distance of neighbouring spots, in pixels, on the fitted grid.

    Each spot is placed at its array coordinates times the least-squares pixels per array
    step of each axis (as in :func:`spot_pitch_px`, so detection jitter does not bias it);
    the result is the median distance to the nearest other spot. On a square array where
    one array step is one spot pitch (legacy ST, HER2+) it equals :func:`spot_pitch_px`
    up to the small difference between the two axes; on a staggered array, where
    neighbouring spots are two x steps apart (one x step is half the pitch), it is about
    twice as large.
    """
    from scipy.spatial import cKDTree

    a = np.asarray(array_xy, dtype=float)
    steps = _axis_steps(array_xy, pixel_xy, "spot spacing")
    q = a * np.where(np.isfinite(steps), steps, 1.0)
    dist, _ = cKDTree(q).query(q, k=2)
    d = dist[:, 1]
    d = d[d > 0]
    if len(d) == 0:
        raise ValueError("cannot measure the spot spacing: every spot has the same position")
    return float(np.median(d))


#: Fitted pixels per array step and neighbour spacing agree within this factor on a
#: square array; beyond it the array is taken to be staggered (or scaled) and the
#: neighbour spacing is used as the spot pitch.
_PITCH_AGREEMENT = 1.25
#: Share of a spot file's rows that may be dropped before a warning says so.
_DROPPED_WARN_SHARE = 0.10
#: A pixel counts as stained tissue when its HSV saturation exceeds this (H&E tissue is
#: pink/purple, glass background white or black): 93-99 % of HER2+ spots, 16-35 % of
#: their images' pixels.
_TISSUE_SATURATION = 0.1
#: Fewer spots than this share on stained tissue: wrong image or scale (a warning).
_MIN_SPOTS_ON_TISSUE = 0.5
#: The spots' bounding box (plus one pitch) covers less than this share of the image: a
#: warning (HER2+: 33-46 %).
_MIN_SPOT_COVERAGE = 0.02
#: Stain contrast: the share of stained pixels within half a pitch of a spot centre over
#: the share in the rest of the image. The 7 HER2+ sections with an image: 4.3-17.6; their
#: spots on another patient's image: 1.0-4.1, on another section of the same patient:
#: 1.0-5.3 (docs/data_model.md). Below this, a warning.
_MIN_STAIN_CONTRAST = 3.0
#: ... unless the rest of the image is itself mostly stained (an image cropped to the
#: tissue), where the comparison says nothing (HER2+: 5-23 % of the rest is stained).
_MAX_STAINED_ELSEWHERE = 0.5


def _near_spots(shape, xy, radius) -> np.ndarray:
    """Boolean mask of the pixels of an image of ``shape`` within ``radius`` of a point."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    r = max(float(radius), 0.5)
    k = int(np.ceil(r))
    oy, ox = np.mgrid[-k:k + 1, -k:k + 1]
    for x, y in np.round(xy).astype(int):
        ys, xs = oy + y, ox + x
        ok = (ox ** 2 + oy ** 2 <= r * r) & (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        mask[ys[ok], xs[ok]] = True
    return mask


def _stain_contrast(stained: np.ndarray, xy, radius) -> tuple[float, float, float]:
    """(stained share within ``radius`` of the spots, stained share elsewhere, their ratio)."""
    near = _near_spots(stained.shape, xy, radius)
    under = float(stained[near].mean()) if near.any() else 0.0
    rest = float(stained[~near].mean()) if (~near).any() else 0.0
    ratio = under / rest if rest > 0 else (float("inf") if under > 0 else float("nan"))
    return under, rest, ratio


def _check_spots_on_image(section, image, pix, hires, scalef, size, pitch_px,
                          pixel_scale=1.0) -> dict:
    """Warn when the spots do not sit on the image's tissue; returns the measures.

    Three measures on the downscaled image, stained = HSV saturation above
    :data:`_TISSUE_SATURATION`: the share of spot centres on stained pixels, the share of
    the image inside the spots' bounding box, and the stain contrast (the stained share
    within half a pitch of a spot centre over the stained share in the rest of the image).
    """
    img = hires.astype(np.float32) / 255.0
    top = img.max(axis=2)
    sat = (top - img.min(axis=2)) / np.maximum(top, 1e-6)
    stained = sat > _TISSUE_SATURATION
    xy = np.round(pix * scalef).astype(int)
    xy[:, 0] = np.clip(xy[:, 0], 0, sat.shape[1] - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, sat.shape[0] - 1)
    on_tissue = float(stained[xy[:, 1], xy[:, 0]].mean())
    under, elsewhere, contrast = _stain_contrast(stained, pix * scalef, pitch_px * scalef / 2)
    w, h = size
    lo, hi = pix.min(axis=0) - pitch_px, pix.max(axis=0) + pitch_px
    coverage = float(max(0.0, min(hi[0], w) - max(lo[0], 0)) * max(0.0, min(hi[1], h) - max(lo[1], 0))
                     / (w * h))
    if coverage < _MIN_SPOT_COVERAGE:
        warnings.warn(
            f"{section}: the spots cover only {coverage:.1%} of the image {image} ({w} x {h} "
            "px). The spot pixels are probably in another frame or scale: check pixel_scale "
            "and that the image belongs to this section.", UserWarning, stacklevel=3)
    if on_tissue < _MIN_SPOTS_ON_TISSUE:
        warnings.warn(
            f"{section}: only {on_tissue:.0%} of the spots lie on stained tissue of {image} "
            f"(HSV saturation > {_TISSUE_SATURATION}; on the HER2+ sections 93-99 %). Wrong "
            "image, or wrong pixel_scale?", UserWarning, stacklevel=3)
    elif contrast < _MIN_STAIN_CONTRAST and elsewhere <= _MAX_STAINED_ELSEWHERE:
        warnings.warn(
            f"{section}: little stain under the spots compared with the rest of the image "
            f"{image}: {under:.0%} of the pixels within half a pitch of a spot are stained, "
            f"{elsewhere:.0%} elsewhere ({contrast:.2f}x; {_MIN_STAIN_CONTRAST:g}x or more "
            "expected, 4.3-17.6x on the HER2+ sections). The image probably belongs to "
            f"another section, or the spot pixels are in another scale: check the image "
            f"file and pixel_scale (now {pixel_scale:g}). (A false alarm when much of the "
            "tissue lies outside the spot array.)", UserWarning, stacklevel=3)
    return {"spots_on_tissue": round(on_tissue, 4), "spot_coverage": round(coverage, 4),
            "stain_under_spots": round(under, 4), "stain_elsewhere": round(elsewhere, 4),
            "stain_contrast": round(contrast, 3)}


def _read_table(path: Path, **kw):
    import pandas as pd

    as_csv = str(path).endswith((".csv", ".csv.gz"))
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


def _looks_like_spot_file(columns) -> bool:
    return {"pixel_x", "pixel_y"} <= {str(c) for c in columns}


def _looks_like_spot_ids(names) -> bool:
    import re

    names = [str(n) for n in list(names)[:50]]
    return bool(names) and sum(bool(re.fullmatch(r"\d+(\.\d+)?x\d+(\.\d+)?", n))
                               for n in names) > len(names) / 2


def _unpack_gz(path: Path) -> Path:
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

    dl.atomic_write(out, unpack)
    return out


# --------------------------------------------------------------------- from_files
def from_files(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None,
    *,
    section: str,
    patient: str | None = None,
    labels: str | os.PathLike | None = None,
    pixel_scale: float = 1.0,
    um_per_px: float | None = None,
    spot_pitch_um: float = LEGACY_ST_PITCH_UM,
    spot_diameter_um: float = LEGACY_ST_SPOT_DIAMETER_UM,
    counts_orientation: str = "spots_x_genes",
    drop_zero_count_spots: bool = True,
    selected: bool = True,
    hires_max_px: int = HIRES_MAX_PX,
    image_sha256: str = "",
    dataset: str = "custom",
    gene_map=None,
):
    """Build an AnnData for one legacy-ST-style section from its three files.

    Parameters
    ----------
    counts
        Tab-separated (or .csv) count table, optionally gzipped. Rows are spots named
        ``"{x}x{y}"`` by their array coordinates and columns genes (the ST pipeline's
        ``*_stdata.tsv``), or the transpose with ``counts_orientation="genes_x_spots"``.
    spots
        Spot file with at least the columns ``x``, ``y`` (array coordinates, may be
        fractional) and ``pixel_x``, ``pixel_y`` (spot centres in image pixels); a
        ``selected`` column, when present, keeps only rows with 1 (see ``selected``).
    image
        H&E image the spot pixels refer to (any format PIL reads, .gz allowed), or
        ``None`` for expression only.
    section, patient
        Names stored in ``obs`` (patient defaults to the section name).
    labels
        Optional pathologist label table with columns ``x``, ``y``, ``label``; joined on
        the rounded array coordinates.
    pixel_scale
        Factor from the spot file's pixel frame to ``image``'s frame (1.0 when the image
        is the one the spot file was made on; e.g. 2000/6954 for HER2+ A1's reduced image).
    um_per_px
        Microns per pixel of ``image``, when you know it (e.g. from the scanner). It wins
        over the estimate below; a warning says when the spots disagree with it by more
        than a quarter.
    spot_pitch_um, spot_diameter_um
        Centre-to-centre distance and diameter of the spots (legacy ST: 200 and 100 um).
        Without ``um_per_px`` the scale is ``spot_pitch_um`` divided by the spot pitch in
        pixels: the least-squares pixels per array step (:func:`spot_pitch_px`, the mean
        over both axes). When that disagrees with the spacing of neighbouring spots on the
        fitted grid (:func:`grid_spacing_px`) by more than a factor 1.25, the array is
        staggered (one array step is not one pitch, e.g. x steps of half a pitch): the
        neighbour spacing is used instead, with a warning that names both.
    drop_zero_count_spots
        Spots with no counts carry no expression to learn from; they are dropped
        (``False`` keeps them).
    selected
        ``True`` (default): a ``selected`` column of the spot file keeps only rows with 1
        (the spots the ST pipeline found under tissue). ``False`` ignores the column and
        keeps every row.
    hires_max_px
        Longest side of the downscaled copy stored for plotting.
    gene_map
        Optional table from the count table's gene names (ids, e.g. Ensembl) to symbols:
        a file whose first column holds the ids and second the symbols (tab-separated, a
        ``.csv`` name means commas; header optional; a 10x ``features.tsv.gz`` works), or
        a mapping ``{id: symbol}`` (:func:`mclstexp_lite.pp.read_gene_map`, which
        refuses an id with several symbols). ``var_names`` stay the counts' names; the
        symbols go to ``var['gene_symbols']`` (``""`` where the table has none), where
        :func:`mclstexp_lite.pp.subset_genes` finds them, so a panel of symbols works.

    Returns
    -------
    anndata.AnnData
        Layout as in ``docs/data_model.md``. ``uns['mclstexp']['spots_dropped']`` counts
        the spots left out, by reason: ``not_selected``, ``counts_without_spot_row``,
        ``spot_rows_without_counts``, ``zero_counts``. When they are more than a tenth of
        the spot file's rows a warning says so.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    counts, spots = Path(counts), Path(spots)
    for what, path in (("counts", counts), ("spots", spots), ("image", image),
                       ("labels", labels)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} file not found: {path} (the `{what}` argument of "
                                    "from_files); check the path.")
    if pixel_scale <= 0:
        raise ValueError(f"pixel_scale must be > 0, got {pixel_scale}")
    if um_per_px is not None and not (isinstance(um_per_px, (int, float)) and um_per_px > 0):
        raise ValueError(f"um_per_px must be a positive number of microns per image pixel "
                         f"(or None to estimate it from the spots), got {um_per_px!r}")
    if counts_orientation not in ("spots_x_genes", "genes_x_spots"):
        raise ValueError("counts_orientation must be 'spots_x_genes' or 'genes_x_spots', "
                         f"got {counts_orientation!r}")
    patient = patient if patient is not None else section

    # counts ---------------------------------------------------------------
    cnt = _read_table(counts, index_col=0)
    if _looks_like_spot_file(cnt.columns):
        raise ValueError(f"{counts} has the columns of a spot file (pixel_x, pixel_y), not "
                         f"a count table: are the counts and spots arguments swapped? "
                         f"(spots: {spots})")
    if counts_orientation == "genes_x_spots":
        cnt = cnt.T
    if cnt.shape[0] == 0 or cnt.shape[1] == 0:
        raise ValueError(f"{counts}: the count table is empty ({cnt.shape[0]} spots x "
                         f"{cnt.shape[1]} genes)")
    cnt.index = cnt.index.astype(str)
    dup = cnt.index[cnt.index.duplicated()].unique()
    if len(dup):
        raise ValueError(f"{counts}: {len(dup)} duplicated spot id(s), e.g. {list(dup[:5])}. "
                         "Each spot must appear once; fix or deduplicate the file.")
    values = cnt.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        bad = [c for c in cnt.columns if not pd.api.types.is_numeric_dtype(cnt[c])][:5]
        raise ValueError(f"{counts}: non-numeric count columns, e.g. {bad}. Is the table "
                         "transposed (try counts_orientation='genes_x_spots') or not tab-separated?")
    if np.isnan(values).any():
        raise ValueError(f"{counts}: {int(np.isnan(values).sum())} missing (NaN) count(s); "
                         "counts must be complete non-negative integers.")
    if (values < 0).any():
        raise ValueError(f"{counts}: {int((values < 0).sum())} negative count(s); raw counts "
                         "must be non-negative.")
    if not np.allclose(values, np.round(values)):
        raise ValueError(f"{counts}: counts are not integers (is this already normalised?). "
                         "Load raw counts; normalisation is done by mclstexp_lite.pp.normalize.")

    # spots ----------------------------------------------------------------
    sp = _read_table(spots)
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(sp.columns):
        swapped = (" It looks like a count table (many columns, spot ids in the first): are "
                   f"the counts and spots arguments swapped? (counts: {counts})"
                   if sp.shape[1] > 20 else "")
        raise ValueError(f"{spots}: spot file needs columns {sorted(need)}, found "
                         f"{list(sp.columns)[:10]}{' ...' if sp.shape[1] > 10 else ''}."
                         + swapped)
    n_rows = len(sp)
    dropped = {"not_selected": 0, "counts_without_spot_row": 0, "spot_rows_without_counts": 0,
               "zero_counts": 0}
    if "selected" in sp.columns and selected:
        keep_sel = sp["selected"] == 1
        dropped["not_selected"] = int((~keep_sel).sum())
        sp = sp[keep_sel]
    coord_cols = ["x", "y", "pixel_x", "pixel_y"]
    text_cols = [c for c in coord_cols if not pd.api.types.is_numeric_dtype(sp[c])]
    if text_cols:
        raise ValueError(f"{spots}: non-numeric values in column(s) {text_cols}; the spot file "
                         "must hold numbers in x, y, pixel_x, pixel_y (is it tab-separated?)")
    no_coord = ~np.isfinite(sp[coord_cols].to_numpy(float)).all(axis=1)
    if no_coord.any():
        raise ValueError(f"{spots}: {int(no_coord.sum())} spot row(s) with missing (NaN) x, y, "
                         f"pixel_x or pixel_y, e.g. row(s) {list(sp.index[no_coord][:5])}; remove "
                         "them or set their 'selected' column to 0.")
    ax = np.round(sp["x"].to_numpy(float)).astype(int)
    ay = np.round(sp["y"].to_numpy(float)).astype(int)
    sp = sp.assign(array_x=ax, array_y=ay,
                   spot_id=[f"{a}x{b}" for a, b in zip(ax, ay)]).set_index("spot_id")
    dup = sp.index[sp.index.duplicated()].unique()
    if len(dup):
        raise ValueError(f"{spots}: {len(dup)} spot(s) share rounded array coordinates, e.g. "
                         f"{list(dup[:5])}; the file is not a legacy-ST spot selection.")
    common = cnt.index.intersection(sp.index, sort=False)
    if len(common) == 0:
        hint = " Are they from the same section?"
        if _looks_like_spot_ids(cnt.columns) and not _looks_like_spot_ids(cnt.index):
            other = ("genes_x_spots" if counts_orientation == "spots_x_genes"
                     else "spots_x_genes")
            hint = (f" The count table's columns look like spot ids (e.g. {list(cnt.columns[:3])}): "
                    f"pass counts_orientation={other!r}.")
        raise ValueError(
            f"no spot ids shared between {counts} (e.g. {list(cnt.index[:3])}) and the "
            f"rounded array coordinates of {spots} (e.g. {list(sp.index[:3])})." + hint)
    dropped["counts_without_spot_row"] = len(cnt.index) - len(common)
    dropped["spot_rows_without_counts"] = len(sp.index) - len(common)
    cnt = cnt.loc[common]
    sp = sp.loc[common]
    totals = cnt.to_numpy().sum(axis=1)
    if drop_zero_count_spots and (totals == 0).any():
        keep = totals > 0
        dropped["zero_counts"] = int((~keep).sum())
        cnt, sp = cnt[keep], sp[keep]
    lost = sum(v for k, v in dropped.items() if k != "counts_without_spot_row")
    if any(dropped.values()):
        reasons = (f"{dropped['not_selected']} with selected != 1 in {spots}"
                   + ("" if selected else " (ignored: selected=False)")
                   + f", {dropped['spot_rows_without_counts']} spot row(s) without a count "
                   f"row, {dropped['zero_counts']} with zero counts; plus "
                   f"{dropped['counts_without_spot_row']} count row(s) without a spot row")
        msg = (f"{section}: kept {len(sp)} of the {n_rows} rows of the spot file; dropped "
               f"{reasons}.")
        if n_rows and lost > _DROPPED_WARN_SHARE * n_rows:
            hint = (" Pass selected=False to keep the rows the spot file marks as not "
                    "selected." if dropped["not_selected"] else "")
            warnings.warn(msg + hint, UserWarning, stacklevel=2)
        else:
            log.info("%s", msg)
    if len(cnt) == 0:
        raise ValueError(f"{counts}: no spots with counts left after matching {spots}")

    pix = sp[["pixel_x", "pixel_y"]].to_numpy(float) * pixel_scale
    obs = pd.DataFrame({
        "section": pd.Categorical([section] * len(sp)),
        "patient": pd.Categorical([patient] * len(sp)),
        "array_x": sp["array_x"].to_numpy(int),
        "array_y": sp["array_y"].to_numpy(int),
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
    }, index=[f"{section}_{i}" for i in sp.index])

    if labels is not None:
        lab = _read_table(Path(labels))
        if not {"x", "y", "label"} <= set(lab.columns):
            raise ValueError(f"{labels}: label file needs columns x, y, label; found "
                             f"{list(lab.columns)}")
        lab = lab.dropna(subset=["x", "y"])
        key = [f"{a}x{b}" for a, b in zip(np.round(lab["x"]).astype(int),
                                            np.round(lab["y"]).astype(int))]
        lab_map = dict(zip(key, lab["label"].astype(str)))
        obs["label"] = pd.Categorical([lab_map.get(i) for i in sp.index])
        n_lab = int(obs["label"].notna().sum())
        log.info("%s: %d of %d spots carry a pathologist label", section, n_lab, len(obs))

    X = sparse.csr_matrix(cnt.to_numpy().astype(np.int32))
    var = pd.DataFrame(index=pd.Index(cnt.columns.astype(str), name=None))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if gene_map is not None:
        from . import pp

        mapping = pp.read_gene_map(gene_map, what="gene_map")
        where = gene_map if isinstance(gene_map, (str, os.PathLike)) else "the gene_map mapping"
        plain = {pp._unversioned(k): v for k, v in mapping.items()}
        names = [pp._unversioned(str(n)) for n in adata.var_names]
        symbols = [plain.get(n, "") for n in names]
        n_mapped = sum(bool(x) for x in symbols)
        if n_mapped == 0:
            values = {pp._unversioned(v) for v in mapping.values()}
            if any(n in values for n in names):
                raise ValueError(
                    f"{counts}: its gene names are in the second column of {where}, not the "
                    "first: the first column must hold the count table's names (the ids), "
                    "the second the symbols. Swap the columns, or drop gene_map= if the "
                    "counts already use symbols.")
            raise ValueError(
                f"none of the gene names of {counts} (e.g. {list(adata.var_names[:3])}) is "
                f"in the first column of {where} (e.g. {list(mapping)[:3]}). Is the table "
                "for another organism or annotation?")
        if n_mapped < adata.n_vars / 2:
            warnings.warn(
                f"{section}: {where} gives a symbol to only {n_mapped} of the "
                f"{adata.n_vars} genes of {counts}; the others keep an empty "
                "var['gene_symbols']. Check that the table matches the counts' annotation.",
                UserWarning, stacklevel=2)
        adata.var["gene_ids"] = adata.var_names.astype(str)
        adata.var["gene_symbols"] = symbols
    adata.obsm["spatial"] = pix.astype(np.float64)

    arr_xy = sp[["x", "y"]].to_numpy(float)
    pitch_px = spot_pitch_px(arr_xy, pix)
    spacing_px = grid_spacing_px(arr_xy, pix)
    ratio = spacing_px / pitch_px
    scale_source = "spot pitch: least-squares pixels per array step"
    if not 1 / _PITCH_AGREEMENT <= ratio <= _PITCH_AGREEMENT:
        scale_source = "spot pitch: neighbour spacing (staggered array)"
        if um_per_px is None:
            warnings.warn(
                f"{section}: one array step is {pitch_px:.1f} px but neighbouring spots are "
                f"{spacing_px:.1f} px apart ({ratio:.2f}x): the array coordinates are "
                f"staggered (or scaled). Taking the neighbour spacing as the spot pitch of "
                f"{spot_pitch_um:g} um: {spot_pitch_um / spacing_px:.3f} um/px (one array step "
                f"would give {spot_pitch_um / pitch_px:.3f}). Pass um_per_px= if you know the "
                "image's scale, or spot_pitch_um= if the pitch differs.",
                UserWarning, stacklevel=2)
        pitch_px = spacing_px
    if um_per_px is None:
        um_per_px = spot_pitch_um / pitch_px
    else:
        estimate = spot_pitch_um / pitch_px
        scale_source = "given (um_per_px=)"
        if not 1 / _PITCH_AGREEMENT <= estimate / um_per_px <= _PITCH_AGREEMENT:
            warnings.warn(
                f"{section}: um_per_px={um_per_px:g} was given, but spots {spot_pitch_um:g} um "
                f"apart are {pitch_px:.1f} px apart in {spots}, i.e. {estimate:.3f} um/px. "
                "Using the given value; check it, pixel_scale and spot_pitch_um.",
                UserWarning, stacklevel=2)
    meta = {
        "source_image_path": str(Path(image).resolve()) if image is not None else "",
        "source_image_sha256": image_sha256,
        "um_per_px": float(um_per_px),
        "pixel_scale": float(pixel_scale),
        "spot_pitch_um": float(spot_pitch_um),
        "scale_from": scale_source,
    }
    lib = {"metadata": meta, "images": {},
           "scalefactors": {"spot_diameter_fullres": float(spot_diameter_um / um_per_px),
                            "tissue_hires_scalef": 1.0}}
    if image is not None:
        image = Path(image)
        hires, (w, h) = _downscaled_rgb(image, hires_max_px)
        lib["images"]["hires"] = hires
        lib["scalefactors"]["tissue_hires_scalef"] = hires.shape[1] / w
        meta["source_image_size"] = [int(w), int(h)]
        outside = ((pix[:, 0] < 0) | (pix[:, 0] >= w) | (pix[:, 1] < 0) | (pix[:, 1] >= h))
        if outside.any():
            ids = list(adata.obs_names[outside][:3])
            raise ValueError(
                f"{section}: {int(outside.sum())} spot centre(s) lie outside the image "
                f"{image} ({w} x {h} px), e.g. {ids}. The spot pixels are probably in another "
                f"frame: check pixel_scale (now {pixel_scale}) and that the image belongs to "
                "this section.")
        meta.update(_check_spots_on_image(section, image, pix, hires,
                                          lib["scalefactors"]["tissue_hires_scalef"], (w, h),
                                          pitch_px, pixel_scale))
    adata.uns["spatial"] = {section: lib}
    adata.uns["mclstexp"] = {"dataset": dataset, "section": section,
                             "files": {"counts": str(counts), "spots": str(spots),
                                       "image": str(image) if image is not None else "",
                                       "labels": str(labels) if labels is not None else "",
                                       "gene_map": (str(gene_map) if isinstance(
                                           gene_map, (str, os.PathLike)) else "")},
                             "spots_dropped": dropped}
    return adata


# -------------------------------------------------------------------------- HER2+
def her2st(section: str, *, data_dir: str | os.PathLike | None = None, image: str = "auto",
           download: bool | None = None, progress: bool = True,
           hires_max_px: int = HIRES_MAX_PX):
    """Load one HER2+ breast cancer section (Andersson et al. 2021) as AnnData.

    Parameters
    ----------
    section
        One of :data:`HER2ST_SECTIONS` (``"A1"`` ... ``"H3"``).
    data_dir
        Data root (default ``$MCLSTEXP_DATA`` or the user cache; see
        :func:`mclstexp_lite.download.data_dir`).
    image
        ``"auto"`` (full-resolution image; for A1, the reduced-resolution one when the
        full image cannot be had), ``"full"``, ``"reduced"`` (A1 only) or ``"none"``.
    download
        Passed to :func:`mclstexp_lite.download.fetch` (``False``: never download).

    Returns
    -------
    anndata.AnnData
        Raw counts; ``obs['label']`` for the sections with pathologist labels
        (A1, B1, C1, D1, E1, F1, G2, H1).
    """
    if section not in HER2ST_SECTIONS:
        raise ValueError(f"unknown HER2+ section {section!r}; valid: {', '.join(HER2ST_SECTIONS)}")
    if image not in ("auto", "full", "reduced", "none"):
        raise ValueError(f"image must be 'auto', 'full', 'reduced' or 'none', got {image!r}")
    rows = dl.rows("her2st", section)
    by_kind = {r.kind: r for r in rows}
    needed = [by_kind["counts"], by_kind["spots"]]
    if "labels" in by_kind:
        needed.append(by_kind["labels"])
    paths = dl.fetch(needed, data_dir=data_dir, download=download, progress=progress)

    img_row = None
    img_path = None
    if image in ("auto", "full"):
        try:
            img_path = dl.fetch([by_kind["image"]], data_dir=data_dir, download=download,
                                progress=progress)[by_kind["image"].path]
            img_row = by_kind["image"]
        except dl.DataMissingError:
            if image == "full" or "image_reduced" not in by_kind:
                raise
            log.warning("%s: full-resolution image not available; using the reduced-"
                        "resolution image %s", section, by_kind["image_reduced"].path)
    if image == "reduced" and "image_reduced" not in by_kind:
        raise ValueError(f"section {section} has no reduced-resolution image; only A1 has one. "
                         "Use image='full' or 'auto'.")
    if img_row is None and image in ("auto", "reduced"):
        r = by_kind["image_reduced"]
        img_path = dl.fetch([r], data_dir=data_dir, download=download,
                            progress=progress)[r.path]
        img_row = r
    sha = dl.verify(img_path, img_row) if img_row is not None else ""
    adata = from_files(
        paths[by_kind["counts"].path], paths[by_kind["spots"].path], img_path,
        section=section, patient=section[0],
        labels=paths[by_kind["labels"].path] if "labels" in by_kind else None,
        pixel_scale=(img_row.pixel_scale or 1.0) if img_row is not None else 1.0,
        image_sha256=sha, dataset="her2st", hires_max_px=hires_max_px)
    adata.uns["mclstexp"]["manifest_rows"] = [r.path for r in needed] + (
        [img_row.path] if img_row is not None else [])
    adata.uns["mclstexp"]["image_kind"] = img_row.kind if img_row is not None else "none"
    return adata


# --------------------------------------------------------------------------- cSCC
def cscc(section: str, *, data_dir: str | os.PathLike | None = None, image: str = "auto",
         download: bool | None = None, progress: bool = True,
         hires_max_px: int = HIRES_MAX_PX):
    """Load one cSCC section (Ji et al. 2020, GEO GSE144240) as AnnData.

    Parameters
    ----------
    section
        One of :data:`CSCC_SECTIONS`, e.g. ``"P2_ST_rep1"``.
    image
        ``"auto"``/``"full"`` (the GEO H&E, unpacked from .jpg.gz into the cache once)
        or ``"none"``.

    Notes
    -----
    GEO publishes no checksums for these files: the downloader checks the size the
    server announces and records the sha256 it saw in ``<file>.sha256``; later loads
    compare against that record.
    """
    if section not in CSCC_SECTIONS:
        raise ValueError(f"unknown cSCC section {section!r}; valid: {', '.join(CSCC_SECTIONS)}")
    if image not in ("auto", "full", "none"):
        raise ValueError(f"image must be 'auto', 'full' or 'none' for cSCC, got {image!r}")
    by_kind = {r.kind: r for r in dl.rows("cscc", section)}
    needed = [by_kind["counts"], by_kind["spots"]] + ([by_kind["image"]] if image != "none" else [])
    paths = dl.fetch(needed, data_dir=data_dir, download=download, progress=progress)
    img_path = None
    sha = ""
    if image != "none":
        gz = paths[by_kind["image"].path]
        sha = dl.verify(gz, by_kind["image"])
        img_path = _unpack_gz(gz)
    adata = from_files(paths[by_kind["counts"].path], paths[by_kind["spots"].path], img_path,
                       section=section, patient=section.split("_")[0], image_sha256=sha,
                       dataset="cscc", hires_max_px=hires_max_px)
    adata.uns["mclstexp"]["manifest_rows"] = [r.path for r in needed]
    return adata


# ------------------------------------------------------------------------- Visium
def visium(path: str | os.PathLike, *, library_id: str | None = None,
           image_path: str | os.PathLike | None = None, counts_file: str = "filtered_feature_bc_matrix.h5",
           patient: str | None = None, in_tissue_only: bool = True):
    """Load a 10x Visium Space Ranger ``outs`` folder as AnnData.

    Parameters
    ----------
    path
        Folder holding ``filtered_feature_bc_matrix.h5`` and ``spatial/``.
    library_id
        Name for the section (default: the folder name).
    image_path
        The full-resolution H&E the slide was imaged with, if you have it; patches are
        then cut from it. Otherwise the best image in ``spatial/`` is used
        (``tissue_hires_image.png``, else ``tissue_lowres_image.png``) and the spot
        coordinates are scaled into its frame.
    in_tissue_only
        Keep only barcodes flagged as in tissue.

    Returns
    -------
    anndata.AnnData
        ``obsm['spatial']`` in the source image's pixels; ``uns['spatial'][library_id]``
        with the image, ``tissue_hires_scalef`` relative to that frame and
        ``spot_diameter_fullres`` in it.
    """
    import json

    import pandas as pd
    import scanpy as sc
    from scipy import sparse

    path = Path(path)
    library_id = library_id or path.resolve().name
    h5 = path / counts_file
    spatial = path / "spatial"
    for f in (h5, spatial / "scalefactors_json.json"):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found; `path` must be a Space Ranger 'outs' "
                                    "folder with the count matrix and a spatial/ folder.")
    try:
        adata = sc.read_10x_h5(h5)
    except Exception as exc:
        raise ValueError(f"cannot read the 10x matrix {h5}: {exc}") from exc
    adata.var_names_make_unique()
    pos_file = next((spatial / n for n in ("tissue_positions.csv", "tissue_positions_list.csv")
                     if (spatial / n).exists()), None)
    if pos_file is None:
        raise FileNotFoundError(f"no tissue_positions(.csv|_list.csv) in {spatial}")
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
            "pxl_col_in_fullres"]
    pos = pd.read_csv(pos_file, header=0 if pos_file.name == "tissue_positions.csv" else None)
    if pos.shape[1] != len(cols):
        raise ValueError(f"{pos_file}: expected {len(cols)} columns {cols}, found {pos.shape[1]}; "
                         "it must be the positions file Space Ranger wrote for this slide.")
    pos.columns = cols
    pos = pos.set_index("barcode")
    if in_tissue_only:
        pos = pos[pos["in_tissue"] == 1]
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        log.info("%s: %d barcode(s) of the matrix have no in-tissue position; dropped",
                 library_id, len(missing))
    adata = adata[adata.obs_names.isin(pos.index)].copy()
    pos = pos.loc[adata.obs_names]
    sf_path = spatial / "scalefactors_json.json"
    try:
        scale = json.loads(sf_path.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot read {sf_path}: {exc}. The file is truncated or not JSON; "
                         "copy it again from the Space Ranger output.") from exc
    needed = ["spot_diameter_fullres"] + (
        [] if image_path is not None
        else ["tissue_hires_scalef"] if (spatial / "tissue_hires_image.png").exists()
        else ["tissue_lowres_scalef"] if (spatial / "tissue_lowres_image.png").exists() else [])
    absent = [k for k in needed if not isinstance(scale, dict) or k not in scale]
    if absent:
        raise ValueError(f"{sf_path} lacks {absent}; it must be the scale factors file Space "
                         "Ranger wrote for this slide.")
    full_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)

    if image_path is not None:
        src, frame = Path(image_path), 1.0
    elif (spatial / "tissue_hires_image.png").exists():
        src, frame = spatial / "tissue_hires_image.png", scale["tissue_hires_scalef"]
    elif (spatial / "tissue_lowres_image.png").exists():
        src, frame = spatial / "tissue_lowres_image.png", scale["tissue_lowres_scalef"]
    else:
        raise FileNotFoundError(f"no image in {spatial} and no image_path given")
    xy = full_xy * frame
    hires, (w, h) = _downscaled_rgb(src, HIRES_MAX_PX)
    um_per_px = VISIUM_SPOT_DIAMETER_UM / (scale["spot_diameter_fullres"] * frame)

    adata.X = sparse.csr_matrix(adata.X).astype(np.int32)
    adata.obs = pd.DataFrame({
        "section": pd.Categorical([library_id] * adata.n_obs),
        "patient": pd.Categorical([patient or library_id] * adata.n_obs),
        "array_x": pos["array_col"].to_numpy(int),
        "array_y": pos["array_row"].to_numpy(int),
        "pixel_x": xy[:, 0], "pixel_y": xy[:, 1],
    }, index=adata.obs_names)
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": hires.shape[1] / w,
                         "spot_diameter_fullres": float(scale["spot_diameter_fullres"] * frame)},
        "metadata": {"source_image_path": str(src.resolve()), "source_image_sha256": "",
                     "um_per_px": float(um_per_px), "pixel_scale": float(frame),
                     "spot_pitch_um": VISIUM_PITCH_UM, "source_image_size": [int(w), int(h)]},
    }}
    adata.uns["mclstexp"] = {"dataset": "visium", "section": library_id,
                             "files": {"counts": str(h5), "spots": str(pos_file),
                                       "image": str(src), "labels": ""}}
    return adata


def visium_fixture(*, data_dir: str | os.PathLike | None = None, download: bool | None = None):
    """The small real Visium output from the manifest (mouse brain, 2,695 spots x 100 genes)."""
    rows = dl.rows("visium_fixture")
    paths = dl.fetch(rows, data_dir=data_dir, download=download)
    h5 = next(p for k, p in paths.items() if k.endswith(".h5"))
    return visium(h5.parent, library_id="mouse_brain_fixture")


# ------------------------------------------------------------------------ listing
def list_sections(dataset: str | None = None, *, data_dir: str | os.PathLike | None = None):
    """Which sections exist (per the manifest) and which files are present locally.

    Returns
    -------
    pandas.DataFrame
        One row per section: ``dataset``, ``section``, ``patient``, ``counts``, ``spots``,
        ``image`` (full resolution), ``image_reduced``, ``labels`` (True when the file is
        present under the data root; checksums are verified when a section is loaded),
        ``paper`` (in the mclSTExp paper's set) and ``trainable`` (counts, spots and some
        image present).
    """
    import pandas as pd

    sectioned = ("her2st", "cscc")
    if dataset is not None and dataset not in sectioned:
        raise ValueError(
            f"list_sections: unknown dataset {dataset!r}; datasets with sections in the "
            f"manifest: {', '.join(sectioned)}. 10x Visium data is loaded from its own "
            "Space Ranger folder with datasets.visium(path).")
    datasets = [dataset] if dataset else list(sectioned)
    st = pd.concat([dl.status(d, data_dir=data_dir) for d in datasets], ignore_index=True)
    st = st[st["kind"].isin(["counts", "spots", "image", "image_reduced", "labels"])]
    wide = st.pivot_table(index=["dataset", "section", "patient"], columns="kind",
                          values="present", aggfunc="any")
    wide = wide.reindex(columns=["counts", "spots", "image", "image_reduced", "labels"])
    has_section = wide["counts"].notna()
    wide = wide[has_section].astype("boolean").fillna(False).astype(bool).reset_index()
    wide.columns.name = None
    wide["paper"] = [(d == "her2st" and s in PAPER_HER2ST_SECTIONS) or d == "cscc"
                     for d, s in zip(wide["dataset"], wide["section"])]
    wide["trainable"] = wide["counts"] & wide["spots"] & (wide["image"] | wide["image_reduced"])
    return wide


def load(dataset: str, section: str, **kw):
    """Load ``section`` of ``dataset`` (``"her2st"`` or ``"cscc"``)."""
    loaders = {"her2st": her2st, "cscc": cscc}
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(loaders)}")
    return loaders[dataset](section, **kw)


def load_sections(dataset: str, sections: Sequence[str], **kw) -> dict:
    """Load several sections; returns ``{section: AnnData}`` in the given order."""
    from tqdm.auto import tqdm

    out = {}
    for s in tqdm(list(sections), desc=f"loading {dataset}", disable=len(sections) < 3):
        out[s] = load(dataset, s, **kw)
    return out


# ---------------------------------------------------------------- image-only sections
#: Fewer virtual spots than this over the tissue: the scale is probably wrong.
MIN_VIRTUAL_SPOTS = 20
#: Default cap on virtual spots (a whole legacy-ST section has ~300-700, a Visium one
#: ~5,000); more usually means um_per_px is too large. Pass ``max_spots=`` to raise it.
MAX_VIRTUAL_SPOTS = 20_000
#: Tissue whose bounding box is wider than this on its short side (mm) does not fit on a
#: standard 26 x 76 mm glass slide: um_per_px is probably too large.
MAX_TISSUE_MM = 26.0


def _mask_for_thumb(tissue_mask, shape, image_size, name) -> np.ndarray:
    """A user's tissue mask (array or image file, any resolution) at thumbnail size."""
    from PIL import Image

    if isinstance(tissue_mask, (str, os.PathLike)):
        path = Path(tissue_mask)
        if not path.is_file():
            raise FileNotFoundError(f"tissue_mask file not found: {path}")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L")) > 0
        name = str(path)
    else:
        arr = np.asarray(tissue_mask)
        if arr.ndim == 3:
            arr = arr.any(axis=2)
        if arr.ndim != 2:
            raise ValueError(f"tissue_mask must be a 2-D boolean array (or an image file), "
                             f"got shape {arr.shape}")
        arr = arr.astype(bool)
        name = "tissue_mask"
    w, h = image_size
    if abs(arr.shape[1] / arr.shape[0] - w / h) > 0.02 * (w / h):
        raise ValueError(
            f"{name}: {arr.shape[1]} x {arr.shape[0]} px does not have the image's aspect "
            f"ratio ({w} x {h} px); the mask must cover the whole image, at any resolution.")
    small = Image.fromarray(arr.astype(np.uint8) * 255).resize((shape[1], shape[0]),
                                                               Image.Resampling.NEAREST)
    return np.asarray(small) > 0


def from_image(
    image,
    *,
    um_per_px: float | None = None,
    spot_pitch_um: float = LEGACY_ST_PITCH_UM,
    spot_diameter_um: float = LEGACY_ST_SPOT_DIAMETER_UM,
    grid: str = "square",
    tissue_mask=None,
    section: str | None = None,
    min_tissue: float = 0.5,
    max_spots: int = MAX_VIRTUAL_SPOTS,
    max_tissue_mm: float = MAX_TISSUE_MM,
    hires_max_px: int = HIRES_MAX_PX,
):
    """A section from an H&E image alone: virtual spots laid over its tissue, no counts.

    This is the input for predicting expression on a new slide
    (:func:`mclstexp_lite.tl.predict_section`, :mod:`mclstexp_lite.predict`). Tissue is
    found on a thumbnail (:func:`mclstexp_lite.slides.tissue_mask`: Otsu's threshold on
    HSV saturation, morphological clean-up) unless ``tissue_mask`` is given; spot centres
    are laid on a ``grid`` at ``spot_pitch_um`` and kept where their disk is at least
    ``min_tissue`` tissue (:func:`mclstexp_lite.slides.lay_spots`). Pyramidal TIFFs are
    read level by level and region by region, never decoded whole
    (:func:`mclstexp_lite.slides.open_slide`).

    Parameters
    ----------
    image
        Path to the H&E image (TIFF, JPEG, PNG), 8-bit RGB.
    um_per_px
        Microns per pixel of the image. Default: the pixel size the TIFF states; an
        image that states none needs it.
    spot_pitch_um, spot_diameter_um, grid
        The virtual spot layout; use the training data's (legacy ST, the default:
        200 um, 100 um, ``"square"``; Visium: 100 um, 55 um, ``"hex"``).
    tissue_mask
        Optional: a boolean array or an image file (non-zero = tissue) covering the whole
        image at any resolution, instead of the automatic detection.
    section
        Name (library id); default the file's stem.
    min_tissue
        Minimum tissue share of a spot's disk.
    max_spots
        More virtual spots than this is an error (a too-large ``um_per_px`` multiplies
        them); raise it for really large tissue.
    max_tissue_mm
        Tissue whose bounding box is wider than this on its short side is an error (it
        would not fit on a standard 26 x 76 mm slide: ``um_per_px`` is probably too
        large); raise it for large-format slides.
    hires_max_px
        Long side of the image stored in ``uns['spatial']`` for plotting.

    Returns
    -------
    anndata.AnnData
        ``n_vars == 0`` (no measurements). ``obs``: ``section``, ``patient`` (empty),
        ``array_x``, ``array_y`` (grid coordinates; hex grids in Visium's doubled-column
        convention), ``pixel_x``, ``pixel_y`` (full-resolution pixels),
        ``tissue_share``; ``obsm['spatial']``; ``uns['spatial'][section]`` as every loader
        writes it (``docs/data_model.md``), with ``metadata['image_only'] = True``,
        ``scale_from``, ``grid``, ``spot_diameter_um``, ``tissue_mm2``;
        ``uns['mclstexp']['tissue_mask']`` (the mask at the ``hires`` image's size).

    Raises
    ------
    ValueError
        No pixel size known; no tissue found; too few or too many virtual spots for the
        scale (the message gives the image's size in mm and what to check); an image
        that is not 8-bit RGB (see :func:`mclstexp_lite.slides.open_slide`).
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    from . import slides

    for name, v in (("spot_pitch_um", spot_pitch_um), ("spot_diameter_um", spot_diameter_um)):
        if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number of microns, got {v!r}")
    if not 0 < float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must be in (0, 1], got {min_tissue!r}")
    slide = slides.open_slide(image)
    try:
        path = slide.path
        name = slide.name
        section = str(section) if section else (path.name.split(".")[0] if path else "image")
        scale_from = "given (um_per_px=)"
        if um_per_px is None:
            if slide.um_per_px_embedded is None:
                raise ValueError(
                    f"{name} does not state its pixel size (no TIFF resolution tags); pass "
                    "um_per_px= (microns per pixel of this image, e.g. 0.25 for a 40x scan, "
                    "0.5 for 20x; the scanner's metadata or the HEST metadata JSON says it).")
            um_per_px = slide.um_per_px_embedded
            scale_from = "stated in the image file"
        um_per_px = float(um_per_px)
        if not np.isfinite(um_per_px) or um_per_px <= 0:
            raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
        emb = slide.um_per_px_embedded
        if emb is not None and scale_from.startswith("given") and not 0.8 <= um_per_px / emb <= 1.25:
            warnings.warn(f"{name}: um_per_px={um_per_px:g} was given but the file states "
                          f"{emb:.4g} um/px; using the given value. Check which is right.",
                          UserWarning, stacklevel=2)
        w_mm, h_mm = slide.width * um_per_px / 1000, slide.height * um_per_px / 1000
        # a thumbnail fine enough to resolve a spot's disk (>= 8 px across)
        long_um = max(slide.width, slide.height) * um_per_px
        mask_px = int(min(8000, max(hires_max_px, math.ceil(long_um / (spot_diameter_um / 8)))))
        thumb, scale = slide.thumbnail(mask_px)
        thumb_um = um_per_px / scale
        if tissue_mask is None:
            mask = slides.tissue_mask(thumb, um_per_px=thumb_um)
            mask_from = "Otsu threshold of HSV saturation, morphological clean-up"
        else:
            mask = _mask_for_thumb(tissue_mask, thumb.shape[:2], (slide.width, slide.height),
                                   name)
            mask_from = "given (tissue_mask=)"
        tissue_mm2 = float(mask.sum() * (thumb_um / 1000) ** 2)
        stained = float((slides.saturation(thumb) > slides.MIN_SATURATION).mean())
        if not mask.any() and tissue_mask is None and stained > 0.01:
            raise ValueError(
                f"{name}: {stained:.0%} of the image is stained, but every stained piece is "
                f"smaller than {slides.MIN_PIECE_MM2} mm^2 at um_per_px={um_per_px:g} "
                f"({scale_from}), at which the whole image is only {w_mm:.2f} x {h_mm:.2f} mm. "
                "um_per_px is probably too small (10x?); check the scanner's pixel size, or "
                "pass tissue_mask=.")
        if not mask.any():
            raise ValueError(
                f"no tissue found in {name} ({slide.width} x {slide.height} px, "
                f"{w_mm:.1f} x {h_mm:.1f} mm at {um_per_px:g} um/px): nothing is stained "
                f"(HSV saturation above max(Otsu, {slides.MIN_SATURATION})). Check that this "
                "is the H&E image (not a mask, label or fluorescence image), or pass "
                "tissue_mask=.")
        centres, array_xy, share = slides.lay_spots(
            mask, mask_um_per_px=thumb_um, pitch_um=spot_pitch_um,
            diameter_um=spot_diameter_um, grid=grid, min_tissue=min_tissue)
        n = len(centres)
        scale_hint = (f"The image is {w_mm:.2f} x {h_mm:.2f} mm at um_per_px={um_per_px:g} "
                      f"({scale_from}); {tissue_mm2:.2f} mm^2 of it is tissue.")
        if n < MIN_VIRTUAL_SPOTS:
            raise ValueError(
                f"{name}: only {n} virtual spots of {spot_pitch_um:g} um pitch fit on the "
                f"tissue. {scale_hint} If the tissue is larger than that, um_per_px is too "
                "small (a 10x error shrinks it 100-fold in area); check the scanner's pixel "
                "size. Otherwise lower spot_pitch_um or min_tissue.")
        ys, xs = np.nonzero(mask)
        extent_mm = sorted([(np.ptp(xs) + 1) * thumb_um / 1000, (np.ptp(ys) + 1) * thumb_um / 1000])
        if extent_mm[0] > max_tissue_mm:
            raise ValueError(
                f"{name}: the tissue spans {extent_mm[0]:.1f} x {extent_mm[1]:.1f} mm, wider "
                f"than a standard glass slide ({max_tissue_mm:g} mm, max_tissue_mm=). "
                f"{scale_hint} um_per_px is probably too large (10x?); check the scanner's "
                "pixel size. For a large-format slide pass a larger max_tissue_mm=.")
        if n > max_spots:
            raise ValueError(
                f"{name}: {n:,} virtual spots of {spot_pitch_um:g} um pitch (more than "
                f"max_spots={max_spots:,}). {scale_hint} If the tissue is smaller than that, "
                "um_per_px is too large (a 10x error makes 100 times as many spots); check "
                "it. If the tissue really is that large, pass max_spots=.")
        pix = centres / scale
        sha = dl.sha256_file(path) if path is not None else ""
        if hires_max_px < mask_px:
            hires, hscale = slide.thumbnail(hires_max_px)
        else:
            hires, hscale = thumb, scale
        from PIL import Image

        hmask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (hires.shape[1], hires.shape[0]), Image.Resampling.NEAREST)) > 0
        width, height = slide.width, slide.height
    finally:
        slide.close()

    ids = [f"{section}_{x}x{y}" for x, y in array_xy]
    obs = pd.DataFrame({
        "section": pd.Categorical([section] * n),
        "patient": pd.Categorical([""] * n),
        "array_x": array_xy[:, 0].astype(int),
        "array_y": array_xy[:, 1].astype(int),
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
        "tissue_share": share.astype(np.float32),
    }, index=ids)
    adata = ad.AnnData(X=sparse.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = pix.astype(np.float64)
    meta = {
        "source_image_path": str(Path(path).resolve()) if path is not None else "",
        "source_image_sha256": sha,
        "source_image_size": [int(width), int(height)],
        "um_per_px": um_per_px,
        "pixel_scale": 1.0,
        "spot_pitch_um": float(spot_pitch_um),
        "spot_diameter_um": float(spot_diameter_um),
        "grid": grid,
        "scale_from": scale_from,
        "image_only": True,
        "tissue_from": mask_from,
        "tissue_mm2": round(tissue_mm2, 4),
    }
    adata.uns["spatial"] = {section: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": float(hscale),
                         "spot_diameter_fullres": float(spot_diameter_um / um_per_px)},
        "metadata": meta}}
    adata.uns["mclstexp"] = {"dataset": "image", "section": section,
                             "files": {"image": str(path) if path is not None else ""},
                             "tissue_mask": hmask}
    return adata


# ----------------------------------------------------------------------- HEST-1k
#: Spot layout by HEST-1k ``st_technology`` when the metadata JSON gives no
#: ``inter_spot_dist`` / ``spot_diameter`` (micrometres): centre-to-centre distance,
#: diameter, grid. Xenium samples are pooled by HEST into Visium-like pseudo-spots
#: (55 um spots, 100 um apart, on a square grid).
HEST_SPOT_LAYOUT: dict[str, tuple[float, float, str]] = {
    "spatial transcriptomics": (LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_DIAMETER_UM, "square"),
    "visium": (VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, "hex"),
    "xenium": (VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, "square"),
}
#: The pixel size the loader uses and the one the TIFF's resolution tags state may
#: differ by this share before a warning says so.
_HEST_TIFF_TOLERANCE = 0.05
#: Spots measured this far from the stated spot distance (a factor) raise a warning:
#: the pixel size or the spot distance is wrong.
_HEST_SPACING_TOLERANCE = 1.3

_HEST_DOWNLOAD_HINT = (
    "HEST-1k is a gated dataset on the Hugging Face hub: accept its terms at "
    "https://huggingface.co/datasets/MahmoodLab/hest, log in with your own token "
    "(`huggingface-cli login` or huggingface_hub.login()), then fetch one sample with "
    "huggingface_hub.snapshot_download(repo_id='MahmoodLab/hest', repo_type='dataset', "
    "local_dir=ROOT, allow_patterns=['*{id}[_.]**']) and call "
    "mclstexp_lite.datasets.hest(ROOT, '{id}'). See README.md, 'HEST-1k samples'.")


def _finite_positive(value) -> float | None:
    """``value`` as a float if it is a finite positive number (or numeric text), else None."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _integer_counts(matrix, what: str):
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


def _hest_array_coords(obs, pix: np.ndarray):
    """Array coordinates ``(n, 2)`` (x, y, float) and how they were obtained, or
    ``(None, "")`` when the h5ad has no ``array_row``/``array_col``.

    HEST writes Visium's ``array_col`` (x) and ``array_row`` (y). Its legacy-ST samples
    were assembled with the ST spot file's ``x`` in ``array_row`` and ``y`` in
    ``array_col``, so the axis that follows the image's x axis is chosen by correlation
    with the pixel coordinates.
    """
    if {"array_row", "array_col"} <= set(obs.columns):
        col = np.asarray(obs["array_col"], dtype=float)
        row = np.asarray(obs["array_row"], dtype=float)
        if np.isfinite(col).all() and np.isfinite(row).all():
            def corr(a, b):
                if np.ptp(a) == 0 or np.ptp(b) == 0:
                    return 0.0
                return abs(float(np.corrcoef(a, b)[0, 1]))

            straight = corr(col, pix[:, 0]) + corr(row, pix[:, 1])
            swapped = corr(row, pix[:, 0]) + corr(col, pix[:, 1])
            if swapped > straight + 0.5:
                return (np.stack([row, col], axis=1),
                        "array_row (x), array_col (y): HEST's axes follow the image swapped")
            return np.stack([col, row], axis=1), "array_col (x), array_row (y)"
    return None, ""


def hest(
    root: str | os.PathLike,
    sample_id: str,
    *,
    um_per_px: float | None = None,
    spot_pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
    patient: str | None = None,
    in_tissue_only: bool = True,
    drop_zero_count_spots: bool = True,
    hires_max_px: int = HIRES_MAX_PX,
):
    """Load one HEST-1k sample (Jaume et al., NeurIPS 2024) as AnnData.

    HEST-1k (https://huggingface.co/datasets/MahmoodLab/hest) stores each sample as
    ``root/st/<id>.h5ad`` (counts; spot centres in full-resolution WSI pixels in
    ``obsm['spatial']``), ``root/wsis/<id>.tif`` (pyramidal, tiled (Big)TIFF) and
    ``root/metadata/<id>.json`` (pixel size, spot layout, technology, organ, ...). The
    WSI is never decoded whole: the ``hires`` copy comes from the smallest pyramid level
    large enough (:meth:`mclstexp_lite.slides.Slide.thumbnail`) and patches are read
    tile by tile (:func:`mclstexp_lite.patches.patch_cache`).

    Parameters
    ----------
    root
        The folder ``snapshot_download`` wrote to (holding ``st/``, ``wsis/``,
        ``metadata/``).
    sample_id
        HEST id, e.g. ``"TENX95"`` or ``"SPA148"``; also the section / library id.
    um_per_px
        Microns per WSI pixel, overriding the metadata. Default: the metadata JSON's
        ``pixel_size_um_estimated`` (what HEST's own reader uses), else its
        ``pixel_size_um_embedded``, else the TIFF's resolution tags. A warning fires when
        the TIFF's tags disagree with the value used by more than 5 %.
    spot_pitch_um, spot_diameter_um
        Override the metadata's ``inter_spot_dist`` and ``spot_diameter`` (um). Without
        them and without metadata values: by ``st_technology`` (:data:`HEST_SPOT_LAYOUT`:
        legacy ST 200/100, Visium and Xenium pseudo-spots 100/55), else the measured
        spot spacing and half of it. A warning fires when the spots, measured on the
        image at ``um_per_px``, are more than a factor 1.3 from ``spot_pitch_um`` apart.
    patient
        Patient name for ``obs['patient']``. Default: HEST's ``patient`` qualified by its
        ``dataset_title`` (HEST's patient names, e.g. "Patient 1", repeat across
        datasets); a sample without a patient gets the dataset title alone, as HEST's
        own benchmark splits group it (all such samples of a dataset are one patient).
    in_tissue_only
        Drop spots whose ``obs['in_tissue']`` is 0 / False (when that column exists).
    drop_zero_count_spots
        Drop spots without counts.
    hires_max_px
        Long side of the plotting copy in ``uns['spatial'][sample_id]['images']['hires']``.

    Returns
    -------
    anndata.AnnData
        The layout of ``docs/data_model.md``. ``X``: raw counts as ``int32`` CSR, taken
        from ``X`` when it holds whole non-negative numbers (HEST stores them as float32),
        else from ``layers['counts']``, else from ``raw.X``; non-integer data everywhere
        (normalised or log values) is an error. ``obs_names``:
        ``"<sample_id>_<HEST obs name>"``. ``uns['spatial'][sample_id]['metadata']`` adds
        ``scale_from``, ``um_per_px_tiff`` (-1 when the TIFF states none),
        ``spot_diameter_um``, ``spot_spacing_um`` (measured), ``grid``, ``technology``,
        and the spots-on-tissue measures of :func:`from_files`.
        ``uns['mclstexp']``: ``dataset='hest'``, ``files``, ``counts_from``,
        ``array_from``, ``spots_dropped`` and ``hest`` (the metadata JSON's scalar
        entries).

    Raises
    ------
    FileNotFoundError
        A file of the sample is missing (the message gives the expected layout and how
        to download it).
    ValueError
        No pixel size in the arguments, the metadata or the TIFF; spot centres outside
        the WSI or missing; no raw integer counts; a WSI that is not 8-bit RGB (see
        :func:`mclstexp_lite.slides.open_slide`).
    """
    import json

    import anndata as ad
    import pandas as pd

    from . import slides

    if not isinstance(sample_id, str) or not sample_id or any(c in sample_id for c in "/\\"):
        raise ValueError(f"sample_id must be a HEST id such as 'TENX95' (no path), got "
                         f"{sample_id!r}")
    root = Path(root).expanduser()
    files = {"st": root / "st" / f"{sample_id}.h5ad",
             "wsi": root / "wsis" / f"{sample_id}.tif",
             "metadata": root / "metadata" / f"{sample_id}.json"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"HEST sample {sample_id!r}: missing {', '.join(missing)}. A HEST root holds "
            f"st/<id>.h5ad, wsis/<id>.tif and metadata/<id>.json (root given: {root}). "
            + _HEST_DOWNLOAD_HINT.replace("{id}", sample_id))
    for name, v in (("um_per_px", um_per_px), ("spot_pitch_um", spot_pitch_um),
                    ("spot_diameter_um", spot_diameter_um)):
        if v is not None and _finite_positive(v) is None:
            raise ValueError(f"{name} must be a positive number of microns, got {v!r}")

    try:
        meta_json = json.loads(files["metadata"].read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {files['metadata']}: {exc}. The file is truncated or "
                         "not JSON; download it again.") from exc
    if not isinstance(meta_json, dict):
        raise ValueError(f"{files['metadata']}: expected a JSON object (HEST's per-sample "
                         f"metadata), found {type(meta_json).__name__}")
    hest_meta = {str(k): v for k, v in meta_json.items()
                 if isinstance(v, (str, int, float)) and not isinstance(v, bool)
                 and not (isinstance(v, float) and not math.isfinite(v))}

    slide = slides.open_slide(files["wsi"])  # 16-bit / grayscale / corrupt: ValueError
    try:
        width, height = slide.width, slide.height
        tiff_um = slide.um_per_px_embedded
        # pixel size -----------------------------------------------------------
        chosen = [("given (um_per_px=)", _finite_positive(um_per_px)),
                  (f"{files['metadata'].name}: pixel_size_um_estimated",
                   _finite_positive(meta_json.get("pixel_size_um_estimated"))),
                  (f"{files['metadata'].name}: pixel_size_um_embedded",
                   _finite_positive(meta_json.get("pixel_size_um_embedded"))),
                  ("TIFF resolution tags", tiff_um)]
        scale_from, px_um = next(((s, v) for s, v in chosen if v is not None), (None, None))
        if px_um is None:
            raise ValueError(
                f"HEST sample {sample_id!r}: no pixel size: {files['metadata']} has no "
                "positive pixel_size_um_estimated or pixel_size_um_embedded and "
                f"{files['wsi']} has no resolution tags. Pass um_per_px= (microns per "
                "pixel of the WSI; HEST's metadata CSV lists it per sample), or download "
                "the sample's metadata JSON again.")
        if (tiff_um is not None and scale_from != "TIFF resolution tags"
                and abs(tiff_um / px_um - 1) > _HEST_TIFF_TOLERANCE):
            warnings.warn(
                f"HEST sample {sample_id!r}: {files['wsi'].name} states {tiff_um:.4g} um/px in "
                f"its resolution tags but {px_um:.4g} um/px is used ({scale_from}), "
                f"{abs(tiff_um / px_um - 1):.0%} apart. Check which is right; pass "
                "um_per_px= to choose.", UserWarning, stacklevel=2)
        for key, size in (("fullres_px_width", width), ("fullres_px_height", height)):
            stated = _finite_positive(meta_json.get(key))
            if stated is not None and round(stated) != size:
                warnings.warn(
                    f"HEST sample {sample_id!r}: {files['metadata'].name} says {key}="
                    f"{stated:g} but {files['wsi'].name} is {width} x {height} px; the WSI "
                    "and the metadata may belong to different versions of the sample.",
                    UserWarning, stacklevel=2)

        # counts and spots -------------------------------------------------------
        try:
            src = ad.read_h5ad(files["st"])
        except Exception as exc:
            raise ValueError(f"cannot read {files['st']}: {type(exc).__name__}: {exc}. The "
                             "file is truncated or not an AnnData .h5ad; download it "
                             "again.") from exc
        reasons = []
        X = None
        counts_from = ""
        var_names = src.var_names
        for where, matrix, names in (
                ("X", src.X, src.var_names),
                ("layers['counts']", src.layers["counts"] if "counts" in src.layers else None,
                 src.var_names),
                ("raw.X", src.raw.X if src.raw is not None else None,
                 src.raw.var_names if src.raw is not None else None)):
            if matrix is None:
                continue
            X, why = _integer_counts(matrix, f"{files['st'].name} {where}")
            if X is not None:
                counts_from, var_names = where, names
                break
            reasons.append(why)
        if X is None:
            raise ValueError(
                f"HEST sample {sample_id!r}: no raw counts in {files['st']}: "
                f"{'; '.join(reasons) or 'it has no X'}. This package needs raw integer "
                "counts (ml.pp.prepare normalises them): put them into X or "
                "layers['counts'] (e.g. from the sample's original count matrix), or "
                "download the file again if it was changed.")

        obs_src = src.obs
        if "spatial" in src.obsm and np.asarray(src.obsm["spatial"]).ndim == 2 \
                and np.asarray(src.obsm["spatial"]).shape[1] >= 2:
            pix = np.asarray(src.obsm["spatial"], dtype=float)[:, :2].copy()
            pix_from = "obsm['spatial']"
        elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(obs_src.columns):
            pix = obs_src[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
            pix_from = "obs['pxl_col_in_fullres', 'pxl_row_in_fullres']"
        else:
            raise ValueError(
                f"{files['st']}: no spot coordinates: neither obsm['spatial'] (x, y in "
                "full-resolution WSI pixels) nor obs['pxl_col_in_fullres', "
                "'pxl_row_in_fullres']. Is this a HEST st/ file?")
        bad = ~np.isfinite(pix).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{files['st']}: {int(bad.sum())} spot(s) without coordinates (NaN in "
                f"{pix_from}), e.g. {list(obs_src.index[bad][:3])}; remove them from the "
                "h5ad first.")

        n_rows = src.n_obs
        keep = np.ones(n_rows, dtype=bool)
        dropped = {"not_in_tissue": 0, "zero_counts": 0}
        if in_tissue_only and "in_tissue" in obs_src.columns:
            flag = pd.to_numeric(obs_src["in_tissue"].astype(object).map(
                lambda v: {True: 1, False: 0, "True": 1, "False": 0}.get(v, v)),
                errors="coerce").to_numpy(float)
            in_t = flag == 1
            dropped["not_in_tissue"] = int((~in_t).sum())
            keep &= in_t
        totals = np.asarray(X.sum(axis=1)).ravel()
        if drop_zero_count_spots:
            zero = keep & (totals == 0)
            dropped["zero_counts"] = int(zero.sum())
            keep &= totals > 0
        if not keep.any():
            raise ValueError(f"{files['st']}: no spots left ({n_rows} in the file; dropped "
                             f"{dropped}). Pass in_tissue_only=False or "
                             "drop_zero_count_spots=False to keep them.")
        if keep.sum() < n_rows:
            msg = (f"HEST sample {sample_id!r}: kept {int(keep.sum())} of {n_rows} spots "
                   f"({dropped['not_in_tissue']} not in tissue, {dropped['zero_counts']} "
                   "without counts).")
            if n_rows - keep.sum() > _DROPPED_WARN_SHARE * n_rows:
                hint = (" Pass in_tissue_only=False to keep the spots HEST marks as outside "
                        "the tissue." if dropped["not_in_tissue"] else "")
                warnings.warn(msg + hint, UserWarning, stacklevel=2)
            else:
                log.info("%s", msg)
        X = X[keep]
        pix = pix[keep]
        obs_src = obs_src.iloc[np.flatnonzero(keep)]

        outside = (pix[:, 0] < 0) | (pix[:, 0] >= width) | (pix[:, 1] < 0) | (pix[:, 1] >= height)
        if outside.any():
            raise ValueError(
                f"HEST sample {sample_id!r}: {int(outside.sum())} spot centre(s) of "
                f"{files['st'].name} lie outside {files['wsi']} ({width} x {height} px), e.g. "
                f"{list(obs_src.index[outside][:3])} at {pix[outside][0].round(1).tolist()}. "
                f"The spots ({pix_from}) must be in the full-resolution WSI's pixels: check "
                "that the h5ad and the TIFF are the same sample and the same HEST version "
                "(download both again).")

        # spot layout -------------------------------------------------------------
        tech = str(meta_json.get("st_technology") or "")
        layout = HEST_SPOT_LAYOUT.get(tech.strip().lower())
        from scipy.spatial import cKDTree

        if len(pix) >= 2:
            dist, _ = cKDTree(pix).query(pix, k=2)
            nn = dist[:, 1][dist[:, 1] > 0]
            nn_px = float(np.median(nn)) if len(nn) else float("nan")
        else:
            nn_px = float("nan")
        spacing_px = nn_px
        arr_xy, array_from = _hest_array_coords(obs_src, pix)
        if arr_xy is not None and len(pix) >= 3:
            try:  # on the fitted grid: spots detected off the grid do not bias it
                spacing_px = grid_spacing_px(arr_xy, pix)
            except (ValueError, np.linalg.LinAlgError):
                spacing_px = nn_px
        pitch_from = "given (spot_pitch_um=)"
        pitch = _finite_positive(spot_pitch_um)
        if pitch is None:
            pitch, pitch_from = _finite_positive(meta_json.get("inter_spot_dist")), \
                f"{files['metadata'].name}: inter_spot_dist"
        if pitch is None and layout is not None:
            pitch, pitch_from = layout[0], f"st_technology {tech!r}"
        if pitch is None:
            if not math.isfinite(spacing_px):
                raise ValueError(f"HEST sample {sample_id!r}: cannot tell the spot distance "
                                 "(no inter_spot_dist, unknown st_technology, one spot); "
                                 "pass spot_pitch_um=.")
            pitch, pitch_from = spacing_px * px_um, "measured neighbour spacing"
        diameter = (_finite_positive(spot_diameter_um)
                    or _finite_positive(meta_json.get("spot_diameter"))
                    or (layout[1] if layout is not None else None) or pitch / 2)
        grid = layout[2] if layout is not None else ""
        spacing_um = spacing_px * px_um if math.isfinite(spacing_px) else float("nan")
        if math.isfinite(spacing_um) and not (
                1 / _HEST_SPACING_TOLERANCE <= spacing_um / pitch <= _HEST_SPACING_TOLERANCE):
            warnings.warn(
                f"HEST sample {sample_id!r}: neighbouring spots are {spacing_px:.1f} px apart, "
                f"i.e. {spacing_um:.1f} um at {px_um:.4g} um/px ({scale_from}), but the spot "
                f"distance is {pitch:g} um ({pitch_from}). The pixel size or the spot "
                "distance is wrong (or the spots were pooled into other bins): pass "
                "um_per_px= or spot_pitch_um=.", UserWarning, stacklevel=2)
        pitch_px = pitch / px_um
        if arr_xy is not None:
            array_xy = np.round(arr_xy).astype(int)
        else:
            array_xy = np.round((pix - pix.min(axis=0)) / pitch_px).astype(int)
            array_from = "spot centres / spot pitch in pixels (no array_row/array_col)"

        # plotting copy from the pyramid ------------------------------------------
        if len(slide.levels) == 1 and width * height > 200_000_000:
            log.warning("%s has no pyramid (one %d x %d level): the hires copy decodes it "
                        "whole", files["wsi"], width, height)
        hires, hscale = slide.thumbnail(hires_max_px)
    finally:
        slide.close()

    if patient is None:
        p = meta_json.get("patient")
        p = str(p).strip() if p is not None and not (isinstance(p, float) and math.isnan(p)) else ""
        title = str(meta_json.get("dataset_title") or "").strip()
        patient = f"{p} ({title})" if p and title else (p or title or sample_id)
    obs = pd.DataFrame({
        "section": pd.Categorical([sample_id] * len(pix)),
        "patient": pd.Categorical([str(patient)] * len(pix)),
        "array_x": array_xy[:, 0],
        "array_y": array_xy[:, 1],
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
    }, index=[f"{sample_id}_{i}" for i in obs_src.index.astype(str)])
    var = pd.DataFrame(index=pd.Index(np.asarray(var_names).astype(str), name=None))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = pix.astype(np.float64)
    meta = {
        "source_image_path": str(files["wsi"].resolve()),
        "source_image_sha256": "",
        "source_image_size": [int(width), int(height)],
        "um_per_px": float(px_um),
        "um_per_px_tiff": float(tiff_um) if tiff_um is not None else -1.0,
        "pixel_scale": 1.0,
        "spot_pitch_um": float(pitch),
        "spot_pitch_from": pitch_from,
        "spot_diameter_um": float(diameter),
        "spot_spacing_um": round(spacing_um, 3) if math.isfinite(spacing_um) else -1.0,
        "grid": grid,
        "technology": tech,
        "scale_from": scale_from,
    }
    meta.update(_check_spots_on_image(sample_id, files["wsi"], pix, hires, hscale,
                                      (width, height), pitch_px))
    adata.uns["spatial"] = {sample_id: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": float(hscale),
                         "spot_diameter_fullres": float(diameter / px_um)},
        "metadata": meta}}
    adata.uns["mclstexp"] = {
        "dataset": "hest", "section": sample_id,
        "files": {k: str(v) for k, v in files.items()},
        "counts_from": counts_from, "coordinates_from": pix_from, "array_from": array_from,
        "spots_dropped": dropped, "hest": hest_meta}
    return adata
