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
- :func:`list_sections` - which sections exist and which are available locally
"""

from __future__ import annotations

import gzip
import logging
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


def _check_spots_on_image(section, image, pix, hires, scalef, size, pitch_px) -> dict:
    """Warn when the spots do not sit on the image's tissue; returns the two measures."""
    img = hires.astype(np.float32) / 255.0
    top = img.max(axis=2)
    sat = (top - img.min(axis=2)) / np.maximum(top, 1e-6)
    xy = np.round(pix * scalef).astype(int)
    xy[:, 0] = np.clip(xy[:, 0], 0, sat.shape[1] - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, sat.shape[0] - 1)
    on_tissue = float((sat[xy[:, 1], xy[:, 0]] > _TISSUE_SATURATION).mean())
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
    return {"spots_on_tissue": round(on_tissue, 4), "spot_coverage": round(coverage, 4)}


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
                                          pitch_px))
    adata.uns["spatial"] = {section: lib}
    adata.uns["mclstexp"] = {"dataset": dataset, "section": section,
                             "files": {"counts": str(counts), "spots": str(spots),
                                       "image": str(image) if image is not None else "",
                                       "labels": str(labels) if labels is not None else ""},
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
