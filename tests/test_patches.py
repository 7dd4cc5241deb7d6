"""Tests for mclstexp_lite.patches: crop geometry and patch extraction, and the
wrong-dtype errors of the patch-stage API. The on-disk cache is tested in
test_patch_cache.py, batches and augmentation in test_augment.py, ``SpotData`` in
test_spotdata.py.

Unit tests use small SYNTHETIC images (labelled as such).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mclstexp_lite import _util
from mclstexp_lite import models as mdl
from mclstexp_lite import patches as P

torch.set_num_threads(2)

@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep every test's default cache inside its own tmp dir."""
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------
# synthetic images (unit tests)
# --------------------------------------------------------------------------------------
def _coordinate_image(height: int, width: int) -> np.ndarray:
    """SYNTHETIC: each pixel encodes its own (x, y): R = x % 256, G = y % 256, B = high bits."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)


def _naive_crop(img: np.ndarray, cx: float, cy: float, crop_px: int, pad) -> np.ndarray:
    """Pixel-by-pixel reference crop with padding outside the image."""
    h, w = img.shape[:2]
    rx, ry = math.floor(cx + 0.5), math.floor(cy + 0.5)
    out = np.empty((crop_px, crop_px, 3), dtype=np.uint8)
    for r in range(crop_px):
        for c in range(crop_px):
            y, x = ry - crop_px // 2 + r, rx - crop_px // 2 + c
            out[r, c] = img[y, x] if (0 <= y < h and 0 <= x < w) else pad
    return out


def test_default_patch_um_is_224_px_at_her2_fullres():
    assert P.DEFAULT_PATCH_UM == pytest.approx(224 * 200 / 290)
    assert P.crop_size_px(200 / 290) == 224


def test_crop_size_px_values_and_errors():
    assert P.crop_size_px(0.5, patch_um=100.0) == 200
    assert P.crop_size_px(0.5) == round(P.DEFAULT_PATCH_UM / 0.5)
    assert P.crop_size_px(3.0, patch_um=10.5) == 4  # 3.5 rounds half up
    assert P.crop_size_px(1000.0) == 1  # never below one pixel
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="um_per_px"):
            P.crop_size_px(bad)
    with pytest.raises(ValueError, match="patch_um"):
        P.crop_size_px(0.7, patch_um=0)
    for bad in ("0.7", None, True):
        with pytest.raises(TypeError, match="um_per_px"):
            P.crop_size_px(bad)


@pytest.mark.parametrize("crop_px", [15, 16])
def test_crop_geometry_matches_naive_reference(tmp_path, crop_px):
    """SYNTHETIC coordinate image: crops equal a pixel-by-pixel reference, any input type."""
    img = _coordinate_image(260, 300)
    rng = np.random.default_rng(0)
    centers = np.r_[
        np.c_[rng.uniform(0, 299, 12), rng.uniform(0, 259, 12)],
        [[10.5, 20.5], [0.0, 0.0], [299.0, 259.0], [-3.2, 100.0], [150.0, 265.0], [-0.5, -0.5]],
    ]
    png = tmp_path / "synthetic.png"
    Image.fromarray(img).save(png)
    results = [
        P.extract_patches(source, centers, crop_px=crop_px, out_size=crop_px, pad_value=(1, 2, 3))
        for source in (img, Image.fromarray(img), png, str(png))
    ]
    expected = np.stack([_naive_crop(img, cx, cy, crop_px, (1, 2, 3)) for cx, cy in centers])
    for got in results:
        assert got.dtype == np.uint8 and got.shape == (len(centers), crop_px, crop_px, 3)
        np.testing.assert_array_equal(got, expected)
    # the crop's centre pixel is the image pixel at the (half-up rounded) spot centre
    got = results[0]
    for k, (cx, cy) in enumerate(centers[:12]):
        x, y = math.floor(cx + 0.5), math.floor(cy + 0.5)
        np.testing.assert_array_equal(got[k, crop_px // 2, crop_px // 2], img[y, x])
    # 10.5 rounds up to pixel 11 (R channel encodes x)
    assert got[12, crop_px // 2, crop_px // 2, 0] == 11 and got[12, crop_px // 2, crop_px // 2, 1] == 21


def test_border_padding_default_white():
    """SYNTHETIC: a crop at the image corner is white where it leaves the image."""
    img = np.zeros((40, 50, 3), dtype=np.uint8)
    got = P.extract_patches(img, [[0.0, 0.0]], crop_px=10, out_size=10)[0]
    assert (got[:5, :, :] == 255).all() and (got[:, :5, :] == 255).all()
    assert (got[5:, 5:, :] == 0).all()


def test_resized_patches_match_pil_reference():
    """SYNTHETIC: resized crops equal PIL's bilinear resize of the reference crop."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)
    centers = np.array([[30.3, 40.8], [100.0, 60.0], [2.0, 118.0]])
    for crop_px, out_size in ((15, 32), (49, 224), (64, 20)):
        got = P.extract_patches(img, centers, crop_px=crop_px, out_size=out_size)
        assert got.shape == (3, out_size, out_size, 3)
        for k, (cx, cy) in enumerate(centers):
            ref = Image.fromarray(_naive_crop(img, cx, cy, crop_px, 255)).resize(
                (out_size, out_size), Image.Resampling.BILINEAR
            )
            np.testing.assert_array_equal(got[k], np.asarray(ref))


def test_extract_writes_into_out_and_validates_arguments():
    """SYNTHETIC: `out=` is filled in place; bad arguments name the parameter."""
    img = _coordinate_image(30, 30)
    out = np.zeros((2, 5, 5, 3), dtype=np.uint8)
    res = P.extract_patches(img, [[5, 5], [20, 10]], crop_px=5, out_size=5, out=out)
    assert res is out and out[1, 2, 2, 0] == 20
    with pytest.raises(ValueError, match="out must be"):
        P.extract_patches(img, [[5, 5]], crop_px=5, out_size=5, out=np.zeros((2, 5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="centers"):
        P.extract_patches(img, [5, 5], crop_px=5)
    with pytest.raises(ValueError, match="non-finite"):
        P.extract_patches(img, [[5, np.nan]], crop_px=5)
    with pytest.raises(TypeError, match="crop_px"):
        P.extract_patches(img, [[5, 5]], crop_px=5.0)
    with pytest.raises(ValueError, match="out_size"):
        P.extract_patches(img, [[5, 5]], crop_px=5, out_size=0)
    with pytest.raises(ValueError, match="pad_value"):
        P.extract_patches(img, [[5, 5]], crop_px=5, pad_value=300)
    with pytest.raises(TypeError, match="uint8"):
        P.extract_patches(img.astype(np.float32), [[5, 5]], crop_px=5)
    with pytest.raises(ValueError, match="height, width, 3"):
        P.extract_patches(img[..., :2], [[5, 5]], crop_px=5)
    with pytest.raises(TypeError, match="image must be"):
        P.extract_patches(12, [[5, 5]], crop_px=5)


def test_out_of_image_centres_are_reported():
    """SYNTHETIC: centres beyond half a crop outside the image raise with details."""
    img = np.zeros((40, 50, 3), dtype=np.uint8)
    # within half a crop (5 px) outside: allowed, padded
    P.extract_patches(img, [[-5.0, 20.0], [54.0, 44.0]], crop_px=10, out_size=10)
    centers = [[10.0, 10.0], [200.0, 10.0], [-30.0, 5.0], [10.0, 45.5]]
    with pytest.raises(ValueError) as err:
        P.extract_patches(img, centers, crop_px=10, ids=["a", "b", "c", "d"])
    msg = str(err.value)
    assert "3 of 4" in msg and "50 x 40" in msg and "pixel frame" in msg
    assert "b at (200.0, 10.0)" in msg and "c at (-30.0, 5.0)" in msg and "a at" not in msg


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    """SYNTHETIC JPEG, truncated or garbage: ValueError naming the file and the fix."""
    rng = np.random.default_rng(2)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="re-download") as err:
            P.extract_patches(path, [[50, 50]], crop_px=10)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        P.extract_patches(tmp_path / "missing.jpg", [[50, 50]], crop_px=10)
    assert P.extract_patches(good, [[50, 50]], crop_px=10).shape == (1, 224, 224, 3)


def test_pil_pixel_limit_is_restored():
    before = Image.MAX_IMAGE_PIXELS
    P.extract_patches(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), [[4, 4]], crop_px=4, out_size=4)
    assert Image.MAX_IMAGE_PIXELS == before


# ---------------------------------------------- wrong dtypes (from test_bad_input.py)
@pytest.mark.parametrize("call, error, match", [
    (lambda: P.to_torch_batch(np.zeros((3, 8, 8, 3), np.float32), [0]), TypeError,
     "patches must have dtype uint8, got float32"),
    (lambda: P.extract_patches(np.zeros((20, 20, 3), np.uint8), [["10", "a"]], crop_px=4),
     TypeError, "centers must hold numbers"),
    (lambda: P.extract_patches(np.zeros((20, 20, 3), np.float32), [[10, 10]], crop_px=4),
     TypeError, "dtype uint8"),
    (lambda: P.gpu_augment(torch.zeros((2, 8, 8, 3), dtype=torch.uint8)), TypeError,
     r"\(N, 3, H, W\)"),
    (lambda: mdl.normalize_uint8(torch.zeros((2, 3, 8, 8), dtype=torch.float32)), TypeError,
     "uint8"),
], ids=["float-patches", "text-centres", "float-image", "nhwc-batch",
        "float-normalize"])
def test_wrong_dtypes_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()
