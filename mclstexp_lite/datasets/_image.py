"""A section from an H&E image alone: virtual spots over its tissue, no counts.

The input for predicting expression on a new slide (:mod:`mclstexp_lite.predict`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .. import _util
from .. import _slides as slides
from ._io import HIRES_MAX_PX, image_array_file
from ._geometry import GRID_ROW_RATIO, LEGACY_ST_PITCH_UM, LEGACY_ST_SPOT_DIAMETER_UM

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
    found on a thumbnail (:func:`mclstexp_lite.patches.tissue_mask`: Otsu's threshold on
    HSV saturation, morphological clean-up) unless ``tissue_mask`` is given; spot centres
    are laid on a ``grid`` at ``spot_pitch_um`` and kept where their disk is at least
    ``min_tissue`` tissue (:func:`mclstexp_lite.patches.lay_spots`). Pyramidal TIFFs are
    read level by level and region by region, never decoded whole
    (:func:`mclstexp_lite.patches.open_slide`).

    Parameters
    ----------
    image
        Path to the H&E image (TIFF, JPEG, PNG), 8-bit RGB, or the image itself as an
        ``(H, W, 3)`` uint8 NumPy array (then ``um_per_px`` is needed; the array is saved
        once as a PNG in the cache, named by its content, because patches are cut from
        files).
    um_per_px
        Microns per pixel of the image. Default: the pixel size the TIFF states; an
        image that states none needs it.
    spot_pitch_um, spot_diameter_um, grid
        The virtual spot layout; use the training data's (legacy ST 1k, the default:
        200 um, 100 um, ``"square"``; legacy ST 2k: 200 um, 100 um, ``"checkerboard"``;
        Visium: 100 um, 55 um, ``"hex"``). ``spot_pitch_um`` is the distance of
        neighbouring spots in the same row (:func:`mclstexp_lite.patches.lay_spots`).
        A predictor passes its training data's layout.
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
        that is not 8-bit RGB (see :func:`mclstexp_lite.patches.open_slide`).
    """
    for name, v in (("spot_pitch_um", spot_pitch_um), ("spot_diameter_um", spot_diameter_um)):
        if not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number of microns, got {v!r}")
    if not 0 < float(min_tissue) <= 1:
        raise ValueError(f"min_tissue must be in (0, 1], got {min_tissue!r}")
    if grid not in slides.GRIDS:
        raise ValueError(f"grid must be one of {slides.GRIDS} (legacy ST 1k, legacy ST 2k, "
                         f"Visium), got {grid!r}")
    from_array = isinstance(image, np.ndarray)
    if from_array:
        if um_per_px is None:
            raise ValueError("an image given as a NumPy array states no pixel size; pass "
                             "um_per_px= (microns per pixel of the array).")
        image = image_array_file(image)  # 8-bit RGB checked; patches need a file
        section = section or "image"
    elif not isinstance(image, (str, os.PathLike, slides.Slide)):
        raise TypeError(f"image must be a file path or an (H, W, 3) uint8 NumPy array, got "
                        f"{type(image).__name__}")
    slide = slides.open_slide(image)
    try:
        path = slide.path
        section = str(section) if section else (path.name.split(".")[0] if path else "image")
        um_per_px, scale_from = _image_scale(slide, um_per_px)
        ctx = {"name": slide.name, "um_per_px": um_per_px, "scale_from": scale_from,
               "w_mm": slide.width * um_per_px / 1000, "h_mm": slide.height * um_per_px / 1000,
               "max_tissue_mm": max_tissue_mm}
        hires, hscale = slide.thumbnail(hires_max_px)
        mask, thumb_um, scale, mask_from = _find_tissue(
            slide, hires, hscale, tissue_mask, spot_diameter_um, hires_max_px, ctx)
        tissue_mm2 = float(mask.sum() * (thumb_um / 1000) ** 2)
        centres, array_xy, share = _virtual_spots(
            mask, thumb_um, tissue_mm2, ctx, spot_pitch_um=spot_pitch_um,
            spot_diameter_um=spot_diameter_um, grid=grid, min_tissue=min_tissue,
            max_spots=max_spots)
        pix = centres / scale
        sha = _util.sha256_file(path) if path is not None else ""
        hmask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (hires.shape[1], hires.shape[0]), Image.Resampling.NEAREST)) > 0
        width, height = slide.width, slide.height
    finally:
        slide.close()

    adata = _image_only_anndata(section, array_xy, pix, share)
    meta = {
        "source_image_path": str(Path(path).resolve()) if path is not None else "",
        "source_image_sha256": sha,
        "source_image_size": [int(width), int(height)],
        "um_per_px": um_per_px,
        "pixel_scale": 1.0,
        "spot_pitch_um": float(spot_pitch_um),
        "spot_spacing_um": round(float(spot_pitch_um) / GRID_ROW_RATIO[grid], 3),
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
                             "files": {"image": ("<NumPy array> saved as " if from_array else "")
                                       + (str(path) if path is not None else "")},
                             "tissue_mask": hmask}
    return adata


# --------------------------------------------------------- the steps of from_image()
def _image_scale(slide, um_per_px):
    """Microns per pixel (given, else stated in the file) and where it came from; warns
    when the given value and the file's disagree."""
    scale_from = "given (um_per_px=)"
    if um_per_px is None:
        if slide.um_per_px_embedded is None:
            raise ValueError(
                f"{slide.name} does not state its pixel size (no TIFF resolution tags); pass "
                "um_per_px= (microns per pixel of this image, e.g. 0.25 for a 40x scan, "
                "0.5 for 20x; the scanner's metadata or the HEST metadata JSON says it).")
        um_per_px = slide.um_per_px_embedded
        scale_from = "stated in the image file"
    um_per_px = float(um_per_px)
    if not np.isfinite(um_per_px) or um_per_px <= 0:
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    emb = slide.um_per_px_embedded
    if emb is not None and scale_from.startswith("given") and not 0.8 <= um_per_px / emb <= 1.25:
        warnings.warn(f"{slide.name}: um_per_px={um_per_px:g} was given but the file states "
                      f"{emb:.4g} um/px; using the given value. Check which is right.",
                      UserWarning, stacklevel=3)
    return um_per_px, scale_from


def _check_extent(mask, mask_um, ctx) -> None:
    """Tissue wider than a glass slide: the scale is too large."""
    if not mask.any():
        return
    ys, xs = np.nonzero(mask)
    extent = sorted([(np.ptp(xs) + 1) * mask_um / 1000, (np.ptp(ys) + 1) * mask_um / 1000])
    if extent[0] > ctx["max_tissue_mm"]:
        area = float(mask.sum() * (mask_um / 1000) ** 2)
        raise ValueError(
            f"{ctx['name']}: the tissue spans {extent[0]:.1f} x {extent[1]:.1f} mm, wider "
            f"than a standard glass slide ({ctx['max_tissue_mm']:g} mm, max_tissue_mm=). The "
            f"image is {ctx['w_mm']:.2f} x {ctx['h_mm']:.2f} mm at "
            f"um_per_px={ctx['um_per_px']:g} ({ctx['scale_from']}); {area:.2f} mm^2 of it "
            "is tissue. um_per_px is probably too large (10x?); check the scanner's pixel "
            "size. For a large-format slide pass a larger max_tissue_mm=.")


def _find_tissue(slide, hires, hscale, tissue_mask, spot_diameter_um, hires_max_px, ctx):
    """The tissue mask on a thumbnail fine enough to resolve a spot's disk (>= 8 px
    across), its microns per pixel and scale, and how it was found; no tissue, or only
    specks at this scale, is an error."""
    um_per_px = ctx["um_per_px"]
    long_um = max(slide.width, slide.height) * um_per_px
    mask_px = int(min(8000, max(hires_max_px, math.ceil(long_um / (spot_diameter_um / 8)))))
    if mask_px > hires_max_px and tissue_mask is None:
        # a wrong scale shows on the small thumbnail already: fail before the fine one
        _check_extent(slides.tissue_mask(hires, um_per_px=um_per_px / hscale),
                      um_per_px / hscale, ctx)
        thumb, scale = slide.thumbnail(mask_px)
    else:
        thumb, scale = hires, hscale
    thumb_um = um_per_px / scale
    if tissue_mask is None:
        mask = slides.tissue_mask(thumb, um_per_px=thumb_um)
        mask_from = "Otsu threshold of HSV saturation, morphological clean-up"
    else:
        mask = _mask_for_thumb(tissue_mask, thumb.shape[:2], (slide.width, slide.height),
                               ctx["name"])
        mask_from = "given (tissue_mask=)"
    stained = float((slides.saturation(thumb) > slides.MIN_SATURATION).mean())
    if not mask.any() and tissue_mask is None and stained > 0.01:
        raise ValueError(
            f"{ctx['name']}: {stained:.0%} of the image is stained, but every stained piece "
            f"is smaller than {slides.MIN_PIECE_MM2} mm^2 at um_per_px={um_per_px:g} "
            f"({ctx['scale_from']}), at which the whole image is only {ctx['w_mm']:.2f} x "
            f"{ctx['h_mm']:.2f} mm. um_per_px is probably too small (10x?); check the "
            "scanner's pixel size, or pass tissue_mask=.")
    if not mask.any():
        raise ValueError(
            f"no tissue found in {ctx['name']} ({slide.width} x {slide.height} px, "
            f"{ctx['w_mm']:.1f} x {ctx['h_mm']:.1f} mm at {um_per_px:g} um/px): nothing is "
            f"stained (HSV saturation above max(Otsu, {slides.MIN_SATURATION})). Check that "
            "this is the H&E image (not a mask, label or fluorescence image), or pass "
            "tissue_mask=.")
    return mask, thumb_um, scale, mask_from


def _virtual_spots(mask, thumb_um, tissue_mm2, ctx, *, spot_pitch_um, spot_diameter_um, grid,
                   min_tissue, max_spots):
    """Spot centres on the mask's thumbnail, their grid coordinates and tissue shares
    (:func:`mclstexp_lite.patches.lay_spots`); too few or too many for the scale is an
    error that says what to check."""
    centres, array_xy, share = slides.lay_spots(
        mask, mask_um_per_px=thumb_um, pitch_um=spot_pitch_um,
        diameter_um=spot_diameter_um, grid=grid, min_tissue=min_tissue)
    n = len(centres)
    scale_hint = (f"The image is {ctx['w_mm']:.2f} x {ctx['h_mm']:.2f} mm at "
                  f"um_per_px={ctx['um_per_px']:g} ({ctx['scale_from']}); {tissue_mm2:.2f} "
                  "mm^2 of it is tissue.")
    if n < MIN_VIRTUAL_SPOTS:
        raise ValueError(
            f"{ctx['name']}: only {n} virtual spots of {spot_pitch_um:g} um pitch fit on the "
            f"tissue. {scale_hint} If the tissue is larger than that, um_per_px is too "
            "small (a 10x error shrinks it 100-fold in area); check the scanner's pixel "
            "size. Otherwise lower spot_pitch_um or min_tissue.")
    _check_extent(mask, thumb_um, ctx)
    if n > max_spots:
        raise ValueError(
            f"{ctx['name']}: {n:,} virtual spots of {spot_pitch_um:g} um pitch (more than "
            f"max_spots={max_spots:,}). {scale_hint} If the tissue is smaller than that, "
            "um_per_px is too large (a 10x error makes 100 times as many spots); check "
            "it. If the tissue really is that large, pass max_spots=.")
    return centres, array_xy, share


def _image_only_anndata(section, array_xy, pix, share):
    """The virtual spots as an AnnData with no genes."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    n = len(pix)
    obs = pd.DataFrame({
        "section": pd.Categorical([section] * n),
        "patient": pd.Categorical([""] * n),
        "array_x": array_xy[:, 0].astype(int),
        "array_y": array_xy[:, 1].astype(int),
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
        "tissue_share": share.astype(np.float32),
    }, index=[f"{section}_{x}x{y}" for x, y in array_xy])
    adata = ad.AnnData(X=sparse.csr_matrix((n, 0), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = pix.astype(np.float64)
    return adata
