"""10x Visium: a Space Ranger ``outs`` folder as AnnData."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from ._io import HIRES_MAX_PX, downscaled_rgb
from ._geometry import (
    ARRAY_LAYOUTS,
    SPACERANGER_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    array_layout,
    layout_um_per_px,
)

log = logging.getLogger(__name__)


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
    pos, pos_file = _visium_positions(spatial, in_tissue_only)
    missing = adata.obs_names.difference(pos.index)
    if len(missing):
        log.info("%s: %d barcode(s) of the matrix have no in-tissue position; dropped",
                 library_id, len(missing))
    adata = adata[adata.obs_names.isin(pos.index)].copy()
    pos = pos.loc[adata.obs_names]
    sf_path = spatial / "scalefactors_json.json"
    scale = _visium_scalefactors(sf_path, spatial, image_path)
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
    hires, (w, h) = downscaled_rgb(src, HIRES_MAX_PX)
    # Space Ranger's spot_diameter_fullres spans a 65 um circle (its documentation of
    # scalefactors_json.json), not the 55 um spot
    um_per_px = SPACERANGER_SPOT_UM / (scale["spot_diameter_fullres"] * frame)
    geo_um = _visium_geometry_check(library_id, sf_path, pos, xy, um_per_px)

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
                     "spot_pitch_um": VISIUM_PITCH_UM, "spot_spacing_um": VISIUM_PITCH_UM,
                     "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM, "array": "visium",
                     "grid": ARRAY_LAYOUTS["visium"]["grid"],
                     "scale_from": f"{sf_path.name}: spot_diameter_fullres = "
                                   f"{SPACERANGER_SPOT_UM:g} um",
                     "um_per_px_geometry": float(geo_um) if geo_um is not None else -1.0,
                     "source_image_size": [int(w), int(h)]},
    }}
    adata.uns["mclstexp"] = {"dataset": "visium", "section": library_id,
                             "files": {"counts": str(h5), "spots": str(pos_file),
                                       "image": str(src), "labels": ""}}
    return adata


def _visium_positions(spatial: Path, in_tissue_only: bool):
    """Space Ranger's spot positions (``tissue_positions.csv`` with a header, or the
    older ``tissue_positions_list.csv`` without) indexed by barcode, and the file."""
    import pandas as pd

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
    return pos, pos_file


def _visium_scalefactors(sf_path: Path, spatial: Path, image_path) -> dict:
    """``scalefactors_json.json``, with the factors the image used needs."""
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
    return scale


def _visium_geometry_check(library_id, sf_path: Path, pos, xy, um_per_px):
    """Microns per pixel the spot geometry shows (Visium spots 100 um apart), or
    ``None``; warns when it disagrees with the scale factors' by more than 10 %."""
    arr = pos[["array_col", "array_row"]].to_numpy(float)
    geo_um = None
    if len(arr) >= 6:
        try:
            geo_um = layout_um_per_px(array_layout(arr, xy)["steps_px"], "visium")
        except (ValueError, np.linalg.LinAlgError):
            geo_um = None
    if geo_um is not None and not 0.9 <= geo_um / um_per_px <= 1.1:
        warnings.warn(
            f"{library_id}: {sf_path.name} gives {um_per_px:.4g} um/px (spot_diameter_fullres "
            f"= {SPACERANGER_SPOT_UM:g} um) but spots 100 um apart show {geo_um:.4g} um/px; "
            "check that the positions and scale factors belong to this image.",
            UserWarning, stacklevel=3)
    return geo_um
