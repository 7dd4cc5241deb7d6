"""HEST-1k samples (Jaume et al., NeurIPS 2024): st/<id>.h5ad, wsis/<id>.tif,
metadata/<id>.json as AnnData."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .. import _slides as slides
from ._io import DROPPED_WARN_SHARE, HIRES_MAX_PX, plain_var, raw_counts
from ._geometry import (
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_DIAMETER_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    ARRAY_LAYOUTS,
    GRID_ROW_RATIO,
    array_layout,
    check_spots_on_image,
    grid_spacing_px,
)

log = logging.getLogger(__name__)


#: Spot layout by HEST-1k ``st_technology`` when the metadata JSON gives no
#: ``inter_spot_dist`` / ``spot_diameter`` (micrometres): same-row centre-to-centre
#: distance, diameter, grid. HEST pools Xenium transcripts into contiguous 100 x 100 um
#: squares (``pool_transcripts_xenium(spot_size_um=100)`` in hest/readers.py; its
#: maintainers in HEST issues 39 and 79; the metadata leaves both fields blank) and
#: Visium HD's 16 um bins into 128 x 128 um squares (``pool_bins_visiumhd(
#: dst_bin_size_um=128)``; the metadata table says 2 and 2, the raw bin). A legacy-ST
#: sample on a 2k array is recognised from its coordinates (grid "checkerboard").
HEST_SPOT_LAYOUT: dict[str, tuple[float, float, str]] = {
    "spatial transcriptomics": (LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_DIAMETER_UM, "square"),
    "visium": (VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, "hex"),
    "xenium": (100.0, 100.0, "square"),
    "visium hd": (128.0, 128.0, "square"),
}
#: HEST's Visium HD metadata gives this spot distance and diameter (the raw 2 um bin),
#: not the 128 um bins its h5ad holds.
_HEST_HD_PLACEHOLDER_UM = 2.0
#: Pixel sizes that are resolution defaults of image writers, not scans: 1 px per unit
#: and 25.4 / dpi (or 25,400 / dpi) for common dpi values. HEST's metadata has them in
#: ``pixel_size_um_embedded`` (0.3528 = 25.4/72, 0.2646 = 25.4/96, 1.0, 31.75, 63.5, ...).
_DPI_VALUES = (72, 96, 100, 150, 200, 300, 400, 600, 800, 1200)
#: HEST writes its WSIs with libvips' ``tiffsave(xres=1 / (pixel_size * 1e-4),
#: resunit=cm)``; libvips takes ``xres`` in pixels per millimetre, so the tags of such a
#: file state a pixel size ten times too fine (HEST issue 106: TENX158's tags say 0.0274
#: against 0.2738 um/px estimated).
_HEST_TAG_FACTOR = 10.0
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


def _dpi_default(value: float) -> bool:
    """Is ``value`` (um/px) a resolution default of an image writer rather than a scan's?"""
    if value is None:
        return False
    if abs(value - 1.0) < 1e-9:
        return True
    return any(abs(value / (k / d) - 1) < 1e-4 for d in _DPI_VALUES for k in (25.4, 25_400.0))


def _magnification(value) -> float | None:
    """HEST's ``magnification`` ("20x", "40x", a number or blank) as a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) and value > 0 else None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*[xX]?\s*", str(value or ""))
    return float(m.group(1)) if m else None


def _plain_legacy_name(name: str) -> str:
    """HEST writes legacy-ST spot names zero-padded ("012x007"); the package's are
    "12x7" (as :func:`from_files` names them). Other names are returned unchanged."""
    m = re.fullmatch(r"0*(\d+)x0*(\d+)", name)
    return f"{m.group(1)}x{m.group(2)}" if m else name


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
    in_tissue_only: bool = False,
    drop_zero_count_spots: bool = True,
    hires_max_px: int = HIRES_MAX_PX,
):
    """Load one HEST-1k sample (Jaume et al., NeurIPS 2024) as AnnData.

    HEST-1k (https://huggingface.co/datasets/MahmoodLab/hest) stores each sample as
    ``root/st/<id>.h5ad`` (counts; spot centres in full-resolution WSI pixels in
    ``obsm['spatial']``), ``root/wsis/<id>.tif`` (pyramidal, tiled (Big)TIFF) and
    ``root/metadata/<id>.json`` (pixel size, spot layout, technology, organ, ...). The
    WSI is never decoded whole: the ``hires`` copy comes from the smallest pyramid level
    large enough (:meth:`mclstexp_lite.patches.Slide.thumbnail`) and patches are read
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
        ``pixel_size_um_embedded`` unless that is a dpi default (1.0, 25.4/72, 25.4/96,
        ...), else the TIFF's resolution tags, which HEST writes ten times too fine:
        when the spots, measured at the tags' scale, are ten times closer than the spot
        distance (or the ``magnification`` says so), the tags times ten are used, with a
        warning. A warning also fires when the tags disagree with the value used by
        more than 5 % (other than that factor of ten).
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
        Drop spots whose ``obs['in_tissue']`` is 0 / False (when that column exists). Off
        by default: HEST keeps such spots too (its tutorial says ``in_tissue`` "might not
        be accurate"; for legacy ST, Xenium and Visium HD HEST sets it True for every
        spot), so the default spot set is HEST's. Their number is recorded
        (``uns['mclstexp']['spots_not_in_tissue']``).
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
        No pixel size in the arguments, the metadata or the TIFF; most spot centres
        outside the WSI (a few are dropped with a warning that says "outside", as HEST
        skips them when it cuts patches; HEST issue 40), or missing; no raw integer
        counts; a WSI that is not 8-bit RGB or whose compression cannot be decoded (LZW
        needs ``imagecodecs``; see :func:`mclstexp_lite.patches.open_slide`).
    """
    if not isinstance(sample_id, str) or not sample_id or any(c in sample_id for c in "/\\"):
        raise ValueError(f"sample_id must be a HEST id such as 'TENX95' (no path), got "
                         f"{sample_id!r}")
    files = _hest_files(root, sample_id)
    for name, v in (("um_per_px", um_per_px), ("spot_pitch_um", spot_pitch_um),
                    ("spot_diameter_um", spot_diameter_um)):
        if v is not None and _finite_positive(v) is None:
            raise ValueError(f"{name} must be a positive number of microns, got {v!r}")
    meta_json = _hest_metadata(files["metadata"])

    slide = slides.open_slide(files["wsi"])  # 16-bit / grayscale / corrupt: ValueError
    try:
        size = (slide.width, slide.height)
        scale = _hest_pixel_size(sample_id, files, meta_json, um_per_px,
                                 slide.um_per_px_tags, size)
        src, X, counts_from, var_src = _hest_counts(sample_id, files["st"])
        pix, pix_from = _hest_spot_pixels(files["st"], src)
        keep, dropped, not_in_tissue = _hest_spots_kept(
            sample_id, files, src.obs, pix, X, size, pix_from, in_tissue_only,
            drop_zero_count_spots)
        X, pix, obs_src = X[keep], pix[keep], src.obs.iloc[np.flatnonzero(keep)]
        layout = _hest_layout(sample_id, files, meta_json, obs_src, pix, scale,
                              spot_pitch_um, spot_diameter_um)
        if len(slide.levels) == 1 and size[0] * size[1] > 200_000_000:
            log.warning("%s has no pyramid (one %d x %d level): the hires copy decodes it "
                        "whole", files["wsi"], *size)
        hires, hscale = slide.thumbnail(hires_max_px)  # the plotting copy, from the pyramid
    finally:
        slide.close()

    if patient is None:
        patient = _hest_patient(meta_json, sample_id)
    adata = _hest_anndata(sample_id, X, var_src, obs_src, pix, patient, layout["array_xy"],
                          layout["tech"])
    px_um = scale["um_per_px"]
    meta = {
        "source_image_path": str(files["wsi"].resolve()),
        "source_image_sha256": "",
        "source_image_size": [int(size[0]), int(size[1])],
        "um_per_px": float(px_um),
        "um_per_px_tiff": float(scale["tiff_um"]) if scale["tiff_um"] is not None else -1.0,
        "pixel_scale": 1.0,
        "spot_pitch_um": float(layout["pitch"]),
        "spot_pitch_from": layout["pitch_from"],
        "spot_diameter_um": float(layout["diameter"]),
        "spot_spacing_um": (round(layout["spacing_um"], 3)
                            if math.isfinite(layout["spacing_um"]) else -1.0),
        "spot_spacing_um_stated": round(float(layout["near_um"]), 3),
        "grid": layout["grid"],
        "technology": layout["tech"],
        "scale_from": scale["scale_from"],
        "magnification": (float(scale["magnification"]) if scale["magnification"] is not None
                          else -1.0),
        "pixel_size_note": "; ".join(x for x in (
            scale["embedded_note"],
            "the TIFF's tags state a pixel size ten times too fine (HEST issue 106)"
            if scale["tags_tenfold"] or "x 10" in scale["scale_from"] else "") if x),
    }
    meta.update(check_spots_on_image(sample_id, files["wsi"], pix, hires, hscale, size,
                                      layout["near_um"] / px_um))
    adata.uns["spatial"] = {sample_id: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": float(hscale),
                         "spot_diameter_fullres": float(layout["diameter"] / px_um)},
        "metadata": meta}}
    hest_meta = {k: v for k, v in meta_json.items()
                 if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    adata.uns["mclstexp"] = {
        "dataset": "hest", "section": sample_id,
        "files": {k: str(v) for k, v in files.items()},
        "counts_from": counts_from, "coordinates_from": pix_from,
        "array_from": layout["array_from"], "spots_dropped": dropped,
        "spots_not_in_tissue": int(not_in_tissue), "hest": hest_meta}
    return adata


# --------------------------------------------------------------- the steps of hest()
def _hest_files(root, sample_id: str) -> dict:
    """The sample's three files (``st``, ``wsi``, ``metadata``); all must exist."""
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
    return files


def _hest_metadata(path: Path) -> dict:
    """The metadata JSON; its missing values (``json.dump`` writes them as the token
    NaN, and HEST's metadata has many) become ``None``."""
    try:
        meta_json = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}. The file is truncated or "
                         "not JSON; download it again.") from exc
    if not isinstance(meta_json, dict):
        raise ValueError(f"{path}: expected a JSON object (HEST's per-sample "
                         f"metadata), found {type(meta_json).__name__}")
    return {str(k): (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in meta_json.items()}


def _hest_pixel_size(sample_id, files, meta_json, um_per_px, tiff_um, size) -> dict:
    """Microns per WSI pixel and where they come from: the argument, the metadata's
    estimate, its embedded value unless that is a dpi default, the TIFF's tags. Warns
    when the tags disagree with the value used (other than HEST's factor of ten) or the
    metadata states another image size."""
    embedded = _finite_positive(meta_json.get("pixel_size_um_embedded"))
    embedded_note = ""
    if embedded is not None and _dpi_default(embedded):
        embedded_note = (f"pixel_size_um_embedded={embedded:g} ignored: a resolution "
                         "default of the image writer, not the scan's")
        embedded = None
    chosen = [("given (um_per_px=)", _finite_positive(um_per_px)),
              (f"{files['metadata'].name}: pixel_size_um_estimated",
               _finite_positive(meta_json.get("pixel_size_um_estimated"))),
              (f"{files['metadata'].name}: pixel_size_um_embedded", embedded),
              ("TIFF resolution tags", tiff_um)]
    scale_from, px_um = next(((s, v) for s, v in chosen if v is not None), (None, None))
    if px_um is None:
        raise ValueError(
            f"HEST sample {sample_id!r}: no pixel size: {files['metadata']} has no "
            "positive pixel_size_um_estimated or pixel_size_um_embedded"
            + (f" ({embedded_note})" if embedded_note else "") + " and "
            f"{files['wsi']} has no resolution tags. Pass um_per_px= (microns per "
            "pixel of the WSI; HEST's metadata CSV lists it per sample), or download "
            "the sample's metadata JSON again.")
    tags_tenfold = (tiff_um is not None and scale_from != "TIFF resolution tags"
                    and abs(tiff_um * _HEST_TAG_FACTOR / px_um - 1) <= _HEST_TIFF_TOLERANCE)
    if tags_tenfold:
        log.info("%s: the TIFF's resolution tags state %.4g um/px, ten times finer than "
                 "the %.4g used (HEST's libvips unit slip, HEST issue 106)",
                 files["wsi"].name, tiff_um, px_um)
    if (tiff_um is not None and scale_from != "TIFF resolution tags" and not tags_tenfold
            and abs(tiff_um / px_um - 1) > _HEST_TIFF_TOLERANCE):
        warnings.warn(
            f"HEST sample {sample_id!r}: {files['wsi'].name} states {tiff_um:.4g} um/px in "
            f"its resolution tags but {px_um:.4g} um/px is used ({scale_from}), "
            f"{abs(tiff_um / px_um - 1):.0%} apart. Check which is right; pass "
            "um_per_px= to choose.", UserWarning, stacklevel=3)
    for key, n in (("fullres_px_width", size[0]), ("fullres_px_height", size[1])):
        stated = _finite_positive(meta_json.get(key))
        if stated is not None and round(stated) != n:
            warnings.warn(
                f"HEST sample {sample_id!r}: {files['metadata'].name} says {key}="
                f"{stated:g} but {files['wsi'].name} is {size[0]} x {size[1]} px; the WSI "
                "and the metadata may belong to different versions of the sample.",
                UserWarning, stacklevel=3)
    return {"um_per_px": px_um, "scale_from": scale_from, "tiff_um": tiff_um,
            "embedded_note": embedded_note, "tags_tenfold": tags_tenfold,
            "magnification": _magnification(meta_json.get("magnification"))}


def _hest_counts(sample_id, path: Path):
    """The h5ad, its raw integer counts (``X``, else ``layers['counts']``, else
    ``raw.X``), where they came from and their ``var``."""
    import anndata as ad

    try:
        src = ad.read_h5ad(path)
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}. The "
                         "file is truncated or not an AnnData .h5ad; download it "
                         "again.") from exc
    X, where, var = raw_counts(src, path.name)
    if X is not None:
        return src, X, where, var
    reasons = where
    raise ValueError(
        f"HEST sample {sample_id!r}: no raw counts in {path}: "
        f"{'; '.join(reasons) or 'it has no X'}. This package needs raw integer "
        "counts (ml.pp.prepare normalises them): put them into X or "
        "layers['counts'] (e.g. from the sample's original count matrix), or "
        "download the file again if it was changed.")


def _hest_spot_pixels(path: Path, src):
    """Spot centres ``(n, 2)`` in full-resolution WSI pixels, and where they came from."""
    spatial = np.asarray(src.obsm["spatial"]) if "spatial" in src.obsm else None
    if spatial is not None and spatial.ndim == 2 and spatial.shape[1] >= 2:
        pix = np.asarray(src.obsm["spatial"], dtype=float)[:, :2].copy()
        pix_from = "obsm['spatial']"
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(src.obs.columns):
        pix = src.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
        pix_from = "obs['pxl_col_in_fullres', 'pxl_row_in_fullres']"
    else:
        raise ValueError(
            f"{path}: no spot coordinates: neither obsm['spatial'] (x, y in "
            "full-resolution WSI pixels) nor obs['pxl_col_in_fullres', "
            "'pxl_row_in_fullres']. Is this a HEST st/ file?")
    bad = ~np.isfinite(pix).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} spot(s) without coordinates (NaN in "
            f"{pix_from}), e.g. {list(src.obs.index[bad][:3])}; remove them from the "
            "h5ad first.")
    return pix, pix_from


def _hest_spots_kept(sample_id, files, obs_src, pix, X, size, pix_from, in_tissue_only,
                     drop_zero_count_spots):
    """Which spots to keep (a few outside the WSI are dropped with a warning, most
    outside is an error; optionally those not in tissue, those without counts), the
    counts dropped per reason and the number of spots not in tissue."""
    import pandas as pd

    width, height = size
    n_rows = len(pix)
    keep = np.ones(n_rows, dtype=bool)
    dropped = {"outside_image": 0, "not_in_tissue": 0, "zero_counts": 0}
    not_in_tissue = 0
    if "in_tissue" in obs_src.columns:
        flag = pd.to_numeric(obs_src["in_tissue"].astype(object).map(
            lambda v: {True: 1, False: 0, "True": 1, "False": 0}.get(v, v)),
            errors="coerce").to_numpy(float)
        in_t = flag == 1
        not_in_tissue = int((~in_t).sum())
        if in_tissue_only:
            dropped["not_in_tissue"] = not_in_tissue
            keep &= in_t
    outside = (pix[:, 0] < 0) | (pix[:, 0] >= width) | (pix[:, 1] < 0) | (pix[:, 1] >= height)
    if outside.any():
        where_out = (f"{int(outside.sum())} of the {n_rows} spot centres of "
                     f"{files['st'].name} lie outside {files['wsi'].name} ({width} x "
                     f"{height} px), e.g. {list(obs_src.index[outside][:3])} at "
                     f"{pix[outside][0].round(1).tolist()}")
        if outside.mean() > 0.5:
            raise ValueError(
                f"HEST sample {sample_id!r}: {where_out}. The spots ({pix_from}) must be "
                "in the full-resolution WSI's pixels: check that the h5ad and the TIFF "
                "are the same sample and the same HEST version (download both again).")
        dropped["outside_image"] = int(outside.sum())
        keep &= ~outside
        warnings.warn(
            f"HEST sample {sample_id!r}: {where_out}; dropped them (HEST keeps them in "
            "the h5ad and skips them when it cuts patches, HEST issue 40). They are "
            "counted in uns['mclstexp']['spots_dropped']['outside_image'].",
            UserWarning, stacklevel=3)
    totals = np.asarray(X.sum(axis=1)).ravel()
    if drop_zero_count_spots:
        zero = keep & (totals == 0)
        dropped["zero_counts"] = int(zero.sum())
        keep &= totals > 0
    if not keep.any():
        raise ValueError(f"{files['st']}: no spots left ({n_rows} in the file; dropped "
                         f"{dropped}). Pass in_tissue_only=False or "
                         "drop_zero_count_spots=False to keep them.")
    lost = dropped["not_in_tissue"] + dropped["zero_counts"]
    if lost:
        msg = (f"HEST sample {sample_id!r}: kept {int(keep.sum())} of {n_rows} spots "
               f"({dropped['not_in_tissue']} not in tissue, {dropped['zero_counts']} "
               "without counts"
               + (f", {dropped['outside_image']} outside the WSI" if dropped["outside_image"]
                  else "") + ").")
        if lost > DROPPED_WARN_SHARE * n_rows:
            hint = (" Pass in_tissue_only=False to keep the spots HEST marks as outside "
                    "the tissue." if dropped["not_in_tissue"] else "")
            warnings.warn(msg + hint, UserWarning, stacklevel=3)
        else:
            log.info("%s", msg)
    return keep, dropped, not_in_tissue


def _hest_spacing(obs_src, pix, tech_key: str):
    """Measured spot spacing in pixels (on the fitted array grid when the h5ad has
    array coordinates, else the median nearest-neighbour distance), the array
    coordinates and where they came from, and the legacy-ST array layout (or ``None``)."""
    from scipy.spatial import cKDTree

    if len(pix) >= 2:
        dist, _ = cKDTree(pix).query(pix, k=2)
        nn = dist[:, 1][dist[:, 1] > 0]
        nn_px = float(np.median(nn)) if len(nn) else float("nan")
    else:
        nn_px = float("nan")
    spacing_px = nn_px
    if tech_key in ("visium hd", "xenium"):
        # HEST's pseudo-spots: Visium HD's array_row/array_col are running numbers
        # given after empty bins were removed, not grid positions
        arr_xy, array_from = None, ""
    else:
        arr_xy, array_from = _hest_array_coords(obs_src, pix)
    geo = None
    if arr_xy is not None and len(pix) >= 3:
        try:  # on the fitted grid: spots detected off the grid do not bias it
            spacing_px = grid_spacing_px(arr_xy, pix)
            if tech_key == "spatial transcriptomics" and len(pix) >= 6:
                geo = array_layout(arr_xy, pix)
        except (ValueError, np.linalg.LinAlgError):
            spacing_px = nn_px
    return spacing_px, arr_xy, array_from, geo


def _hest_tags_tenfold(sample_id, files, scale, pitch, grid, spacing_px) -> None:
    """When the TIFF's tags are the only pixel size and the spots (or the scan's
    magnification) say they are ten times too fine, as HEST writes them, use ten times
    the tags (in ``scale``), with a warning."""
    px_um = scale["um_per_px"]
    near = pitch / GRID_ROW_RATIO.get(grid or "square", 1.0)
    tenfold = (math.isfinite(spacing_px) and 1 / _HEST_SPACING_TOLERANCE
               <= spacing_px * px_um * _HEST_TAG_FACTOR / near <= _HEST_SPACING_TOLERANCE)
    if not math.isfinite(spacing_px) and scale["magnification"] is not None:
        # no spacing to measure: a 20x scan has about 0.5 um/px, 40x 0.25
        tenfold = 1 / 3 <= px_um * _HEST_TAG_FACTOR * scale["magnification"] / 10 <= 3
    if tenfold:
        warnings.warn(
            f"HEST sample {sample_id!r}: the only pixel size is {files['wsi'].name}'s "
            f"resolution tags, {px_um:.4g} um/px, but neighbouring spots are then "
            f"{spacing_px * px_um:.1f} um apart instead of {near:g}: the tags are ten "
            "times too fine, as HEST writes them (libvips takes pixels per mm where "
            f"HEST gives pixels per cm; HEST issue 106). Using {px_um * 10:.4g} um/px; "
            "pass um_per_px= to choose.", UserWarning, stacklevel=4)
        scale["um_per_px"] = px_um * _HEST_TAG_FACTOR
        scale["scale_from"] = "TIFF resolution tags x 10 (HEST writes them ten times too fine)"


def _hest_layout(sample_id, files, meta_json, obs_src, pix, scale, spot_pitch_um,
                 spot_diameter_um) -> dict:
    """The spot layout: technology, grid, spot distance and diameter (and where they
    come from), measured spacing, array coordinates. May correct the pixel size in
    ``scale`` (:func:`_hest_tags_tenfold`); warns when the measured spacing is far from
    the stated spot distance."""
    tech = str(meta_json.get("st_technology") or "").strip()
    tech_key = tech.lower()
    known = HEST_SPOT_LAYOUT.get(tech_key)
    spacing_px, arr_xy, array_from, geo = _hest_spacing(obs_src, pix, tech_key)
    grid = known[2] if known is not None else ""
    if geo is not None and geo["layout"] == "2k" and not geo["ambiguous"]:
        grid = ARRAY_LAYOUTS["2k"]["grid"]  # a 2k array: a checkerboard
    pitch_from = "given (spot_pitch_um=)"
    pitch = _finite_positive(spot_pitch_um)
    meta_pitch = _finite_positive(meta_json.get("inter_spot_dist"))
    if tech_key == "visium hd" and meta_pitch == _HEST_HD_PLACEHOLDER_UM:
        meta_pitch = None  # the raw 2 um bin, not HEST's pooled 128 um bins
    if pitch is None:
        pitch, pitch_from = meta_pitch, f"{files['metadata'].name}: inter_spot_dist"
    if pitch is None and known is not None:
        pitch, pitch_from = known[0], f"st_technology {tech!r}"
    if scale["scale_from"] == "TIFF resolution tags" and pitch is not None:
        _hest_tags_tenfold(sample_id, files, scale, pitch, grid, spacing_px)
    px_um = scale["um_per_px"]
    if pitch is None:
        if not math.isfinite(spacing_px):
            raise ValueError(f"HEST sample {sample_id!r}: cannot tell the spot distance "
                             "(no inter_spot_dist, unknown st_technology, one spot); "
                             "pass spot_pitch_um=.")
        pitch, pitch_from = spacing_px * px_um, "measured neighbour spacing"
    meta_diameter = _finite_positive(meta_json.get("spot_diameter"))
    if tech_key == "visium hd" and meta_diameter == _HEST_HD_PLACEHOLDER_UM:
        meta_diameter = None
    diameter = (_finite_positive(spot_diameter_um) or meta_diameter
                or (known[1] if known is not None else None) or pitch / 2)
    near_um = pitch / GRID_ROW_RATIO.get(grid or "square", 1.0)
    spacing_um = spacing_px * px_um if math.isfinite(spacing_px) else float("nan")
    if math.isfinite(spacing_um) and not (
            1 / _HEST_SPACING_TOLERANCE <= spacing_um / near_um <= _HEST_SPACING_TOLERANCE):
        warnings.warn(
            f"HEST sample {sample_id!r}: neighbouring spots are {spacing_px:.1f} px apart, "
            f"i.e. {spacing_um:.1f} um at {px_um:.4g} um/px ({scale['scale_from']}), but the "
            f"spot distance is {near_um:g} um ({pitch_from}"
            + (f", {grid} grid" if grid else "") + "). The pixel size or the spot "
            "distance is wrong (or the spots were pooled into other bins): pass "
            "um_per_px= or spot_pitch_um=.", UserWarning, stacklevel=3)
    if arr_xy is not None:
        array_xy = np.round(arr_xy).astype(int)
    else:
        array_xy = np.round((pix - pix.min(axis=0)) / (pitch / px_um)).astype(int)
        array_from = ("spot centres / spot pitch in pixels ("
                      + ("HEST's array_row/array_col of pooled pseudo-spots are not grid "
                         "positions" if tech_key in ("visium hd", "xenium")
                         else "no array_row/array_col") + ")")
    return {"tech": tech, "grid": grid, "pitch": pitch, "pitch_from": pitch_from,
            "diameter": diameter, "near_um": near_um, "spacing_um": spacing_um,
            "array_xy": array_xy, "array_from": array_from}


def _hest_patient(meta_json, sample_id: str) -> str:
    """HEST's ``patient`` qualified by its ``dataset_title`` (or either alone)."""
    p = meta_json.get("patient")
    p = str(p).strip() if p is not None and not (isinstance(p, float) and math.isnan(p)) else ""
    title = str(meta_json.get("dataset_title") or "").strip()
    return f"{p} ({title})" if p and title else (p or title or sample_id)


def _hest_anndata(sample_id, X, var_src, obs_src, pix, patient, array_xy, tech):
    """The AnnData of the kept spots: ``obs`` (section, patient, array and pixel
    coordinates), ``var`` with the h5ad's gene columns, ``obsm['spatial']``."""
    import anndata as ad
    import pandas as pd

    legacy = tech.lower() == "spatial transcriptomics"
    obs = pd.DataFrame({
        "section": pd.Categorical([sample_id] * len(pix)),
        "patient": pd.Categorical([str(patient)] * len(pix)),
        "array_x": array_xy[:, 0],
        "array_y": array_xy[:, 1],
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
    }, index=[f"{sample_id}_{_plain_legacy_name(i) if legacy else i}"
              for i in obs_src.index.astype(str)])
    adata = ad.AnnData(X=X, obs=obs, var=plain_var(var_src))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = pix.astype(np.float64)
    return adata
