"""An AnnData in scanpy's spatial layout (``sc.read_visium``, ``squidpy.read.visium``,
spatialdata-io's tables) as a section in this package's layout: :func:`from_anndata`."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from .._patch_extract import DEFAULT_PATCH_UM
from ._io import HIRES_MAX_PX, downscaled_rgb, image_array_file, plain_var, raw_counts
from ._geometry import (
    ARRAY_LAYOUTS,
    SPACERANGER_SPOT_UM,
    array_layout,
    check_spots_on_image,
    layout_um_per_px,
    nearest_um,
)

log = logging.getLogger(__name__)

#: A patch cut from a downscaled image with fewer pixels than this across is upscaled
#: so much that the image encoder sees little of the tissue's texture: a warning says so.
MIN_PATCH_PX = 112


def _rgb_uint8(img, what: str) -> np.ndarray:
    """An image from ``uns['spatial'][lib]['images']`` as (H, W, 3) uint8: scanpy reads
    PNGs with matplotlib as floats in [0, 1]; squidpy with PIL as uint8."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1.0 + 1e-6:
            raise ValueError(f"{what}: float pixels outside [0, 1] (min {arr.min():.3g}, max "
                             f"{arr.max():.3g}); expected an 8-bit image or floats in [0, 1] "
                             "as scanpy reads them.")
        arr = np.round(arr * 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4 and (arr[..., 3] == 255).all():
        arr = arr[..., :3]
    return arr


def from_anndata(adata, image: str | os.PathLike | None = None, *,
                 library_id: str | None = None, section: str | None = None,
                 patient: str | None = None, array: str = "auto",
                 um_per_px: float | None = None, in_tissue_only: bool = True,
                 hires_max_px: int = HIRES_MAX_PX):
    """A section from an AnnData in scanpy's spatial layout.

    The layout that ``scanpy.read_visium``, ``squidpy.read.visium`` and spatialdata-io's
    tables use: raw counts in ``X`` (or ``layers['counts']`` / ``raw.X``), spot centres
    in full-resolution pixels in ``obsm['spatial']`` (x, y), optionally
    ``obs['array_row', 'array_col', 'in_tissue']``, and
    ``uns['spatial'][library_id]`` with ``images`` (``hires``, ``lowres``) and
    ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
    ``spot_diameter_fullres``).

    Parameters
    ----------
    adata
        The AnnData (not changed).
    image
        The full-resolution H&E that ``obsm['spatial']`` refers to (the image given to
        Space Ranger), if you have it: patches are then cut from it. Without it they are
        cut from ``images['hires']`` (else ``images['lowres']``) through its scale
        factor, with a warning that says what that resolution means for the patches.
        Such an image held in memory is saved once as a PNG in the cache (patches are
        cut from files).
    library_id
        Which library of ``uns['spatial']`` (needed only when there are several).
    section, patient
        Names for ``obs`` (default: the library id).
    array
        ``"auto"`` (the geometry of ``array_col``/``array_row`` decides, see
        :func:`mclstexp_lite.datasets.array_layout`), ``"visium"``, ``"1k"`` or ``"2k"``.
    um_per_px
        Microns per pixel of the full-resolution frame of ``obsm['spatial']``. Default:
        from the spot geometry (e.g. Visium spots 100 um apart), else from
        ``spot_diameter_fullres`` (Space Ranger's 65 um circle).
    in_tissue_only
        Drop spots whose ``obs['in_tissue']`` is 0 (when the column exists).

    Returns
    -------
    anndata.AnnData
        The layout of ``docs/data_model.md``: raw ``int32`` counts, ``var`` columns kept
        (``gene_ids`` lets a symbol panel match Ensembl ids), ``obs['section', 'patient',
        'array_x', 'array_y', 'pixel_x', 'pixel_y']`` in the pixels of the image patches
        are cut from, ``uns['spatial'][section]``; ``uns['mclstexp']['spots_dropped']``.

    Raises
    ------
    ValueError
        No ``obsm['spatial']``, no image (neither ``image=`` nor one in
        ``uns['spatial']``), several libraries without ``library_id``, counts that are not
        whole numbers anywhere, or no pixel size to be had.
    """
    import anndata as ad
    import pandas as pd

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"from_anndata needs an AnnData, got {type(adata).__name__}")
    if "spatial" not in adata.obsm or np.asarray(adata.obsm["spatial"]).ndim != 2:
        raise ValueError("the AnnData has no obsm['spatial'] (spot centres in full-resolution "
                         "pixels, x then y): load Visium data with squidpy.read.visium or "
                         "sc.read_visium, or use datasets.visium(outs_folder).")
    if array not in ("auto", *ARRAY_LAYOUTS):
        raise ValueError(f"array must be 'auto' or one of {sorted(ARRAY_LAYOUTS)}, got {array!r}")
    library_id, lib = _library(adata, library_id)
    sf = dict(lib.get("scalefactors") or {})
    section = str(section or library_id or "section")
    X, counts_from, var = raw_counts(adata)
    if X is None:
        raise ValueError(f"no raw counts in the AnnData: {'; '.join(counts_from)}. This "
                         "package needs raw integer counts (ml.pp.prepare normalises them): "
                         "keep them in X or layers['counts'] before normalising.")
    pix = np.asarray(adata.obsm["spatial"], dtype=float)[:, :2].copy()
    keep, dropped = _spots_kept(adata.obs, pix, in_tissue_only)
    X, pix, obs = X[keep], pix[keep], adata.obs.iloc[np.flatnonzero(keep)]
    if any(dropped.values()):
        log.info("%s: dropped %s", section, dropped)

    scale = _full_res_scale(section, obs, pix, sf, array=array, um_per_px=um_per_px)
    layout, full_um = scale["layout"], scale["full_um"]
    lay = ARRAY_LAYOUTS[layout]
    src, frame, img_from = _patch_source(section, image, lib, library_id, full_um)
    xy = pix * frame
    um = full_um / frame
    hires, (w, h) = downscaled_rgb(src, hires_max_px)
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if outside.mean() > 0.5:
        raise ValueError(f"{section}: {int(outside.sum())} of {len(xy)} spots lie outside "
                         f"the image {src} ({w} x {h} px): obsm['spatial'] is not in this "
                         "image's full-resolution pixels (a downscaled image needs its scale "
                         "factor; pass the image Space Ranger was given).")
    scalef = hires.shape[1] / w
    pitch_um = float(lay["pitch_um"])
    spacing_um = nearest_um(layout)
    geo = scale["geo"]
    meta = {"source_image_path": str(Path(src).resolve()), "source_image_sha256": "",
            "source_image_size": [int(w), int(h)], "um_per_px": float(um),
            "pixel_scale": float(frame), "spot_pitch_um": pitch_um,
            "spot_spacing_um": round(spacing_um, 3), "spot_diameter_um": float(lay["diameter_um"]),
            "array": layout, "grid": lay["grid"],
            "array_from": (f"given (array={array!r})" if array != "auto" else
                           f"auto: {geo['reason']}" if geo is not None else
                           "assumed visium (no array_row/array_col)"),
            "scale_from": scale["scale_from"], "image_from": img_from}
    meta.update(check_spots_on_image(section, src, xy, hires, scalef, (w, h), spacing_um / um))

    arr = scale["arr"]
    if arr is not None and np.isfinite(arr).all():
        array_xy = np.round(arr).astype(int)
    else:
        array_xy = np.round((pix - pix.min(axis=0)) * full_um / pitch_um).astype(int)
    new_obs = pd.DataFrame({
        "section": pd.Categorical([section] * len(xy)),
        "patient": pd.Categorical([str(patient or section)] * len(xy)),
        "array_x": array_xy[:, 0], "array_y": array_xy[:, 1],
        "pixel_x": xy[:, 0], "pixel_y": xy[:, 1],
    }, index=obs.index.astype(str))
    out = ad.AnnData(X=X, obs=new_obs, var=plain_var(var))
    if not out.var_names.is_unique:
        out.var_names_make_unique()
    out.obsm["spatial"] = xy.astype(np.float64)
    out.uns["spatial"] = {section: {
        "images": {"hires": hires},
        "scalefactors": {"tissue_hires_scalef": float(scalef),
                         "spot_diameter_fullres": float(lay["diameter_um"] / um)},
        "metadata": meta}}
    out.uns["mclstexp"] = {"dataset": "anndata", "section": section,
                           "library_id": str(library_id or ""), "counts_from": counts_from,
                           "files": {"image": str(image) if image is not None else ""},
                           "spots_dropped": dropped}
    if not math.isfinite(um) or um <= 0:  # pragma: no cover - guarded above
        raise ValueError(f"{section}: invalid pixel size {um}")
    return out


# -------------------------------------------------------- the steps of from_anndata()
def _library(adata, library_id):
    """The library id of ``uns['spatial']`` to use (the only one, or the one asked
    for; ``None`` when there is none) and its entry."""
    spatial = dict(adata.uns.get("spatial") or {})
    if library_id is None:
        if len(spatial) > 1:
            raise ValueError(f"uns['spatial'] holds {len(spatial)} libraries "
                             f"({', '.join(map(str, spatial))}); pass library_id= to choose one "
                             "(and subset the AnnData to its spots).")
        library_id = next(iter(spatial), None)
    elif library_id not in spatial:
        raise ValueError(f"library_id={library_id!r} is not in uns['spatial'] "
                         f"({', '.join(map(str, spatial)) or 'empty'})")
    return library_id, (spatial.get(library_id) or {} if library_id is not None else {})


def _spots_kept(obs, pix, in_tissue_only: bool):
    """Spots with coordinates (and in tissue, when asked and recorded); what was dropped."""
    import pandas as pd

    keep = np.isfinite(pix).all(axis=1)
    dropped = {"no_coordinates": int((~keep).sum()), "not_in_tissue": 0}
    if in_tissue_only and "in_tissue" in obs.columns:
        flag = pd.to_numeric(obs["in_tissue"].astype(object).map(
            lambda v: {True: 1, False: 0, "True": 1, "False": 0}.get(v, v)),
            errors="coerce").to_numpy(float)
        dropped["not_in_tissue"] = int((keep & (flag != 1)).sum())
        keep &= flag == 1
    if not keep.any():
        raise ValueError(f"no spots left (dropped {dropped}); pass in_tissue_only=False to keep "
                         "spots outside the tissue.")
    return keep, dropped


def _full_res_scale(section, obs, pix, sf, *, array, um_per_px) -> dict:
    """The spot array and the microns per full-resolution pixel (given, else from the
    spot geometry, else from Space Ranger's spot diameter); warns when the geometry and
    the scale factors disagree."""
    arr = (obs[["array_col", "array_row"]].to_numpy(float)
           if {"array_col", "array_row"} <= set(obs.columns) else None)
    geo = None
    if arr is not None and len(arr) >= 6 and np.isfinite(arr).all():
        try:
            geo = array_layout(arr, pix)
        except (ValueError, np.linalg.LinAlgError):
            geo = None
    layout = array if array != "auto" else (geo["layout"] if geo is not None else "visium")
    sf_um = None
    if "spot_diameter_fullres" in sf and float(sf["spot_diameter_fullres"]) > 0 \
            and layout == "visium":
        sf_um = SPACERANGER_SPOT_UM / float(sf["spot_diameter_fullres"])
    geo_um = layout_um_per_px(geo["steps_px"], layout) if geo is not None else None
    if um_per_px is not None:
        full_um, scale_from = float(um_per_px), "given (um_per_px=)"
    elif geo_um is not None:
        full_um, scale_from = geo_um, f"spot geometry ({layout} array)"
    elif sf_um is not None:
        full_um, scale_from = sf_um, (f"spot_diameter_fullres = {SPACERANGER_SPOT_UM:g} um "
                                      "(Space Ranger)")
    else:
        raise ValueError(f"{section}: no pixel size: no array_row/array_col to measure the "
                         "spot geometry and no scalefactors['spot_diameter_fullres']; pass "
                         "um_per_px= (microns per full-resolution pixel).")
    other = sf_um if scale_from.startswith("spot geometry") else geo_um
    if other is not None and not 0.9 <= other / full_um <= 1.1:
        warnings.warn(f"{section}: {scale_from} gives {full_um:.4g} um/px but the "
                      f"{'scale factors' if scale_from.startswith('spot geometry') else 'spot geometry'}"
                      f" give {other:.4g}; check that obsm['spatial'] and the scale factors "
                      "belong to the same image (or pass um_per_px=).", UserWarning,
                      stacklevel=3)
    return {"arr": arr, "geo": geo, "layout": layout, "full_um": full_um,
            "scale_from": scale_from}


def _patch_source(section, image, lib, library_id, full_um):
    """The image patches are cut from (``image``, else the library's hires or lowres
    image saved as a file), its frame relative to full resolution, and where it came
    from; warns when a downscaled image makes patches of little detail."""
    if image is not None:
        src = Path(image)
        if not src.is_file():
            raise FileNotFoundError(f"image file not found: {src} (the `image` argument of "
                                    "from_anndata); check the path.")
        return src, 1.0, "given (image=)"
    images = dict(lib.get("images") or {})
    sf = dict(lib.get("scalefactors") or {})
    key = next((k for k in ("hires", "lowres") if images.get(k) is not None), None)
    if key is None:
        raise ValueError(
            f"{section}: no image: uns['spatial'][{library_id!r}]['images'] has no hires "
            "or lowres image and no image= was given. Pass image= (the full-resolution "
            "H&E the spots were aligned to).")
    scalef = sf.get(f"tissue_{key}_scalef")
    if scalef is None or not float(scalef) > 0:
        raise ValueError(f"{section}: the {key} image has no "
                         f"scalefactors['tissue_{key}_scalef']; cannot place the spots on it.")
    frame = float(scalef)
    src = image_array_file(_rgb_uint8(images[key], f"images['{key}']"))
    um_img = full_um / frame
    crop = DEFAULT_PATCH_UM / um_img
    if crop < MIN_PATCH_PX:
        warnings.warn(
            f"{section}: no full-resolution image was given, so patches come from the "
            f"{key} image at {um_img:.2f} um/px: a {DEFAULT_PATCH_UM:.0f} um patch is "
            f"{crop:.0f} px across there and is enlarged to the model's input size, so "
            "the encoder sees far less detail than on full-resolution training slides "
            "(expect weaker predictions). Pass image= with the full-resolution H&E "
            "(e.g. the image given to Space Ranger) when you have it.",
            UserWarning, stacklevel=3)
    return src, frame, f"uns['spatial'][{library_id!r}]['images'][{key!r}]"
