"""HEST-1k samples: :func:`mclstexp_lite.datasets.hest`.

The real-data tests write a HEST-format sample from the HER2+ C2 files (counts, spot
coordinates and the H&E as a tiled, pyramidal TIFF written with ``tifffile``, as HEST's
pipeline assembles its legacy-ST samples) once per session, load it with ``hest`` and
compare it with ``her2st('C2')``; they skip with a reason when the data is absent. The
bad-input tests use small made-up samples (synthetic image and counts, labelled so).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from mclstexp_lite import datasets as ds
from mclstexp_lite import patches, slides

from .conftest import needs_data

SAMPLE = "HER2ST_C2"  # not a real HEST id: a HEST-format copy of HER2+ C2


# ----------------------------------------------------------------- writing helpers
def _halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 box average (as libvips builds a pyramid level), through PIL's reduce;
    every other pixel for the (small, made-up) 16-bit and grayscale test images."""
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3:
        return rgb[::2, ::2]
    return np.asarray(Image.fromarray(rgb).reduce(2))


def write_pyramid(path: Path, rgb: np.ndarray, um_per_px: float | None, *, subifds=False,
                  bigtiff=False, min_px=1024, tile=256) -> list[tuple[int, int]]:
    """Tiled pyramidal TIFF, levels halving down to ``<= min_px``, lossless (zlib).

    ``subifds=False``: the levels are further IFDs marked as reduced images (the layout
    libvips writes, as HEST's ``tiff_save`` does); ``True``: SubIFDs of the first page.
    Resolution tags in pixels per centimetre when ``um_per_px`` is given.
    """
    import tifffile

    levels = [rgb]
    while max(levels[-1].shape[:2]) > min_px:
        levels.append(_halve(levels[-1]))
    kw = dict(tile=(tile, tile), photometric="rgb" if rgb.ndim == 3 else "minisblack",
              compression="zlib", compressionargs={"level": 1})
    res = ({"resolution": (1e4 / um_per_px, 1e4 / um_per_px), "resolutionunit": "CENTIMETER"}
           if um_per_px else {})
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        if subifds:
            tif.write(levels[0], subifds=len(levels) - 1, **kw, **res)
            for lv in levels[1:]:
                tif.write(lv, subfiletype=1, **kw)
        else:
            for i, lv in enumerate(levels):
                tif.write(lv, subfiletype=0 if i == 0 else 1, **kw, **(res if i == 0 else {}))
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def write_h5ad(path: Path, X, var_names, obs_names, pix, array_row, array_col, *,
               in_tissue=None, thumb=None, thumb_scale=1.0, spot_diameter_px=1.0, **layers):
    """An ``st/<id>.h5ad`` as HEST writes it: counts (float32) in X, spot centres in
    full-resolution pixels in ``obsm['spatial']`` and ``obs['pxl_col_in_fullres',
    'pxl_row_in_fullres']``, ``array_row``/``array_col``, ``in_tissue`` and a
    downscaled image in ``uns['spatial']['ST']``."""
    n = len(obs_names)
    obs = pd.DataFrame({
        "in_tissue": np.ones(n, bool) if in_tissue is None else in_tissue,
        "pxl_col_in_fullres": pix[:, 0], "pxl_row_in_fullres": pix[:, 1],
        "array_row": np.asarray(array_row), "array_col": np.asarray(array_col),
    }, index=pd.Index(obs_names, dtype=str))
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    a.obsm["spatial"] = np.asarray(pix, dtype=float)
    for k, v in layers.items():
        a.layers[k] = v
    if thumb is not None:
        a.uns["spatial"] = {"ST": {
            "images": {"downscaled_fullres": thumb},
            "scalefactors": {"tissue_downscaled_fullres_scalef": thumb_scale,
                             "spot_diameter_fullres": spot_diameter_px}}}
    a.write_h5ad(path)


def layout(root: Path) -> None:
    for d in ("st", "wsis", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------- the C2 sample
@pytest.fixture(scope="session")
def hest_c2_root(tmp_path_factory, her2_c2):
    """HER2+ C2 written in HEST's layout (once per session, ~5 s): counts as float32 in
    X, spots named "{x}x{y}" with HEST's legacy-ST axes (array_row = spot-file x), the
    JPEG as a tiled pyramidal TIFF (zlib, lossless) with resolution tags, and a metadata
    JSON with the HEST keys."""
    lib = her2_c2.uns["spatial"]["C2"]
    um = float(lib["metadata"]["um_per_px"])
    root = tmp_path_factory.mktemp("hest")
    layout(root)
    with slides.open_slide(lib["metadata"]["source_image_path"]) as s:
        rgb = s.read_region(0, 0, s.width, s.height)
    levels = write_pyramid(root / "wsis" / f"{SAMPLE}.tif", rgb, round(um, 6))
    thumb = _halve(_halve(_halve(rgb)))
    del rgb
    pix = her2_c2.obsm["spatial"]
    write_h5ad(root / "st" / f"{SAMPLE}.h5ad", sparse.csr_matrix(her2_c2.X, dtype=np.float32),
               her2_c2.var_names, [n.split("_", 1)[1] for n in her2_c2.obs_names], pix,
               array_row=her2_c2.obs["array_x"].to_numpy(),
               array_col=her2_c2.obs["array_y"].to_numpy(),
               thumb=thumb, thumb_scale=thumb.shape[1] / levels[0][0],
               spot_diameter_px=100 / um)
    meta = {
        "dataset_title": "Spatial deconvolution of HER2-positive breast cancer delineates "
                         "tumor-associated cell type interactions",
        "id": SAMPLE, "organ": "Breast", "disease_state": "Cancer", "species": "Homo sapiens",
        "patient": "C", "st_technology": "Spatial Transcriptomics",
        "inter_spot_dist": 200.0, "spot_diameter": 100.0, "spots_under_tissue": her2_c2.n_obs,
        "preservation_method": "Fresh Frozen", "nb_genes": her2_c2.n_vars,
        "pixel_size_um_embedded": None, "pixel_size_um_estimated": round(um, 4),
        "magnification": "20x", "fullres_px_width": levels[0][0],
        "fullres_px_height": levels[0][1],
    }
    (root / "metadata" / f"{SAMPLE}.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def hest_c2(hest_c2_root):
    """``datasets.hest`` on the C2 sample, recording which pyramid levels were decoded
    whole and which full-resolution regions were read."""
    levels_read, regions = [], []
    orig_level, orig_region = slides._TiffSlide._level_array, slides._TiffSlide._region

    def spy_level(self, level):
        levels_read.append((level, self.levels[level]))
        return orig_level(self, level)

    def spy_region(self, x0, y0, x1, y1):
        regions.append((x0, y0, x1, y1))
        return orig_region(self, x0, y0, x1, y1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slides._TiffSlide, "_level_array", spy_level)
        mp.setattr(slides._TiffSlide, "_region", spy_region)
        a = ds.hest(hest_c2_root, SAMPLE)
    return a, levels_read, regions


@needs_data
def test_hest_c2_same_spots_pixels_counts(hest_c2, her2_c2):
    a, _, _ = hest_c2
    mapped = [n.replace(f"{SAMPLE}_", "C2_", 1) for n in a.obs_names]
    assert mapped == list(her2_c2.obs_names)
    assert list(a.var_names) == list(her2_c2.var_names)
    assert sparse.issparse(a.X) and a.X.dtype == np.int32
    assert (a.X != her2_c2.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], her2_c2.obsm["spatial"])
    for c in ("pixel_x", "pixel_y", "array_x", "array_y"):
        np.testing.assert_array_equal(a.obs[c].to_numpy(), her2_c2.obs[c].to_numpy(), err_msg=c)
    assert a.uns["mclstexp"]["array_from"].startswith("array_row (x)")  # HEST's legacy-ST axes
    assert set(a.obs["section"]) == {SAMPLE}
    assert set(a.obs["patient"]) == {"C (Spatial deconvolution of HER2-positive breast cancer "
                                     "delineates tumor-associated cell type interactions)"}
    m = a.uns["mclstexp"]
    assert m["dataset"] == "hest" and m["counts_from"] == "X"
    assert m["spots_dropped"] == {"not_in_tissue": 0, "zero_counts": 0}
    assert m["hest"]["organ"] == "Breast" and "pixel_size_um_embedded" not in m["hest"]
    assert set(m["files"]) == {"st", "wsi", "metadata"}


@needs_data
def test_hest_c2_scale_and_layout(hest_c2, her2_c2):
    a, _, _ = hest_c2
    meta = a.uns["spatial"][SAMPLE]["metadata"]
    ref = her2_c2.uns["spatial"]["C2"]["metadata"]
    assert meta["um_per_px"] == pytest.approx(ref["um_per_px"], rel=0.005)
    assert meta["scale_from"].endswith("pixel_size_um_estimated")
    assert meta["um_per_px_tiff"] == pytest.approx(ref["um_per_px"], rel=1e-5)
    assert meta["spot_pitch_um"] == 200.0 and meta["spot_diameter_um"] == 100.0
    assert meta["grid"] == "square" and meta["technology"] == "Spatial Transcriptomics"
    assert meta["spot_spacing_um"] == pytest.approx(200, rel=0.05)
    assert meta["source_image_size"] == ref["source_image_size"] == [9274, 9911]
    assert meta["spots_on_tissue"] == pytest.approx(ref["spots_on_tissue"], abs=0.02)
    sf = a.uns["spatial"][SAMPLE]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100 / meta["um_per_px"])


@needs_data
def test_hest_c2_thumbnail_from_a_pyramid_level(hest_c2, her2_c2):
    a, levels_read, regions = hest_c2
    # only a reduced level was decoded whole (for a 2000 px copy of 9274 x 9911 px: level
    # 2, about 2319 x 2478 px), and no full-resolution region was read while loading
    assert [lv for lv, _ in levels_read] == [2]
    assert min(levels_read[0][1]) >= 1871 and max(levels_read[0][1]) < 2600
    assert regions == []
    hires = a.uns["spatial"][SAMPLE]["images"]["hires"]
    ref = her2_c2.uns["spatial"]["C2"]["images"]["hires"]
    assert hires.shape == ref.shape and hires.dtype == np.uint8
    assert a.uns["spatial"][SAMPLE]["scalefactors"]["tissue_hires_scalef"] == pytest.approx(
        her2_c2.uns["spatial"]["C2"]["scalefactors"]["tissue_hires_scalef"], rel=1e-3)
    # same picture: the JPEG decoded at 1/4 vs a box-filtered pyramid level, both resized
    diff = np.abs(hires.astype(int) - ref.astype(int)).mean()
    assert diff < 8, diff  # 3.1 measured; another section's image differs by far more


@needs_data
def test_hest_c2_patches_equal_her2st_bit_for_bit(hest_c2, her2_c2, tmp_path):
    a, _, _ = hest_c2
    um_h = a.uns["spatial"][SAMPLE]["metadata"]["um_per_px"]
    um_r = her2_c2.uns["spatial"]["C2"]["metadata"]["um_per_px"]
    assert patches.crop_size_px(um_h) == patches.crop_size_px(um_r)
    ph = patches.patch_cache(a, cache_dir=tmp_path, progress=False)
    pr = patches.patch_cache(her2_c2, cache_dir=tmp_path, progress=False)
    assert ph.shape == pr.shape == (her2_c2.n_obs, 224, 224, 3)
    np.testing.assert_array_equal(np.asarray(ph), np.asarray(pr))


# ------------------------------------------------------- made-up samples, bad input
def _synthetic(root: Path, sid="SYN1", *, um=1.0, tiff_um=1.0, meta=None, X=None,
               pix_shift=(0.0, 0.0), image=None, **h5_kw) -> dict:
    """A small made-up HEST sample: 800 x 600 px, pink tissue under a Visium-like hex
    grid of 20 spots 100 um apart (made-up counts)."""
    layout(root)
    rows, cols = np.mgrid[0:4, 0:5]
    rows, cols = rows.ravel(), cols.ravel()
    pitch_px = 100.0 / um
    pix = np.stack([200 + cols * pitch_px + (rows % 2) * pitch_px / 2,
                    150 + rows * pitch_px * np.sqrt(3) / 2], axis=1) + np.asarray(pix_shift)
    if image is None:
        image = np.full((600, 800, 3), 255, np.uint8)
        image[100:500, 130:720] = (200, 120, 170)
    write_pyramid(root / "wsis" / f"{sid}.tif", image, tiff_um, subifds=True, bigtiff=True,
                  min_px=200, tile=64)
    rng = np.random.default_rng(0)
    if X is None:
        X = sparse.csr_matrix(rng.poisson(3, (20, 6)).astype(np.float32))
    write_h5ad(root / "st" / f"{sid}.h5ad", X, [f"G{i}" for i in range(6)],
               [f"BC{i:02d}-1" for i in range(20)], pix, array_row=rows,
               array_col=2 * cols + rows % 2, **h5_kw)
    m = {"id": sid, "st_technology": "Visium", "inter_spot_dist": 100.0, "spot_diameter": 55.0,
         "pixel_size_um_estimated": um, "pixel_size_um_embedded": um, "patient": None,
         "dataset_title": "made-up", "fullres_px_width": 800, "fullres_px_height": 600}
    m.update(meta or {})
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(m))
    return {"pix": pix, "X": X}


def test_synthetic_visium_sample_loads(tmp_path):
    """Made-up data: the hex layout, Visium axes, BigTIFF with SubIFDs, barcode names."""
    made = _synthetic(tmp_path)
    a = ds.hest(tmp_path, "SYN1")
    assert a.n_obs == 20 and a.obs_names[0] == "SYN1_BC00-1"
    assert a.uns["mclstexp"]["array_from"] == "array_col (x), array_row (y)"
    np.testing.assert_array_equal(a.obsm["spatial"], made["pix"])
    meta = a.uns["spatial"]["SYN1"]["metadata"]
    assert meta["grid"] == "hex" and meta["spot_pitch_um"] == 100.0
    assert meta["spot_spacing_um"] == pytest.approx(100, rel=0.01)
    assert set(a.obs["patient"]) == {"made-up"}  # no patient: the dataset is one patient
    assert (a.X != sparse.csr_matrix(made["X"], dtype=np.int32)).nnz == 0
    a.write_h5ad(tmp_path / "out.h5ad")  # every uns entry is writable
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    assert back.uns["spatial"]["SYN1"]["metadata"]["um_per_px"] == 1.0


@pytest.mark.parametrize("gone", ["st", "wsis", "metadata"])
def test_missing_file_names_layout_and_download(tmp_path, gone):
    """Made-up data: each missing file is named, with the layout and how to download."""
    _synthetic(tmp_path)
    ext = {"st": "h5ad", "wsis": "tif", "metadata": "json"}[gone]
    (tmp_path / gone / f"SYN1.{ext}").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ds.hest(tmp_path, "SYN1")
    msg = str(err.value)
    assert f"{gone}/SYN1.{ext}" in msg
    assert "st/<id>.h5ad, wsis/<id>.tif and metadata/<id>.json" in msg
    assert "MahmoodLab/hest" in msg and "snapshot_download" in msg and "*SYN1[_.]**" in msg


def test_wrong_root_and_bad_sample_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="A HEST root holds"):
        ds.hest(tmp_path / "nowhere", "TENX95")
    with pytest.raises(ValueError, match="sample_id must be a HEST id"):
        ds.hest(tmp_path, "st/TENX95")


def test_no_pixel_size_anywhere(tmp_path):
    """Made-up data: no pixel size in the JSON nor in the TIFF."""
    _synthetic(tmp_path, tiff_um=None,
               meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": float("nan")})
    with pytest.raises(ValueError, match="no pixel size") as err:
        ds.hest(tmp_path, "SYN1")
    assert "SYN1.json" in str(err.value) and "um_per_px=" in str(err.value)
    a = ds.hest(tmp_path, "SYN1", um_per_px=1.0)
    assert a.uns["spatial"]["SYN1"]["metadata"]["scale_from"] == "given (um_per_px=)"
    assert a.uns["spatial"]["SYN1"]["metadata"]["um_per_px_tiff"] == -1.0


def test_pixel_size_order_and_tiff_disagreement(tmp_path):
    """Made-up data: estimated wins over embedded, embedded over the TIFF; a TIFF tag
    10 % off warns."""
    _synthetic(tmp_path, tiff_um=1.1, meta={"pixel_size_um_embedded": 1.02})
    with pytest.warns(UserWarning, match="states 1.1 um/px in its resolution tags"):
        a = ds.hest(tmp_path, "SYN1")
    assert a.uns["spatial"]["SYN1"]["metadata"]["um_per_px"] == 1.0
    _synthetic(tmp_path, tiff_um=1.0, meta={"pixel_size_um_estimated": None,
                                            "pixel_size_um_embedded": 1.02})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = ds.hest(tmp_path, "SYN1")
    meta = a.uns["spatial"]["SYN1"]["metadata"]
    assert meta["um_per_px"] == 1.02 and meta["scale_from"].endswith("pixel_size_um_embedded")
    _synthetic(tmp_path, tiff_um=1.0, meta={"pixel_size_um_estimated": None,
                                            "pixel_size_um_embedded": None})
    meta = ds.hest(tmp_path, "SYN1").uns["spatial"]["SYN1"]["metadata"]
    assert meta["scale_from"] == "TIFF resolution tags" and meta["um_per_px"] == pytest.approx(1.0)


def test_wrong_scale_warns_from_the_spot_spacing(tmp_path):
    """Made-up data: metadata says 0.5 um/px but the spots 100 um apart are 100 px apart."""
    _synthetic(tmp_path, tiff_um=None, meta={"pixel_size_um_estimated": 0.5})
    with pytest.warns(UserWarning, match="neighbouring spots are 100.0 px apart, i.e. 50.0 um"):
        ds.hest(tmp_path, "SYN1")


def test_spots_outside_the_image(tmp_path):
    """Made-up data: spot centres shifted past the right edge."""
    _synthetic(tmp_path, pix_shift=(300.0, 0.0))
    with pytest.raises(ValueError, match="lie outside") as err:
        ds.hest(tmp_path, "SYN1")
    assert "SYN1.tif (800 x 600 px)" in str(err.value) and "BC04-1" in str(err.value)


def test_16bit_and_grayscale_wsi(tmp_path):
    """Made-up data: a 16-bit RGB and a grayscale WSI are refused, naming the file."""
    img16 = np.full((600, 800, 3), 60000, np.uint16)
    _synthetic(tmp_path, image=img16)
    with pytest.raises(ValueError, match="16-bit") as err:
        ds.hest(tmp_path, "SYN1")
    assert "SYN1.tif" in str(err.value)
    _synthetic(tmp_path, image=np.full((600, 800), 200, np.uint8))
    with pytest.raises(ValueError, match="grayscale"):
        ds.hest(tmp_path, "SYN1")


def test_non_integer_counts(tmp_path):
    """Made-up data: log-normalised X is refused; raw counts in layers['counts'] are used."""
    raw = sparse.csr_matrix(np.random.default_rng(1).poisson(3, (20, 6)).astype(np.float32))
    logged = raw.copy()
    logged.data = np.log1p(logged.data)
    _synthetic(tmp_path, X=logged)
    with pytest.raises(ValueError, match="no raw counts.*non-integer values"):
        ds.hest(tmp_path, "SYN1")
    _synthetic(tmp_path, X=logged, counts=raw)
    a = ds.hest(tmp_path, "SYN1")
    assert a.uns["mclstexp"]["counts_from"] == "layers['counts']"
    assert a.X.dtype == np.int32 and (a.X != sparse.csr_matrix(raw, dtype=np.int32)).nnz == 0


def test_in_tissue_and_zero_count_spots_dropped(tmp_path):
    """Made-up data: two spots outside the tissue, one without counts."""
    X = np.random.default_rng(2).poisson(3, (20, 6)).astype(np.float32)
    X[5] = 0
    in_t = np.ones(20, int)
    in_t[[0, 1]] = 0
    _synthetic(tmp_path, X=sparse.csr_matrix(X), in_tissue=in_t)
    with pytest.warns(UserWarning, match="kept 17 of 20 spots .2 not in tissue, 1 without"):
        a = ds.hest(tmp_path, "SYN1")  # 3 of 20 is more than a tenth: a warning
    assert a.n_obs == 17
    assert a.uns["mclstexp"]["spots_dropped"] == {"not_in_tissue": 2, "zero_counts": 1}
    assert ds.hest(tmp_path, "SYN1", in_tissue_only=False,
                   drop_zero_count_spots=False).n_obs == 20
