"""HEST-1k samples: :func:`mclstexp_lite.datasets.hest`.

Files are written the way HEST writes them (read from github.com/mahmoodlab/HEST at
afd42c3, and checked against libvips itself):

- the WSI as ``hest.utils.tiff_save`` writes it with libvips: tiles of 256 px, LZW with
  the horizontal predictor, pyramid levels as further reduced-resolution IFDs of the main
  chain (not SubIFDs), and resolution tags in pixels per cm that state a pixel size ten
  times too fine (``xres=1 / (pixel_size * 1e-4)``, which libvips takes as pixels per
  mm; HEST issue 106). ``pyvips.Image.new_from_array(img).tiffsave(...)`` with those
  arguments (pyvips 3.2.0, libvips 8.18.7) gave exactly this: 4 pages, LZW,
  PREDICTOR.HORIZONTAL, REDUCEDIMAGE levels, 200000 px/cm for 0.5 um/px. Here
  ``tifffile`` writes the same structure (imagecodecs' LZW).
- the metadata JSON with ``json.dump`` of a dict that has NaN for blanks (the token
  ``NaN``), ``magnification`` as "20x", ``pixel_size_um_embedded`` a dpi default;
- the h5ad with float32 counts in X, ``obsm['spatial']``, ``in_tissue`` True everywhere,
  legacy-ST spot names zero-padded ("012x007", ``STReader.read``), ``array_row`` = the
  spot file's x; Visium HD and Xenium pseudo-spots as ``pool_bins_visiumhd`` /
  ``pool_transcripts_xenium`` lay them out.

The real-data tests write HER2+ C2 that way once per session, load it with ``hest`` and
compare it with ``her2st('C2')``; they skip with a reason when the data is absent. The
other tests use small made-up samples (synthetic image and counts, labelled so).
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
from mclstexp_lite import patches, _slides as slides

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
                  bigtiff=False, min_px=1024, tile=256, hest=False) -> list[tuple[int, int]]:
    """Tiled pyramidal TIFF, levels halving down to ``<= min_px``, lossless.

    ``hest=True``: as HEST's ``tiff_save`` (libvips) writes it: LZW with the horizontal
    predictor, levels in the main IFD chain marked as reduced images, resolution tags
    stating ``um_per_px / 10`` (its unit slip; see the module docstring). Otherwise zlib
    and tags stating ``um_per_px``; ``subifds=True`` puts the levels in SubIFDs of the
    first page.
    """
    import tifffile

    levels = [rgb]
    while max(levels[-1].shape[:2]) > min_px:
        levels.append(_halve(levels[-1]))
    kw = dict(tile=(tile, tile), photometric="rgb" if rgb.ndim == 3 else "minisblack",
              compression="zlib", compressionargs={"level": 1})
    if hest:
        kw.update(compression="lzw", predictor=True, compressionargs={})
        subifds = False
    stated = um_per_px / 10 if (hest and um_per_px) else um_per_px
    res = ({"resolution": (1e4 / stated, 1e4 / stated), "resolutionunit": "CENTIMETER"}
           if stated else {})
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
               in_tissue=None, thumb=None, thumb_scale=1.0, spot_diameter_px=1.0,
               var_columns=None, **layers):
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
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(var_columns or {},
                                                  index=pd.Index(var_names, dtype=str)))
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


def write_metadata(path: Path, meta: dict) -> None:
    """The metadata JSON as ``json.dump`` writes a dict with NaN for blanks (HEST's
    per-sample JSON): the token ``NaN``, which strict JSON does not have."""
    path.write_text(json.dumps({k: (float("nan") if v is None else v) for k, v in meta.items()}))


# --------------------------------------------------------------- the C2 sample
@pytest.fixture(scope="session")
def hest_c2_root(tmp_path_factory, her2_c2):
    """HER2+ C2 written as HEST writes it (once per session, ~5 s): counts as float32 in
    X, spots named "{x:03d}x{y:03d}" with HEST's legacy-ST axes (array_row = spot-file
    x), the JPEG as HEST's pyramidal TIFF (LZW, predictor, 256 px tiles, main-chain
    levels, tags ten times too fine), and a metadata JSON with the HEST keys, NaN
    tokens and magnification "20x"."""
    lib = her2_c2.uns["spatial"]["C2"]
    um = float(lib["metadata"]["um_per_px"])
    root = tmp_path_factory.mktemp("hest")
    layout(root)
    with slides.open_slide(lib["metadata"]["source_image_path"]) as s:
        rgb = s.read_region(0, 0, s.width, s.height)
    levels = write_pyramid(root / "wsis" / f"{SAMPLE}.tif", rgb, round(um, 6), hest=True)
    thumb = _halve(_halve(_halve(rgb)))
    del rgb
    pix = her2_c2.obsm["spatial"]
    write_h5ad(root / "st" / f"{SAMPLE}.h5ad", sparse.csr_matrix(her2_c2.X, dtype=np.float32),
               her2_c2.var_names,
               ["{:03d}x{:03d}".format(*map(int, n.split("_", 1)[1].split("x")))
                for n in her2_c2.obs_names], pix,
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
        "fullres_px_height": levels[0][1], "treatment_comment": None, "oncotree_code": None,
    }
    write_metadata(root / "metadata" / f"{SAMPLE}.json", meta)
    assert "NaN" in (root / "metadata" / f"{SAMPLE}.json").read_text()
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

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mp.setattr(slides._TiffSlide, "_level_array", spy_level)
        mp.setattr(slides._TiffSlide, "_region", spy_region)
        a = ds.hest(hest_c2_root, SAMPLE)
    # written as HEST writes it, the sample loads without a word of warning
    assert not [w for w in said if issubclass(w.category, UserWarning)], [
        str(w.message) for w in said]
    return a, levels_read, regions


@needs_data
def test_the_c2_wsi_is_written_as_hest_writes_it(hest_c2_root):
    import tifffile

    with tifffile.TiffFile(hest_c2_root / "wsis" / f"{SAMPLE}.tif") as tf:
        pages = list(tf.pages)
        assert len(pages) >= 3 and tf.pages[0].subifds is None  # levels in the main chain
        for i, p in enumerate(pages):
            assert p.compression.name == "LZW" and p.predictor == 2  # horizontal
            assert p.tilewidth == p.tilelength == 256
            assert int(p.subfiletype) == (0 if i == 0 else 1)


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
    assert m["spots_dropped"] == {"outside_image": 0, "not_in_tissue": 0, "zero_counts": 0}
    assert m["hest"]["organ"] == "Breast" and "pixel_size_um_embedded" not in m["hest"]
    assert set(m["files"]) == {"st", "wsi", "metadata"}


@needs_data
def test_hest_c2_scale_and_layout(hest_c2, her2_c2):
    a, _, _ = hest_c2
    meta = a.uns["spatial"][SAMPLE]["metadata"]
    ref = her2_c2.uns["spatial"]["C2"]["metadata"]
    assert meta["um_per_px"] == pytest.approx(ref["um_per_px"], rel=0.005)
    assert meta["scale_from"].endswith("pixel_size_um_estimated")
    # HEST's tags state a tenth of the pixel size: recognised, no warning, noted
    assert meta["um_per_px_tiff"] == pytest.approx(ref["um_per_px"] / 10, rel=1e-5)
    assert "ten times too fine" in meta["pixel_size_note"]
    assert meta["magnification"] == 20.0
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
               pix_shift=(0.0, 0.0), image=None, hest_tiff=False, **h5_kw) -> dict:
    """A small made-up HEST sample: 800 x 600 px, pink tissue under a Visium-like hex
    grid of 20 spots 100 um apart (made-up counts). ``hest_tiff``: the WSI as HEST
    writes it (LZW, main chain, tags stating ``tiff_um / 10``); else zlib, SubIFDs,
    BigTIFF, tags stating ``tiff_um``."""
    layout(root)
    rows, cols = np.mgrid[0:4, 0:5]
    rows, cols = rows.ravel(), cols.ravel()
    pitch_px = 100.0 / um
    pix = np.stack([200 + cols * pitch_px + (rows % 2) * pitch_px / 2,
                    150 + rows * pitch_px * np.sqrt(3) / 2], axis=1) + np.asarray(pix_shift)
    if image is None:
        image = np.full((600, 800, 3), 255, np.uint8)
        image[100:500, 130:720] = (200, 120, 170)
    write_pyramid(root / "wsis" / f"{sid}.tif", image, tiff_um, subifds=not hest_tiff,
                  bigtiff=not hest_tiff, min_px=200, tile=64 if not hest_tiff else 256,
                  hest=hest_tiff)
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
    write_metadata(root / "metadata" / f"{sid}.json", m)
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


def test_spots_outside_the_image_are_dropped_with_a_warning(tmp_path):
    """Made-up data: spot centres shifted 300 px right, so the 5 of each row's ... the
    right-most spots lie past the edge (as TENX92's reach -139 px, HEST issue 40):
    dropped, counted, warned about with "outside"; most of them outside is an error."""
    made = _synthetic(tmp_path, pix_shift=(300.0, 0.0))
    out = (made["pix"][:, 0] >= 800)
    assert 0 < out.sum() < 10
    with pytest.warns(UserWarning, match=r"lie outside SYN1\.tif \(800 x 600 px\).*dropped") as got:
        a = ds.hest(tmp_path, "SYN1")
    assert "BC04-1" in str(got[0].message)
    assert a.n_obs == 20 - out.sum()
    assert a.uns["mclstexp"]["spots_dropped"]["outside_image"] == out.sum()
    assert (a.obsm["spatial"][:, 0] < 800).all()
    _synthetic(tmp_path, pix_shift=(650.0, 0.0))
    with pytest.raises(ValueError, match=r"of the 20 spot centres .* lie outside .*same sample"):
        ds.hest(tmp_path, "SYN1")


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


def test_in_tissue_kept_by_default_zero_count_spots_dropped(tmp_path):
    """Made-up data: two spots flagged outside the tissue, one without counts. HEST keeps
    in_tissue == 0 spots ("might not be accurate"), so does the loader unless asked."""
    X = np.random.default_rng(2).poisson(3, (20, 6)).astype(np.float32)
    X[5] = 0
    in_t = np.ones(20, int)
    in_t[[0, 1]] = 0
    _synthetic(tmp_path, X=sparse.csr_matrix(X), in_tissue=in_t)
    a = ds.hest(tmp_path, "SYN1")  # 1 of 20 dropped: logged, not warned
    assert a.n_obs == 19 and a.uns["mclstexp"]["spots_not_in_tissue"] == 2
    assert a.uns["mclstexp"]["spots_dropped"] == {"outside_image": 0, "not_in_tissue": 0,
                                                  "zero_counts": 1}
    with pytest.warns(UserWarning, match="kept 17 of 20 spots .2 not in tissue, 1 without"):
        b = ds.hest(tmp_path, "SYN1", in_tissue_only=True)  # 3 of 20: a warning
    assert b.n_obs == 17
    assert ds.hest(tmp_path, "SYN1", drop_zero_count_spots=False).n_obs == 20


def _pooled(root: Path, tech: str, *, sid="POOL1", um=0.5, bin_um=128.0, meta=None):
    """A made-up HEST pseudo-spot sample as HEST pools Visium HD (``pool_bins_visiumhd``:
    128 um square bins, empty bins removed, then array_row/array_col numbered 0, 1, 2...
    over the remaining bins, names "0000x0003") or Xenium (``pool_transcripts_xenium``:
    100 um squares, grid positions kept): 1600 x 1200 px at ``um`` um/px, the WSI as
    HEST writes it, metadata blanks as NaN (Xenium) or 2 / 2 (Visium HD)."""
    layout(root)
    step = bin_um / um
    n_cols, n_rows = 5, 4
    cells = [(r, c) for r in range(n_rows) for c in range(n_cols) if (r, c) not in ((0, 0), (2, 3))]
    pix = np.array([[100 + c * step + step // 2, 100 + r * step + step // 2] for r, c in cells])
    if tech == "Visium HD":  # running numbers over the bins that were kept
        idx = np.arange(len(cells))
        arr_col, arr_row = idx % n_cols, idx // n_cols
        names = [f"{r:04d}x{c:04d}" for r, c in zip(arr_row, arr_col)]
    else:
        arr_row = np.array([r for r, _ in cells])
        arr_col = np.array([c for _, c in cells])
        names = [f"{r:03d}x{c:03d}" for r, c in zip(arr_row, arr_col)]
    image = np.full((1200, 1600, 3), 250, np.uint8)
    image[50:1150, 50:1500] = (200, 120, 170)
    write_pyramid(root / "wsis" / f"{sid}.tif", image, um, min_px=400, hest=True)
    X = sparse.csr_matrix(np.random.default_rng(3).poisson(5, (len(cells), 4)).astype(np.float32))
    write_h5ad(root / "st" / f"{sid}.h5ad", X, [f"G{i}" for i in range(4)], names, pix,
               array_row=arr_row, array_col=arr_col)
    m = {"id": sid, "st_technology": tech, "pixel_size_um_estimated": um,
         "pixel_size_um_embedded": um, "dataset_title": "made-up pooled", "patient": None,
         "magnification": "20x",
         "inter_spot_dist": 2.0 if tech == "Visium HD" else None,
         "spot_diameter": 2.0 if tech == "Visium HD" else None}
    m.update(meta or {})
    write_metadata(root / "metadata" / f"{sid}.json", m)
    return {"pix": pix, "cells": cells}


@pytest.mark.parametrize("tech, bin_um", [("Visium HD", 128.0), ("Xenium", 100.0)])
def test_pooled_pseudo_spots_of_visium_hd_and_xenium(tmp_path, recwarn, tech, bin_um):
    """Made-up data pooled as HEST pools it: HD bins are 128 um although the metadata
    says 2 / 2, Xenium squares 100 um with the spot fields blank (NaN); HD's
    array_row/array_col are running numbers, so grid positions come from the pixels."""
    made = _pooled(tmp_path, tech, bin_um=bin_um)
    a = ds.hest(tmp_path, "POOL1")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    md = a.uns["spatial"]["POOL1"]["metadata"]
    assert md["spot_pitch_um"] == bin_um and md["spot_diameter_um"] == bin_um
    assert md["grid"] == "square" and md["spot_spacing_um"] == pytest.approx(bin_um, rel=1e-3)
    assert md["spot_pitch_from"] == f"st_technology {tech!r}"
    rows = np.array([r for r, _ in made["cells"]])
    cols = np.array([c for _, c in made["cells"]])
    np.testing.assert_array_equal(a.obs["array_x"], cols)  # true grid positions
    np.testing.assert_array_equal(a.obs["array_y"], rows - rows.min())
    assert "not grid positions" in a.uns["mclstexp"]["array_from"]
    assert a.uns["spatial"]["POOL1"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
        bin_um / 0.5)


def test_tiff_tags_ten_times_too_fine(tmp_path, recwarn):
    """Made-up samples with HEST's WSI tags (a tenth of the pixel size): with an estimate
    in the metadata no warning (recognised and noted); as the only pixel size they are
    recognised from the spot spacing and multiplied by ten, with a warning."""
    _synthetic(tmp_path, tiff_um=1.0, hest_tiff=True)
    a = ds.hest(tmp_path, "SYN1")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    md = a.uns["spatial"]["SYN1"]["metadata"]
    assert md["um_per_px"] == 1.0 and md["um_per_px_tiff"] == pytest.approx(0.1)
    assert "ten times too fine" in md["pixel_size_note"]
    _synthetic(tmp_path, tiff_um=1.0, hest_tiff=True,
               meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": None})
    with pytest.warns(UserWarning, match=r"only pixel size is SYN1\.tif's resolution tags, "
                                         r"0\.1 um/px.*10\.0 um apart instead of 100.*ten "
                                         r"times too fine.*Using 1 um/px"):
        b = ds.hest(tmp_path, "SYN1")
    md = b.uns["spatial"]["SYN1"]["metadata"]
    assert md["um_per_px"] == pytest.approx(1.0) and md["scale_from"].startswith(
        "TIFF resolution tags x 10")
    # correct tags as the only source: used as they are
    _synthetic(tmp_path, tiff_um=1.0,
               meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": None})
    c = ds.hest(tmp_path, "SYN1")
    assert c.uns["spatial"]["SYN1"]["metadata"]["scale_from"] == "TIFF resolution tags"


@pytest.mark.parametrize("dpi_value", [25.4 / 72, 25.4 / 96, 1.0, 25_400 / 800])
def test_dpi_default_embedded_pixel_sizes_are_ignored(tmp_path, dpi_value):
    """Made-up data: pixel_size_um_embedded holding an image writer's default (HEST's
    metadata has 0.3528, 0.2646, 1.0, 31.75, ...) and no estimate: not used as the scale."""
    _synthetic(tmp_path, tiff_um=None,
               meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": dpi_value})
    with pytest.raises(ValueError, match=r"no pixel size.*ignored: a resolution default"):
        ds.hest(tmp_path, "SYN1")
    _synthetic(tmp_path, tiff_um=1.0,
               meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": dpi_value})
    a = ds.hest(tmp_path, "SYN1")
    md = a.uns["spatial"]["SYN1"]["metadata"]
    assert md["scale_from"] == "TIFF resolution tags" and "resolution default" in md[
        "pixel_size_note"]


def test_nan_tokens_magnification_text_and_var_columns(tmp_path):
    """Made-up data: blanks written as NaN tokens (patient, st_technology's layout
    fields), magnification "40x", and var columns (gene_ids) that a symbol panel
    matches through."""
    from mclstexp_lite import pp

    ids = [f"ENSG{i:011d}" for i in range(6)]
    symbols = ["ERBB2", "GNAS", "FASN", "CD74", "ACTB", "KRT5"]
    made = _synthetic(tmp_path, meta={"patient": None, "dataset_title": "made-up", "tissue": None,
                                      "magnification": "40x", "inter_spot_dist": None,
                                      "spot_diameter": None},
                      var_columns={"gene_ids": ids, "feature_types": ["Gene Expression"] * 6})
    text = (tmp_path / "metadata" / "SYN1.json").read_text()
    assert "NaN" in text
    a = ds.hest(tmp_path, "SYN1")
    assert set(a.obs["patient"]) == {"made-up"}  # not "nan (made-up)"
    md = a.uns["spatial"]["SYN1"]["metadata"]
    assert md["magnification"] == 40.0 and md["spot_pitch_um"] == 100.0  # by technology
    assert "tissue" not in a.uns["mclstexp"]["hest"] and a.uns["mclstexp"]["hest"]["magnification"] == "40x"
    assert list(a.var["gene_ids"]) == ids
    # a panel of Ensembl ids finds the genes through var['gene_ids'] (names are G0..G5)
    out = pp.subset_genes(a, [ids[2], ids[0]])
    np.testing.assert_array_equal(out.X.toarray(), a.X.toarray()[:, [2, 0]])
    assert made["X"].shape == (20, 6)
    del symbols


def test_lzw_without_imagecodecs_is_a_clear_error(tmp_path, monkeypatch):
    """Made-up sample with HEST's LZW WSI; imagecodecs made unimportable."""
    import sys

    _synthetic(tmp_path, hest_tiff=True)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    with pytest.raises(ValueError, match=r"SYN1\.tif is compressed with LZW.*'imagecodecs' "
                                         r"package.*pip install imagecodecs"):
        ds.hest(tmp_path, "SYN1")
