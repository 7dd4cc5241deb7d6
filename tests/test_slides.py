"""Reading slides region by region, tissue detection, virtual spots, image-only sections.

Most tests use SYNTHETIC slides: a white "glass" image with a pink disc of "tissue"
(dotted with purple "nuclei"), written as PNG, JPEG and tiled pyramidal TIFF. One test
lays virtual spots over the real HER2+ C3 image and checks them against C3's real spots.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from mclstexp_lite import datasets as ds
from mclstexp_lite import patches as pt
from mclstexp_lite import _slides as slides

from .conftest import needs_data

UM = 2.0  # um per pixel of the synthetic slides
SIZE = (1500, 1200)  # width, height in px: 3.0 x 2.4 mm
CENTRE, RADIUS = (700, 600), 450  # the tissue disc, px (0.9 mm radius)


def synthetic_slide(size=SIZE, seed=0) -> np.ndarray:
    """SYNTHETIC H&E-like image: white glass, a pink tissue disc with purple dots."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 <= RADIUS ** 2
    img[disc] = (225, 140, 190)
    dots = disc & (rng.random((h, w)) < 0.05)
    img[dots] = (110, 60, 150)
    noise = rng.integers(-6, 7, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def write_pyramid(path, img, *, um_per_px=None, unit="CENTIMETER", compression="zlib",
                  description=None):
    """A tiled pyramidal TIFF (levels halving down to <= 256 px), as scanners write them."""
    levels = [img]
    while max(levels[-1].shape[:2]) > 256:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    kw = dict(tile=(128, 128), compression=compression, photometric="rgb")
    res = {}
    if um_per_px is not None:
        per = {"CENTIMETER": 1e4, "INCH": 25_400.0}[unit]
        res = dict(resolution=(per / um_per_px, per / um_per_px), resolutionunit=unit)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, description=description, **res, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    return path


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic_slides")
    img = synthetic_slide()
    Image.fromarray(img).save(d / "slide.png")
    Image.fromarray(img).save(d / "slide.jpg", quality=95)
    write_pyramid(d / "slide.tif", img, um_per_px=UM)
    write_pyramid(d / "nosize.tif", img)
    return {"img": img, "png": d / "slide.png", "jpg": d / "slide.jpg",
            "tif": d / "slide.tif", "nosize": d / "nosize.tif", "dir": d}


# ------------------------------------------------------------------------ reading
@pytest.mark.parametrize("kind", ["png", "tif"])
def test_read_region_matches_the_pixels_and_pads_white(slide_files, kind):
    img = slide_files["img"]
    with slides.open_slide(slide_files[kind]) as s:
        assert (s.width, s.height) == SIZE
        assert np.array_equal(s.read_region(300, 200, 70, 50), img[200:250, 300:370])
        edge = s.read_region(-10, SIZE[1] - 20, 30, 40)
        assert np.array_equal(edge[:20, 10:], img[-20:, :20])
        assert (edge[:, :10] == 255).all() and (edge[20:] == 255).all()


def test_tiff_thumbnail_reads_a_pyramid_level_not_the_full_image(slide_files, monkeypatch):
    used = []
    original = slides._TiffSlide._level_array

    def spy(self, level):
        used.append(level)
        return original(self, level)

    monkeypatch.setattr(slides._TiffSlide, "_level_array", spy)
    with slides.open_slide(slide_files["tif"]) as s:
        assert len(s.levels) >= 3
        thumb, scale = s.thumbnail(300)
    assert used and used[0] >= 2, f"decoded level {used}, expected a reduced one"
    assert max(thumb.shape[:2]) == 300 and scale == pytest.approx(300 / SIZE[0])


def test_patches_from_a_tiff_equal_those_from_the_same_pixels_in_png(slide_files):
    centres = np.array([[700.0, 600.0], [20.0, 30.0], [1490.0, 1190.0], [350.4, 820.6]])
    a = pt.extract_patches(slide_files["png"], centres, crop_px=77, out_size=32)
    b = pt.extract_patches(slide_files["tif"], centres, crop_px=77, out_size=32)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("unit, um", [("CENTIMETER", 0.5), ("INCH", 0.2527)])
def test_pixel_size_from_tiff_tags(tmp_path, unit, um):
    path = write_pyramid(tmp_path / "s.tif", synthetic_slide((300, 200)), um_per_px=um, unit=unit)
    with slides.open_slide(path) as s:
        assert s.um_per_px_embedded == pytest.approx(um, rel=1e-6)


def test_pixel_size_from_an_aperio_description_and_none_without_tags(slide_files, tmp_path):
    path = write_pyramid(tmp_path / "a.tif", synthetic_slide((300, 200)),
                         description="Aperio Image Library v12|AppMag = 40|MPP = 0.2501")
    with slides.open_slide(path) as s:
        assert s.um_per_px_embedded == pytest.approx(0.2501)
    with slides.open_slide(slide_files["nosize"]) as s:
        assert s.um_per_px_embedded is None
    with slides.open_slide(slide_files["jpg"]) as s:  # a JPEG's dpi is not a scan scale
        assert s.um_per_px_embedded is None


# ----------------------------------------------------------------- bad images
def test_grayscale_16bit_and_transparent_images_are_refused(tmp_path):
    rgb = synthetic_slide((200, 150))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray\.png.*grayscale.*RGB"):
        slides.open_slide(tmp_path / "gray.png")
    tifffile.imwrite(tmp_path / "deep.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    with pytest.raises(ValueError, match=r"deep\.tif.*16-bit.*8-bit"):
        slides.open_slide(tmp_path / "deep.tif")
    tifffile.imwrite(tmp_path / "gray.tif", rgb[..., 0])
    with pytest.raises(ValueError, match=r"gray\.tif.*grayscale"):
        slides.open_slide(tmp_path / "gray.tif")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    with slides.open_slide(tmp_path / "opaque.png") as s:  # opaque alpha: dropped
        assert np.array_equal(s.read_region(0, 0, 200, 150), rgb)
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.raises(ValueError, match=r"holes\.png.*100 transparent.*white"):
        slides.open_slide(tmp_path / "holes.png").read_region(0, 0, 5, 5)


def test_too_large_plain_images_are_refused_before_decoding(slide_files, monkeypatch):
    monkeypatch.setattr(slides, "MAX_DECODE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"slide\.png.*1,500 x 1,200.*pyramidal TIFF"):
        slides.open_slide(slide_files["png"])


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        slides.open_slide(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.jpg.*corrupt"):
        slides.open_slide(tmp_path / "bad.jpg")


# -------------------------------------------------------------- tissue and spots
def test_tissue_mask_finds_the_disc():
    img = synthetic_slide()
    thumb = np.asarray(Image.fromarray(img).reduce(4))
    mask = slides.tissue_mask(thumb, um_per_px=UM * 4)
    area = mask.sum() * 16
    assert area == pytest.approx(math.pi * RADIUS ** 2, rel=0.05)
    assert not mask[:20].any() and not mask[:, :20].any()  # glass stays glass


@pytest.mark.parametrize("grid", ["square", "checkerboard", "hex"])
def test_lay_spots_pitch_grid_and_array_coordinates(grid):
    """pitch_um is the same-row distance; nearest neighbours: square and hex one pitch,
    checkerboard (legacy ST 2k) pitch / sqrt 2 (diagonal)."""
    mask = np.ones((400, 500), bool)
    centres, arr, share = slides.lay_spots(mask, mask_um_per_px=1.0, pitch_um=40,
                                           diameter_um=20, grid=grid)
    from scipy.spatial import cKDTree

    nearest = 40 / math.sqrt(2) if grid == "checkerboard" else 40
    d, _ = cKDTree(centres).query(centres, k=2)
    assert np.allclose(d[:, 1], nearest, atol=1e-6)
    assert (share == 1).all()
    if grid != "square":  # odd rows shifted half a pitch, doubled columns (x + y even)
        assert ((arr[:, 0] % 2) == (arr[:, 1] % 2)).all()
        rows = np.unique(centres[:, 1])
        assert np.allclose(np.diff(rows), 40 * (math.sqrt(3) / 2 if grid == "hex" else 0.5))
        # the geometry reads back as the layout it was laid as
        layout = ds.array_layout(arr, centres)
        assert layout["layout"] == {"hex": "visium", "checkerboard": "2k"}[grid]
        assert not layout["ambiguous"]
    else:
        assert np.allclose(np.unique(np.diff(np.unique(centres[:, 0]))), 40)
    with pytest.raises(ValueError, match="grid must be one of .'square', 'checkerboard', 'hex'"):
        slides.lay_spots(mask, mask_um_per_px=1.0, pitch_um=40, diameter_um=20, grid="tri")


# --------------------------------------------------------------------- from_image
def test_from_image_lays_spots_over_the_tissue_only(slide_files):
    a = ds.from_image(slide_files["png"], um_per_px=UM, spot_pitch_um=100,
                      spot_diameter_um=55, grid="hex")
    meta = a.uns["spatial"]["slide"]["metadata"]
    assert a.n_vars == 0 and meta["image_only"] and meta["grid"] == "hex"
    assert meta["um_per_px"] == UM and meta["scale_from"].startswith("given")
    # spots inside the disc, about (area / spot cell area) of them
    r = np.hypot(a.obsm["spatial"][:, 0] - CENTRE[0], a.obsm["spatial"][:, 1] - CENTRE[1])
    assert (r < RADIUS + 20).all()
    cell = (100 / UM) ** 2 * math.sqrt(3) / 2
    assert a.n_obs == pytest.approx(math.pi * RADIUS ** 2 / cell, rel=0.15)
    assert meta["tissue_mm2"] == pytest.approx(math.pi * (RADIUS * UM / 1000) ** 2, rel=0.08)
    # the package layout: plots with scanpy, patches from the cache
    assert list(a.obs.columns[:6]) == ["section", "patient", "array_x", "array_y",
                                       "pixel_x", "pixel_y"]
    assert a.uns["spatial"]["slide"]["scalefactors"]["spot_diameter_fullres"] == 55 / UM
    assert a.uns["mclstexp"]["tissue_mask"].shape == \
        a.uns["spatial"]["slide"]["images"]["hires"].shape[:2]
    p = pt.patch_cache(a, out_size=16, progress=False)
    assert p.shape == (a.n_obs, 16, 16, 3)


def test_from_image_takes_the_tiffs_pixel_size_or_asks_for_one(slide_files):
    a = ds.from_image(slide_files["tif"], spot_pitch_um=100, spot_diameter_um=55)
    meta = a.uns["spatial"]["slide"]["metadata"]
    assert meta["um_per_px"] == pytest.approx(UM) and meta["scale_from"] == "stated in the image file"
    b = ds.from_image(slide_files["png"], um_per_px=UM, spot_pitch_um=100, spot_diameter_um=55)
    assert np.allclose(a.obsm["spatial"], b.obsm["spatial"], atol=UM)  # same spots
    with pytest.raises(ValueError, match=r"nosize\.tif does not state its pixel size.*um_per_px="):
        ds.from_image(slide_files["nosize"])
    with pytest.warns(UserWarning, match=r"um_per_px=2\.6 was given but the file states 2"):
        ds.from_image(slide_files["tif"], um_per_px=2.6, spot_pitch_um=100, spot_diameter_um=55)


def test_from_image_bad_scale_and_no_tissue_are_errors(slide_files, tmp_path):
    with pytest.raises(ValueError, match=r"stained, but every stained piece.*0\.30 x 0\.24 mm"
                                         r".*too small"):
        ds.from_image(slide_files["png"], um_per_px=UM / 10)
    with pytest.raises(ValueError, match=r"only \d+ virtual spots.*0\.75 x 0\.60 mm.*too small"):
        ds.from_image(slide_files["png"], um_per_px=UM / 4)
    with pytest.raises(ValueError, match=r"tissue spans .* mm, wider than a standard glass slide"
                                         r".*too large"):
        ds.from_image(slide_files["png"], um_per_px=UM * 20)
    with pytest.raises(ValueError, match=r"max_spots=50"):
        ds.from_image(slide_files["png"], um_per_px=UM, spot_pitch_um=100,
                      spot_diameter_um=55, max_spots=50)
    Image.fromarray(np.full((300, 400, 3), 240, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(ValueError, match=r"no tissue found in .*glass\.png.*tissue_mask="):
        ds.from_image(tmp_path / "glass.png", um_per_px=UM)


def test_from_image_with_a_given_tissue_mask(slide_files, tmp_path):
    mask = np.zeros((120, 150), bool)  # a tenth of the resolution, left half only
    mask[:, :75] = True
    a = ds.from_image(slide_files["png"], um_per_px=UM, tissue_mask=mask,
                      spot_pitch_um=100, spot_diameter_um=55)
    assert (a.obsm["spatial"][:, 0] < 750 + 30).all() and a.n_obs > 50
    assert a.uns["spatial"]["slide"]["metadata"]["tissue_from"].startswith("given")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    b = ds.from_image(slide_files["png"], um_per_px=UM, tissue_mask=tmp_path / "mask.png",
                      spot_pitch_um=100, spot_diameter_um=55)
    assert b.n_obs == a.n_obs
    with pytest.raises(ValueError, match="aspect ratio"):
        ds.from_image(slide_files["png"], um_per_px=UM, tissue_mask=np.ones((100, 100), bool))


@needs_data
def test_virtual_spots_on_the_real_c3_image_sit_where_c3_was_measured(data_root):
    from scipy.spatial import cKDTree

    c3 = ds.her2st("C3", data_dir=data_root, download=False, progress=False)
    meta = c3.uns["spatial"]["C3"]["metadata"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings on a good image
        v = ds.from_image(meta["source_image_path"], um_per_px=meta["um_per_px"])
    pitch_px = 200 / meta["um_per_px"]
    d, _ = cKDTree(c3.obsm["spatial"]).query(v.obsm["spatial"])
    # measured 2026-11-30: 184 virtual spots for 180 measured ones, all within one pitch
    assert 0.8 * c3.n_obs <= v.n_obs <= 1.2 * c3.n_obs
    assert np.mean(d < pitch_px) > 0.95
