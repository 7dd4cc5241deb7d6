"""Spot geometry: the array layout, the spot pitch in pixels, and checks that the spots
sit on the image.

- :data:`ARRAY_LAYOUTS` - the three spot arrays (legacy ST "1k" and "2k", Visium) in
  micrometres, and :func:`array_layout`, which tells them apart from the spot geometry;
- :func:`spot_pitch_px` - pixels per array step, least squares over every spot;
- :func:`grid_spacing_px` - neighbour distance on the fitted grid;
- :func:`check_spots_on_image` - warns when the spots miss the image's tissue (wrong
  image, wrong scale), with the thresholds below.

The layouts (STUtility, github.com/jbergenstrahle/STUtility, ``R/Staffli.R`` and
``R/image_processing.R``: its ``platforms`` option "1k", "2k", "Visium", the array limits
33 x 35, 67 x 64, 128 x 78 and the minimum spot distances 200, 141 and 100 um):

============ ============================ ========================= =============== ========
layout       array coordinates            neighbours                same-row / near grid
============ ============================ ========================= =============== ========
``"1k"``     consecutive, ~33 x 35        200 um, same row/column   1.0             square
``"2k"``     checkerboard (x + y of one   141 um diagonal; 200 um   1.41            checker-
             parity), ~67 x 64            in the same row                           board
``"visium"`` checkerboard, 128 x 78       100 um, six equidistant   1.0             hex
============ ============================ ========================= =============== ========

``spot_pitch_um`` is always the distance of neighbouring spots in the same row (200, 200,
100 um; HEST-1k's ``inter_spot_dist`` means the same), ``spot_spacing_um`` the distance of
the nearest neighbours (200, 141.4, 100 um).
"""

from __future__ import annotations

import warnings

import numpy as np

#: Centre-to-centre spot distance in micrometres.
LEGACY_ST_PITCH_UM = 200.0
VISIUM_PITCH_UM = 100.0
LEGACY_ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Space Ranger's ``spot_diameter_fullres`` is the width in full-resolution pixels of a
#: "theoretical 65 um spot" (10x Genomics' description of ``scalefactors_json.json``),
#: not of the 55 um spot: on the Visium fixture 89.47 px, against 137.66 px between
#: spots 100 um apart (65 / 89.47 = 0.7265 and 100 / 137.66 = 0.7264 um/px).
SPACERANGER_SPOT_UM = 65.0

#: The spot arrays by name: ``grid`` (how :func:`mclstexp_lite.patches.lay_spots` lays
#: them), ``pitch_um`` (same-row neighbours), ``diameter_um``, ``step_um`` (micrometres
#: per array step along x and y) and ``checkerboard`` (only x + y of one parity occur).
ARRAY_LAYOUTS: dict[str, dict] = {
    "1k": {"grid": "square", "pitch_um": LEGACY_ST_PITCH_UM, "diameter_um": 100.0,
           "step_um": (200.0, 200.0), "checkerboard": False},
    "2k": {"grid": "checkerboard", "pitch_um": LEGACY_ST_PITCH_UM, "diameter_um": 100.0,
           "step_um": (100.0, 100.0), "checkerboard": True},
    "visium": {"grid": "hex", "pitch_um": VISIUM_PITCH_UM, "diameter_um": VISIUM_SPOT_DIAMETER_UM,
               "step_um": (50.0, 50.0 * 3 ** 0.5), "checkerboard": True},
}
#: Same-row over nearest-neighbour distance of each grid (1k and Visium: 1, 2k: sqrt 2).
GRID_ROW_RATIO = {"square": 1.0, "checkerboard": 2 ** 0.5, "hex": 1.0}
#: A checkerboard whose same-row / nearest ratio is more than this factor from both 1 and
#: sqrt(2), or a consecutive array more than this from 1, is ambiguous (a warning).
LAYOUT_TOLERANCE = 1.15
#: Share of spots whose x + y has the majority parity for a checkerboard (a 1k array:
#: about one half).
CHECKERBOARD_SHARE = 0.98


def nearest_um(layout: str, pitch_um: float | None = None) -> float:
    """Nearest-neighbour distance (um) of ``layout`` (scaled to ``pitch_um`` if given)."""
    lay = ARRAY_LAYOUTS[layout]
    scale = (pitch_um or lay["pitch_um"]) / lay["pitch_um"]
    return float(lay["pitch_um"] / GRID_ROW_RATIO[lay["grid"]] * scale)


def array_layout(array_xy: np.ndarray, pixel_xy: np.ndarray) -> dict:
    """Which spot array (:data:`ARRAY_LAYOUTS`) the spots' geometry shows.

    Two measures tell the layouts apart: whether the array coordinates form a
    checkerboard (at least :data:`CHECKERBOARD_SHARE` of the spots have x + y of one
    parity), and the ratio of the distance between neighbouring spots of one row (the
    most common x gap of consecutive spots in a row, times the least-squares pixels per
    x step) to the distance of nearest neighbours (:func:`grid_spacing_px`): 1 for a
    consecutive 1k array and for Visium's hexagonal one, sqrt(2) = 1.41 for a 2k array.

    Returns
    -------
    dict
        ``layout`` (``"1k"``, ``"2k"`` or ``"visium"``), ``ambiguous`` (bool; then
        ``layout`` is the nearest guess), ``checkerboard`` (bool), ``parity_share``,
        ``row_ratio`` (NaN when no row holds two spots), ``steps_px`` (least-squares
        pixels per array step along x and y, NaN for an axis that does not vary),
        ``nearest_px`` and ``reason`` (a sentence for messages).
    """
    a = np.round(np.asarray(array_xy, dtype=float)).astype(np.int64)
    steps = _axis_steps(array_xy, pixel_xy, "array layout")
    nearest = grid_spacing_px(array_xy, pixel_xy)
    parity = (a[:, 0] + a[:, 1]) % 2
    share = float(max(parity.mean(), 1 - parity.mean()))
    checker = len(a) >= 6 and share >= CHECKERBOARD_SHARE
    order = np.lexsort((a[:, 0], a[:, 1]))
    xs, ys = a[order, 0], a[order, 1]
    same = ys[1:] == ys[:-1]
    gaps = (xs[1:] - xs[:-1])[same]
    gaps = gaps[gaps > 0]
    if len(gaps) and np.isfinite(steps[0]):
        values, counts = np.unique(gaps, return_counts=True)
        row_px = float(values[np.argmax(counts)] * steps[0])
        ratio = row_px / nearest
    else:
        ratio = float("nan")
    tol = np.log(LAYOUT_TOLERANCE)
    if checker:
        off = {"visium": abs(np.log(ratio)), "2k": abs(np.log(ratio / 2 ** 0.5))} \
            if np.isfinite(ratio) else {"2k": np.inf, "visium": np.inf}
        layout = min(off, key=off.get)
        ambiguous = bool(off[layout] > tol)
        what = (f"a checkerboard ({share:.0%} of the spots have x + y of one parity) whose "
                f"same-row neighbours are {ratio:.2f}x the nearest-neighbour distance")
    else:
        layout = "1k"
        finite = steps[np.isfinite(steps)]
        step_ratio = nearest / float(np.mean(finite)) if len(finite) else float("nan")
        ambiguous = bool(any(np.isfinite(r) and abs(np.log(r)) > np.log(1.25)
                             for r in (ratio, step_ratio)))
        what = (f"consecutive array coordinates ({share:.0%} of the spots share the "
                f"majority x + y parity) whose nearest neighbours are {step_ratio:.2f} array "
                f"steps apart (1 on a 1k array) and same-row neighbours {ratio:.2f}x the "
                "nearest-neighbour distance")
    return {"layout": layout, "ambiguous": ambiguous, "checkerboard": bool(checker),
            "parity_share": round(share, 4), "row_ratio": float(ratio),
            "steps_px": [float(x) for x in steps], "nearest_px": float(nearest),
            "reason": what}


def layout_um_per_px(steps_px, layout: str, pitch_um: float | None = None) -> float:
    """Microns per pixel from the least-squares pixels per array step ``steps_px`` (x,
    y; NaN for an axis that does not vary) on ``layout`` with same-row pitch
    ``pitch_um`` (default the layout's): one over the mean of the pixels per micrometre
    of the two axes. For a 1k array this is ``pitch_um`` over :func:`spot_pitch_px`."""
    lay = ARRAY_LAYOUTS[layout]
    scale = (pitch_um or lay["pitch_um"]) / lay["pitch_um"]
    rates = [s / (u * scale) for s, u in zip(steps_px, lay["step_um"]) if np.isfinite(s)]
    if not rates or min(rates) <= 0:
        raise ValueError("cannot measure the spot pitch: spot array coordinates do not vary "
                         "or pixel coordinates do not follow them")
    return float(1.0 / np.mean(rates))


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
    the result is the median distance to the nearest other spot. On a 1k array, where
    one array step is one spot pitch (legacy ST, HER2+), it equals :func:`spot_pitch_px`
    up to the small difference between the two axes; on a 2k array (a checkerboard) it
    is the diagonal, sqrt(2) steps (:func:`array_layout`).
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


#: A pixel counts as stained tissue when its HSV saturation exceeds this (H&E tissue is
#: pink/purple, glass background white or black): 93-99 % of HER2+ spots, 16-35 % of
#: their images' pixels.
TISSUE_SATURATION = 0.1
#: Fewer spots than this share on stained tissue: wrong image or scale (a warning).
MIN_SPOTS_ON_TISSUE = 0.5
#: The spots' bounding box (plus one pitch) covers less than this share of the image: a
#: warning (HER2+: 33-46 %).
MIN_SPOT_COVERAGE = 0.02
#: Stain contrast: the share of stained pixels within half a pitch of a spot centre over
#: the share in the rest of the image. The 7 HER2+ sections with an image: 4.3-17.6; their
#: spots on another patient's image: 1.0-4.1, on another section of the same patient:
#: 1.0-5.3 (docs/data_model.md). Below this, a warning.
MIN_STAIN_CONTRAST = 3.0
#: ... unless the rest of the image is itself mostly stained (an image cropped to the
#: tissue), where the comparison says nothing (HER2+: 5-23 % of the rest is stained).
MAX_STAINED_ELSEWHERE = 0.5


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


def check_spots_on_image(section, image, pix, hires, scalef, size, pitch_px,
                         pixel_scale=1.0) -> dict:
    """Warn when the spots do not sit on the image's tissue; returns the measures.

    Three measures on the downscaled image, stained = HSV saturation above
    :data:`TISSUE_SATURATION`: the share of spot centres on stained pixels, the share of
    the image inside the spots' bounding box, and the stain contrast (the stained share
    within half a pitch of a spot centre over the stained share in the rest of the image).
    """
    img = hires.astype(np.float32) / 255.0
    top = img.max(axis=2)
    sat = (top - img.min(axis=2)) / np.maximum(top, 1e-6)
    stained = sat > TISSUE_SATURATION
    xy = np.round(pix * scalef).astype(int)
    xy[:, 0] = np.clip(xy[:, 0], 0, sat.shape[1] - 1)
    xy[:, 1] = np.clip(xy[:, 1], 0, sat.shape[0] - 1)
    on_tissue = float(stained[xy[:, 1], xy[:, 0]].mean())
    under, elsewhere, contrast = _stain_contrast(stained, pix * scalef, pitch_px * scalef / 2)
    w, h = size
    lo, hi = pix.min(axis=0) - pitch_px, pix.max(axis=0) + pitch_px
    coverage = float(max(0.0, min(hi[0], w) - max(lo[0], 0)) * max(0.0, min(hi[1], h) - max(lo[1], 0))
                     / (w * h))
    if coverage < MIN_SPOT_COVERAGE:
        warnings.warn(
            f"{section}: the spots cover only {coverage:.1%} of the image {image} ({w} x {h} "
            "px). The spot pixels are probably in another frame or scale: check pixel_scale "
            "and that the image belongs to this section.", UserWarning, stacklevel=3)
    if on_tissue < MIN_SPOTS_ON_TISSUE:
        warnings.warn(
            f"{section}: only {on_tissue:.0%} of the spots lie on stained tissue of {image} "
            f"(HSV saturation > {TISSUE_SATURATION}; on the HER2+ sections 93-99 %). Wrong "
            "image, or wrong pixel_scale?", UserWarning, stacklevel=3)
    elif contrast < MIN_STAIN_CONTRAST and elsewhere <= MAX_STAINED_ELSEWHERE:
        warnings.warn(
            f"{section}: little stain under the spots compared with the rest of the image "
            f"{image}: {under:.0%} of the pixels within half a pitch of a spot are stained, "
            f"{elsewhere:.0%} elsewhere ({contrast:.2f}x; {MIN_STAIN_CONTRAST:g}x or more "
            "expected, 4.3-17.6x on the HER2+ sections). The image probably belongs to "
            f"another section, or the spot pixels are in another scale: check the image "
            f"file and pixel_scale (now {pixel_scale:g}). (A false alarm when much of the "
            "tissue lies outside the spot array.)", UserWarning, stacklevel=3)
    return {"spots_on_tissue": round(on_tissue, 4), "spot_coverage": round(coverage, 4),
            "stain_under_spots": round(under, 4), "stain_elsewhere": round(elsewhere, 4),
            "stain_contrast": round(contrast, 3)}
