"""Legacy spatial transcriptomics (ST) sections: HER2+, cSCC and your own files.

- :func:`her2st` - HER2-positive breast cancer (Andersson et al. 2021), 36 sections
- :func:`cscc` - cutaneous squamous cell carcinoma (Ji et al. 2020), 12 sections
- :func:`from_files` - your own section: count table + spot file + H&E image
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .. import download as dl
from .._gene_names import read_gene_map, unversioned
from ._io import (
    DROPPED_WARN_SHARE,
    FIX_MANIFEST,
    FIX_OWN,
    HIRES_MAX_PX,
    downscaled_rgb,
    looks_like_spot_file,
    looks_like_spot_ids,
    read_table,
    unpack_gz,
)
from ._geometry import (
    ARRAY_LAYOUTS,
    array_layout,
    check_spots_on_image,
    layout_um_per_px,
    nearest_um,
)

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

#: A given ``um_per_px`` and the scale the spots show may differ by this factor before a
#: warning says so.
_PITCH_AGREEMENT = 1.25
#: Counts and spot file sharing fewer than this share of the smaller of the two (after
#: the ``selected`` filter) are probably from different sections: the warning asks. On
#: HER2+ the 36 true pairs share 100 %; the 1,260 pairs of one section's counts with
#: another's spot file a median 84 %, and 67 % of them fall below 0.9 (docs/data_model.md).
SAME_SECTION_SHARE = 0.9


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
    array: str = "auto",
    spot_pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
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
    array
        The spot array (:data:`mclstexp_lite.datasets.ARRAY_LAYOUTS`): ``"1k"`` (legacy
        ST, ~1,000 spots 200 um apart in rows and columns, consecutive array
        coordinates; HER2+ and most published ST data), ``"2k"`` (legacy ST, ~2,000
        spots on a checkerboard of array coordinates, one step 100 um: nearest
        neighbours diagonal at 141 um, 200 um within a row), ``"visium"`` (a checkerboard
        of hexagonally packed spots 100 um apart) or ``"auto"`` (default): decided from
        the geometry by :func:`mclstexp_lite.datasets.array_layout` (checkerboard or not;
        the same-row over nearest-neighbour distance, 1 or 1.41), with a warning only
        when the geometry fits no layout well. The layout, how it was decided and the
        distances are recorded in the metadata (``array``, ``array_from``, ``grid``,
        ``spot_pitch_um``, ``spot_spacing_um``, ``array_step_um``).
    spot_pitch_um, spot_diameter_um
        Distance of neighbouring spots in the same row and spot diameter (um); default
        the layout's (1k and 2k: 200 and 100, Visium: 100 and 55). Without ``um_per_px``
        the scale comes from the least-squares pixels per array step (one step is 200 um
        on a 1k array, 100 um on a 2k array, 50 um across and 86.6 um down on Visium),
        scaled when ``spot_pitch_um`` is given.
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
    _check_from_files_args(counts=counts, spots=spots, image=image, labels=labels,
                           pixel_scale=pixel_scale, um_per_px=um_per_px, array=array,
                           spot_pitch_um=spot_pitch_um, spot_diameter_um=spot_diameter_um,
                           counts_orientation=counts_orientation)
    patient = patient if patient is not None else section
    cnt = _read_counts(counts, spots, counts_orientation)
    sp, n_rows, not_selected = _read_spot_file(spots, counts, selected)
    cnt, sp, dropped = _match_counts_and_spots(
        cnt, sp, counts=counts, spots=spots, section=section, n_rows=n_rows,
        not_selected=not_selected, selected=selected, counts_orientation=counts_orientation,
        drop_zero_count_spots=drop_zero_count_spots)

    pix = sp[["pixel_x", "pixel_y"]].to_numpy(float) * pixel_scale
    obs = _spot_obs(sp, pix, section, patient)
    if labels is not None:
        _add_labels(obs, Path(labels), sp.index, section)
    X = sparse.csr_matrix(cnt.to_numpy().astype(np.int32))
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(
        index=pd.Index(cnt.columns.astype(str), name=None)))
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    if gene_map is not None:
        _add_gene_symbols(adata, gene_map, counts, section)
    adata.obsm["spatial"] = pix.astype(np.float64)

    scale = _legacy_scale(section, spots, sp[["x", "y"]].to_numpy(float), pix, array=array,
                          um_per_px=um_per_px, spot_pitch_um=spot_pitch_um,
                          spot_diameter_um=spot_diameter_um)
    lay = ARRAY_LAYOUTS[scale["layout"]]
    pitch_um, um_per_px = scale["pitch_um"], scale["um_per_px"]
    spacing_um = nearest_um(scale["layout"], pitch_um)
    meta = {
        "source_image_path": str(Path(image).resolve()) if image is not None else "",
        "source_image_sha256": image_sha256,
        "um_per_px": float(um_per_px),
        "pixel_scale": float(pixel_scale),
        "spot_pitch_um": pitch_um,
        "spot_spacing_um": round(spacing_um, 3),
        "spot_diameter_um": scale["diameter_um"],
        "array": scale["layout"],
        "array_from": scale["array_from"],
        "grid": lay["grid"],
        "array_step_um": [float(u) * pitch_um / lay["pitch_um"] for u in lay["step_um"]],
        "row_ratio": scale["row_ratio"],
        "scale_from": scale["scale_from"],
    }
    lib = {"metadata": meta, "images": {},
           "scalefactors": {"spot_diameter_fullres": float(scale["diameter_um"] / um_per_px),
                            "tissue_hires_scalef": 1.0}}
    if image is not None:
        _attach_image(lib, Path(image), pix, adata.obs_names, section=section,
                      pixel_scale=pixel_scale, pitch_px=spacing_um / um_per_px,
                      hires_max_px=hires_max_px,
                      fix=FIX_OWN if dataset == "custom" else FIX_MANIFEST)
    adata.uns["spatial"] = {section: lib}
    adata.uns["mclstexp"] = {"dataset": dataset, "section": section,
                             "files": {"counts": str(counts), "spots": str(spots),
                                       "image": str(image) if image is not None else "",
                                       "labels": str(labels) if labels is not None else "",
                                       "gene_map": (str(gene_map) if isinstance(
                                           gene_map, (str, os.PathLike)) else "")},
                             "spots_dropped": dropped}
    return adata


# ---------------------------------------------------------- the steps of from_files()
def _check_from_files_args(*, counts, spots, image, labels, pixel_scale, um_per_px, array,
                           spot_pitch_um, spot_diameter_um, counts_orientation) -> None:
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
    if array not in ("auto", *ARRAY_LAYOUTS):
        raise ValueError(f"array must be 'auto' or one of {sorted(ARRAY_LAYOUTS)} (the spot "
                         f"array: legacy ST 1k or 2k, or Visium), got {array!r}")
    for name, v in (("spot_pitch_um", spot_pitch_um), ("spot_diameter_um", spot_diameter_um)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not np.isfinite(v) or v <= 0):
            raise ValueError(f"{name} must be a positive number of microns (or None for the "
                             f"array layout's), got {v!r}")
    if counts_orientation not in ("spots_x_genes", "genes_x_spots"):
        raise ValueError("counts_orientation must be 'spots_x_genes' or 'genes_x_spots', "
                         f"got {counts_orientation!r}")


def _read_counts(counts: Path, spots: Path, counts_orientation: str):
    """The count table, spots x genes, checked: unique spot ids, whole non-negative
    numbers."""
    import pandas as pd

    cnt = read_table(counts, index_col=0)
    if looks_like_spot_file(cnt.columns):
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
    return cnt


def _read_spot_file(spots: Path, counts: Path, selected: bool):
    """The spot file indexed by ``"{x}x{y}"`` of the rounded array coordinates (with
    ``array_x``, ``array_y``), its number of rows, and the rows left out as not selected."""
    import pandas as pd

    sp = read_table(spots)
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(sp.columns):
        swapped = (" It looks like a count table (many columns, spot ids in the first): are "
                   f"the counts and spots arguments swapped? (counts: {counts})"
                   if sp.shape[1] > 20 else "")
        raise ValueError(f"{spots}: spot file needs columns {sorted(need)}, found "
                         f"{list(sp.columns)[:10]}{' ...' if sp.shape[1] > 10 else ''}."
                         + swapped)
    n_rows, not_selected = len(sp), 0
    if "selected" in sp.columns and selected:
        keep_sel = sp["selected"] == 1
        not_selected = int((~keep_sel).sum())
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
    return sp, n_rows, not_selected


def _match_counts_and_spots(cnt, sp, *, counts, spots, section, n_rows, not_selected,
                            selected, counts_orientation, drop_zero_count_spots):
    """The spots in both files (and with counts, unless ``drop_zero_count_spots`` is
    off), and the rows dropped by reason; warns when many were dropped or the two files
    share too few spot ids to be of one section."""
    dropped = {"not_selected": not_selected, "counts_without_spot_row": 0,
               "spot_rows_without_counts": 0, "zero_counts": 0}
    common = cnt.index.intersection(sp.index, sort=False)
    if len(common) == 0:
        hint = " Are they from the same section?"
        if looks_like_spot_ids(cnt.columns) and not looks_like_spot_ids(cnt.index):
            other = ("genes_x_spots" if counts_orientation == "spots_x_genes"
                     else "spots_x_genes")
            hint = (f" The count table's columns look like spot ids (e.g. {list(cnt.columns[:3])}): "
                    f"pass counts_orientation={other!r}.")
        raise ValueError(
            f"no spot ids shared between {counts} (e.g. {list(cnt.index[:3])}) and the "
            f"rounded array coordinates of {spots} (e.g. {list(sp.index[:3])})." + hint)
    dropped["counts_without_spot_row"] = len(cnt.index) - len(common)
    dropped["spot_rows_without_counts"] = len(sp.index) - len(common)
    overlap = len(common) / max(1, min(len(cnt.index), len(sp.index)))
    n_cnt, n_sp = len(cnt.index), len(sp.index)
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
        same = ""
        if overlap < SAME_SECTION_SHARE:
            same = (f" Only {len(common)} spot ids are in both the count table ({n_cnt} "
                    f"rows) and the spot file ({n_sp} rows{' selected' if selected and dropped['not_selected'] else ''}), "
                    f"{overlap:.0%} of the smaller: are {counts.name} and {spots.name} from the "
                    "same section? (Sections of one array design share spot ids, so files of "
                    "two sections match in part.)")
        if (n_rows and lost > DROPPED_WARN_SHARE * n_rows) or same:
            hint = (" Pass selected=False to keep the rows the spot file marks as not "
                    "selected." if dropped["not_selected"] and not same else "")
            warnings.warn(msg + same + hint, UserWarning, stacklevel=3)
        else:
            log.info("%s", msg)
    if len(cnt) == 0:
        raise ValueError(f"{counts}: no spots with counts left after matching {spots}")
    return cnt, sp, dropped


def _spot_obs(sp, pix, section, patient):
    import pandas as pd

    return pd.DataFrame({
        "section": pd.Categorical([section] * len(sp)),
        "patient": pd.Categorical([patient] * len(sp)),
        "array_x": sp["array_x"].to_numpy(int),
        "array_y": sp["array_y"].to_numpy(int),
        "pixel_x": pix[:, 0],
        "pixel_y": pix[:, 1],
    }, index=[f"{section}_{i}" for i in sp.index])


def _add_labels(obs, labels: Path, spot_ids, section) -> None:
    """``obs['label']`` from a pathologist label table (``x``, ``y``, ``label``), joined
    on the rounded array coordinates."""
    import pandas as pd

    lab = read_table(labels)
    if not {"x", "y", "label"} <= set(lab.columns):
        raise ValueError(f"{labels}: label file needs columns x, y, label; found "
                         f"{list(lab.columns)}")
    lab = lab.dropna(subset=["x", "y"])
    key = [f"{a}x{b}" for a, b in zip(np.round(lab["x"]).astype(int),
                                        np.round(lab["y"]).astype(int))]
    lab_map = dict(zip(key, lab["label"].astype(str)))
    obs["label"] = pd.Categorical([lab_map.get(i) for i in spot_ids])
    n_lab = int(obs["label"].notna().sum())
    log.info("%s: %d of %d spots carry a pathologist label", section, n_lab, len(obs))


def _add_gene_symbols(adata, gene_map, counts, section) -> None:
    """``var['gene_ids']`` (the counts' names) and ``var['gene_symbols']`` from
    ``gene_map``; the table must name the counts' genes in its first column."""
    mapping = read_gene_map(gene_map, what="gene_map")
    where = gene_map if isinstance(gene_map, (str, os.PathLike)) else "the gene_map mapping"
    plain = {unversioned(k): v for k, v in mapping.items()}
    names = [unversioned(str(n)) for n in adata.var_names]
    symbols = [plain.get(n, "") for n in names]
    n_mapped = sum(bool(x) for x in symbols)
    if n_mapped == 0:
        values = {unversioned(v) for v in mapping.values()}
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
            UserWarning, stacklevel=3)
    adata.var["gene_ids"] = adata.var_names.astype(str)
    adata.var["gene_symbols"] = symbols


def _legacy_scale(section, spots, arr_xy, pix, *, array, um_per_px, spot_pitch_um,
                  spot_diameter_um) -> dict:
    """The spot array (given, or decided from the geometry), its spot distance and
    diameter, and the image's microns per pixel (given, else from the spots); warns
    when the geometry fits no array well, contradicts the array given, or disagrees
    with the ``um_per_px`` given."""
    geo = array_layout(arr_xy, pix)
    ambiguous_1k = array == "auto" and geo["ambiguous"] and geo["layout"] == "1k"
    if array == "auto":
        layout = geo["layout"]
        array_from = f"auto: {geo['reason']}"
        if geo["ambiguous"] and um_per_px is None:
            alt = {"1k": "", "2k": " or array='visium'", "visium": " or array='2k'"}[layout]
            guess = ((spot_pitch_um or ARRAY_LAYOUTS["1k"]["pitch_um"]) / geo["nearest_px"]
                     if ambiguous_1k else
                     layout_um_per_px(geo["steps_px"], layout, spot_pitch_um))
            how = (" with the nearest neighbours one pitch apart" if ambiguous_1k else "")
            warnings.warn(
                f"{section}: the spots of {spots} fit no known array well: {geo['reason']} "
                f"(same-row / nearest: 1k and Visium 1.00, 2k 1.41). Taking "
                f"array={layout!r}{how}: {guess:.3f} um/px. Pass array={layout!r}{alt}, or "
                "um_per_px= if you know the image's scale.", UserWarning, stacklevel=3)
            array_from += " (ambiguous)"
    else:
        layout = array
        array_from = f"given (array={array!r})"
        if geo["checkerboard"] != ARRAY_LAYOUTS[layout]["checkerboard"]:
            warnings.warn(
                f"{section}: array={array!r} was given, but {spots} shows {geo['reason']}, "
                f"which is the geometry of a {geo['layout']} array. Check the array type.",
                UserWarning, stacklevel=3)
    lay = ARRAY_LAYOUTS[layout]
    pitch_um = float(spot_pitch_um) if spot_pitch_um is not None else float(lay["pitch_um"])
    diameter_um = (float(spot_diameter_um) if spot_diameter_um is not None
                   else float(lay["diameter_um"]) * pitch_um / lay["pitch_um"])
    scale_source = f"spot geometry: least-squares pixels per array step ({layout} array)"
    estimate = layout_um_per_px(geo["steps_px"], layout, pitch_um)
    if ambiguous_1k:
        # consecutive coordinates whose neighbours are not one step apart: take the
        # distance of nearest neighbours as the pitch (the scale the spots show)
        estimate = pitch_um / geo["nearest_px"]
        scale_source = "spot geometry: nearest-neighbour spacing (ambiguous array)"
    if um_per_px is None:
        um_per_px = estimate
    else:
        scale_source = "given (um_per_px=)"
        if not 1 / _PITCH_AGREEMENT <= estimate / um_per_px <= _PITCH_AGREEMENT:
            warnings.warn(
                f"{section}: um_per_px={um_per_px:g} was given, but on a {layout} array "
                f"(same-row spots {pitch_um:g} um apart) the spots of {spots} show "
                f"{estimate:.3f} um/px. Using the given value; check it, pixel_scale, array "
                "and spot_pitch_um.", UserWarning, stacklevel=3)
    return {"layout": layout, "array_from": array_from, "pitch_um": pitch_um,
            "diameter_um": diameter_um, "um_per_px": um_per_px, "scale_from": scale_source,
            "row_ratio": round(geo["row_ratio"], 4) if np.isfinite(geo["row_ratio"]) else -1.0}


def _attach_image(lib, image: Path, pix, obs_names, *, section, pixel_scale, pitch_px,
                  hires_max_px, fix) -> None:
    """The plotting copy of ``image`` in ``lib``, its size, and the spots-on-tissue
    checks in ``lib['metadata']``; spots outside the image are an error."""
    meta = lib["metadata"]
    hires, (w, h) = downscaled_rgb(image, hires_max_px, fix=fix)
    lib["images"]["hires"] = hires
    lib["scalefactors"]["tissue_hires_scalef"] = hires.shape[1] / w
    meta["source_image_size"] = [int(w), int(h)]
    outside = ((pix[:, 0] < 0) | (pix[:, 0] >= w) | (pix[:, 1] < 0) | (pix[:, 1] >= h))
    if outside.any():
        ids = list(obs_names[outside][:3])
        raise ValueError(
            f"{section}: {int(outside.sum())} spot centre(s) lie outside the image "
            f"{image} ({w} x {h} px), e.g. {ids}. The spot pixels are probably in another "
            f"frame: check pixel_scale (now {pixel_scale}) and that the image belongs to "
            "this section.")
    meta.update(check_spots_on_image(section, image, pix, hires,
                                      lib["scalefactors"]["tissue_hires_scalef"], (w, h),
                                      pitch_px, pixel_scale))


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
        img_path = unpack_gz(gz)
    adata = from_files(paths[by_kind["counts"].path], paths[by_kind["spots"].path], img_path,
                       section=section, patient=section.split("_")[0], image_sha256=sha,
                       dataset="cscc", hires_max_px=hires_max_px)
    adata.uns["mclstexp"]["manifest_rows"] = [r.path for r in needed]
    return adata
