"""Tests for mclstexp_lite.patches: crop geometry, the on-disk cache, batches, augmentation.

Unit tests use small synthetic images (labelled as such); the cache tests use the real
HER2+ images in the shared data folder and skip when it is absent.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from mclstexp_lite import patches as P

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("MCLSTEXP_DATA")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


DATA = _data_dir()
HER2 = DATA / "her2st"
FULLRES_SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def _section_image(section: str) -> Path | None:
    if section == "A1":
        path = HER2 / "app" / "www" / "imgs" / "A1_HE_image_dark.png"
        return path if path.is_file() else None
    found = sorted((HER2 / "data" / "ST-imgs" / section[0] / section).glob("*.jpg"))
    return found[0] if found else None


def _needs(section: str):
    ok = (
        _section_image(section) is not None
        and (HER2 / "data" / "ST-spotfiles" / f"{section}_selection.tsv").is_file()
        and (HER2 / "data" / "ST-cnts" / f"{section}.tsv.gz").is_file()
    )
    return pytest.mark.skipif(
        not ok,
        reason=f"HER2+ section {section} (image, spot file, counts) not found under {HER2}; "
        "set MCLSTEXP_DATA to the shared data folder",
    )


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep every test's default cache inside its own tmp dir."""
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------
# test helpers: a minimal section AnnData from the raw HER2+ files
# --------------------------------------------------------------------------------------
A1_SCALE = 2000 / 6954  # spot-file pixels -> A1_HE_image_dark.png pixels (shared data README)


def _grid_pitch_px(pixel_xy: np.ndarray, array_xy: np.ndarray) -> float:
    """Median pixel distance between spots one array step apart (test helper).

    The median distance to the *nearest* spot would be biased low (about 272 px instead
    of about 291 px on the full-resolution images), because spot centres jitter and the
    minimum over four jittered neighbours is short.
    """
    steps = np.abs(array_xy[:, None, :] - array_xy[None, :, :]).sum(-1)
    i, j = np.nonzero(np.triu(steps == 1))
    return float(np.median(np.hypot(*(pixel_xy[i] - pixel_xy[j]).T)))


def _source_sha256(rel_path: str) -> str:
    with open(DATA / "SOURCES.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["path"] == rel_path:
                return row["sha256"]
    return ""


def make_section_adata(section: str) -> ad.AnnData:
    """TEST HELPER: a minimal section AnnData following docs/data_model.md.

    Built by hand from the raw HER2+ spot file and counts index, holding only the slots
    the patch module reads (obs_names, obs section/array/pixel columns, obsm['spatial'],
    uns['spatial'][section]['metadata'/'scalefactors']); no counts, no hires image. To
    be replaced by mclstexp_lite.datasets.her2st once that loader exists.
    """
    spots = pd.read_csv(HER2 / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    counted = set(pd.read_csv(HER2 / "data" / "ST-cnts" / f"{section}.tsv.gz", sep="\t", usecols=[0]).iloc[:, 0])
    ax = np.round(spots["x"].to_numpy()).astype(int)
    ay = np.round(spots["y"].to_numpy()).astype(int)
    ids = [f"{x}x{y}" for x, y in zip(ax, ay)]
    keep = np.array([i in counted for i in ids])
    scale = A1_SCALE if section == "A1" else 1.0
    pixel = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)[keep] * scale
    array_xy = np.c_[ax, ay][keep]
    image = _section_image(section)
    pitch_px = _grid_pitch_px(pixel, array_xy)
    obs = pd.DataFrame(
        {
            "section": pd.Categorical([section] * int(keep.sum())),
            "patient": pd.Categorical([section[0]] * int(keep.sum())),
            "array_x": array_xy[:, 0],
            "array_y": array_xy[:, 1],
            "pixel_x": pixel[:, 0],
            "pixel_y": pixel[:, 1],
        },
        index=[f"{section}_{i}" for i, k in zip(ids, keep) if k],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["spatial"] = pixel
    adata.uns["spatial"] = {
        section: {
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 100.0 / (200.0 / pitch_px)},
            "metadata": {
                "source_image_path": str(image),
                "source_image_sha256": _source_sha256(str(image.relative_to(DATA))),
                "um_per_px": 200.0 / pitch_px,
                "pixel_scale": scale,
                "spot_pitch_um": 200.0,
            },
        }
    }
    return adata


def _reference_patch(image_path: Path, cx: float, cy: float, crop_px: int, out_size: int) -> np.ndarray:
    """Plain PIL crop + resize of one interior spot (reference implementation)."""
    with Image.open(image_path) as im:
        im.load()
        rx, ry = math.floor(cx + 0.5), math.floor(cy + 0.5)
        box = (rx - crop_px // 2, ry - crop_px // 2, rx - crop_px // 2 + crop_px, ry - crop_px // 2 + crop_px)
        crop = im.convert("RGB").crop(box)
    if crop_px != out_size:
        crop = crop.resize((out_size, out_size), Image.Resampling.BILINEAR)
    return np.asarray(crop)


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


# --------------------------------------------------------------------------------------
# cache directory resolution (synthetic, no data)
# --------------------------------------------------------------------------------------
def test_default_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "c"))
    assert P._default_cache_dir() == tmp_path / "c" / "patches"
    monkeypatch.delenv("MCLSTEXP_CACHE")
    monkeypatch.setenv("MCLSTEXP_DATA", str(tmp_path / "data"))
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda name: str(tmp_path / "user"))
    # derived files never go inside the data root (it may be a shared, read-only copy)
    assert P._default_cache_dir() == tmp_path / "user" / "cache" / "patches"
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------------
# the cache on real data
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def c2():
    return make_section_adata("C2")


@pytest.fixture(scope="module")
def c2_cache(c2, tmp_path_factory):
    cache = tmp_path_factory.mktemp("c2-cache")
    adata = c2.copy()
    arr = P.patch_cache(adata, cache_dir=cache, progress=False)
    return adata, arr, cache


def _entry_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def _tissue_like(patches: np.ndarray) -> np.ndarray:
    """H&E tissue: darker than the ~240 glass and blue/purple (B > G) from the stain."""
    mean = patches.reshape(len(patches), -1, 3).mean(axis=1)
    return (mean.mean(axis=1) < 215) & (mean[:, 2] - mean[:, 1] > 8)


@_needs("C2")
def test_c2_cache_shape_content_and_provenance(c2_cache):
    adata, arr, cache = c2_cache
    um = adata.uns["spatial"]["C2"]["metadata"]["um_per_px"]
    crop_px = P.crop_size_px(um)
    assert 222 <= crop_px <= 226  # about 224 px at the full-resolution scale
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    assert arr.shape == (adata.n_obs, 224, 224, 3) and arr.dtype == np.uint8
    assert adata.n_obs == 187
    # tissue under (nearly) every spot; the criterion rejects the slide's glass corner
    assert _tissue_like(arr).mean() > 0.9
    image = Path(adata.uns["spatial"]["C2"]["metadata"]["source_image_path"])
    corner = P.extract_patches(image, [[150.0, 150.0]], crop_px=crop_px)
    assert not _tissue_like(corner)[0]
    # rows equal a plain PIL crop + resize at the spot centre, in obs order
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        for k in (0, 57, 186):
            cx, cy = adata.obsm["spatial"][k]
            np.testing.assert_array_equal(arr[k], _reference_patch(image, cx, cy, crop_px, 224))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    # provenance and the sidecar JSON
    rec = adata.uns["mclstexp"]["patches"]
    assert Path(rec["path"]).parent == cache and rec["params"]["crop_px"] == crop_px
    meta = json.loads(Path(rec["json"]).read_text())
    assert meta["obs_names"] == list(adata.obs_names)
    assert meta["crop_px"] == crop_px and meta["out_size"] == 224
    assert meta["source_image_sha256"] == adata.uns["spatial"]["C2"]["metadata"]["source_image_sha256"]
    for field in ("patch_um", "source_image_path", "created", "package_version"):
        assert field in meta
    assert Path(rec["path"]).name.startswith(f"C2_224px_c{crop_px}_{meta['source_image_sha256'][:16]}_")


@_needs("C2")
def test_cache_hit_reuses_entry_without_decoding(c2_cache, monkeypatch):
    adata, arr, cache = c2_cache
    files = _entry_files(cache)
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def no_decode(*args, **kwargs):
        raise AssertionError("the image was decoded on a cache hit")

    monkeypatch.setattr(P, "_open_image", no_decode)
    again = P.patch_cache(adata.copy(), cache_dir=cache, progress=False)
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, arr)
    assert _entry_files(cache) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


@_needs("C2")
def test_subset_and_reorder_reuse_rows_of_existing_entry(c2_cache, monkeypatch):
    adata, arr, cache = c2_cache
    order = np.random.default_rng(3).permutation(adata.n_obs)[:60]
    sub = adata[order].copy()
    monkeypatch.setattr(P, "_open_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    got = P.patch_cache(sub, cache_dir=cache, progress=False)
    assert isinstance(got, np.memmap) and got.shape == (60, 224, 224, 3)
    np.testing.assert_array_equal(got, arr[order])
    meta = json.loads(Path(sub.uns["mclstexp"]["patches"]["json"]).read_text())
    assert meta["built_from"].startswith("cache entry C2_")
    assert meta["obs_names"] == list(sub.obs_names)


@_needs("C2")
def test_changed_checksum_gives_new_entry(c2_cache, tmp_path):
    adata, arr, cache = c2_cache
    other = adata.copy()
    other.uns["spatial"]["C2"]["metadata"]["source_image_sha256"] = "0" * 64
    got = P.patch_cache(other, cache_dir=cache, progress=False)
    assert other.uns["mclstexp"]["patches"]["path"] != adata.uns["mclstexp"]["patches"]["path"]
    assert "_0000000000000000_" in Path(other.uns["mclstexp"]["patches"]["path"]).name
    np.testing.assert_array_equal(got, arr)  # same image bytes, so the same patches


@_needs("C2")
def test_missing_checksum_is_computed(c2_cache, tmp_path):
    adata, arr, _ = c2_cache
    other = adata.copy()
    expected = other.uns["spatial"]["C2"]["metadata"]["source_image_sha256"]
    other.uns["spatial"]["C2"]["metadata"]["source_image_sha256"] = ""
    P._SHA256_MEMO.clear()
    got = P.patch_cache(other, cache_dir=tmp_path, progress=False)
    assert other.uns["mclstexp"]["patches"]["params"]["source_image_sha256"] == expected
    assert len(P._SHA256_MEMO) == 1
    np.testing.assert_array_equal(got, arr)


@_needs("C2")
def test_truncated_npy_is_detected_and_rebuilt(c2, c2_cache, tmp_path, caplog):
    _, arr, _ = c2_cache
    adata = c2.copy()
    P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    npy = Path(adata.uns["mclstexp"]["patches"]["path"])
    size = npy.stat().st_size
    with open(npy, "r+b") as fh:
        fh.truncate(size // 3)
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert "rebuilding" in caplog.text and npy.name in caplog.text
    assert npy.stat().st_size == size
    np.testing.assert_array_equal(got, arr)


@_needs("C2")
def test_corrupt_json_and_foreign_entry_are_rebuilt(c2, tmp_path, caplog):
    adata = c2[:20].copy()
    first = np.array(P.patch_cache(adata, cache_dir=tmp_path, progress=False))
    json_path = Path(adata.uns["mclstexp"]["patches"]["json"])
    json_path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert "unusable" in caplog.text
    np.testing.assert_array_equal(got, first)
    # an entry whose JSON lists other spots under this key is never used
    meta = json.loads(json_path.read_text())
    meta["obs_names"] = meta["obs_names"][::-1]
    json_path.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert "obs_names" in caplog.text
    np.testing.assert_array_equal(got, first)
    assert json.loads(json_path.read_text())["obs_names"] == list(adata.obs_names)
    # extra bytes after the array (a foreign or half-replaced file) are caught too
    npy = Path(adata.uns["mclstexp"]["patches"]["path"])
    size = npy.stat().st_size
    with open(npy, "ab") as fh:
        fh.write(b"\0" * 4096)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert "bytes, expected" in caplog.text and npy.stat().st_size == size
    np.testing.assert_array_equal(got, first)


@_needs("C2")
def test_corrupt_source_image_fails_cleanly(c2, tmp_path):
    broken = tmp_path / "broken.jpg"
    src = Path(c2.uns["spatial"]["C2"]["metadata"]["source_image_path"])
    broken.write_bytes(src.read_bytes()[:200_000])
    adata = c2.copy()
    meta = adata.uns["spatial"]["C2"]["metadata"]
    meta["source_image_path"], meta["source_image_sha256"] = str(broken), ""
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="re-download") as err:
        P.patch_cache(adata, cache_dir=cache, progress=False)
    assert str(broken) in str(err.value)
    assert list(cache.iterdir()) == []  # nothing half-written is left behind


@_needs("C2")
def test_failed_overwrite_keeps_the_valid_entry(c2, tmp_path, monkeypatch):
    adata = c2[:10].copy()
    first = np.array(P.patch_cache(adata, cache_dir=tmp_path, progress=False))
    files = _entry_files(tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("simulated decode failure")

    monkeypatch.setattr(P, "_open_image", broken)
    with pytest.raises(ValueError, match="simulated"):
        P.patch_cache(adata, cache_dir=tmp_path, overwrite=True, progress=False)
    assert _entry_files(tmp_path) == files and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    np.testing.assert_array_equal(P.patch_cache(adata, cache_dir=tmp_path, progress=False), first)


@_needs("C2")
def test_npy_without_json_is_rebuilt_with_warning(c2, tmp_path, caplog):
    adata = c2[:10].copy()
    first = np.array(P.patch_cache(adata, cache_dir=tmp_path, progress=False))
    Path(adata.uns["mclstexp"]["patches"]["json"]).unlink()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert "interrupted write" in caplog.text
    np.testing.assert_array_equal(got, first)


@_needs("C2")
def test_views_are_not_modified(c2, tmp_path, recwarn):
    view = c2[:10]
    assert view.is_view
    got = P.patch_cache(view, cache_dir=tmp_path, progress=False)
    assert got.shape == (10, 224, 224, 3)
    assert view.is_view and "mclstexp" not in view.uns
    assert not [w for w in recwarn if "view" in str(w.message).lower()]


@_needs("C2")
def test_patch_cache_input_errors(c2, tmp_path):
    adata = c2[:5].copy()
    two = adata.copy()
    two.uns["spatial"]["X9"] = two.uns["spatial"]["C2"]
    with pytest.raises(ValueError, match="library_id"):
        P.patch_cache(two, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not in adata.uns"):
        P.patch_cache(adata, cache_dir=tmp_path, library_id="nope", progress=False)
    with pytest.raises(ValueError, match="other sections"):
        P.patch_cache(two, cache_dir=tmp_path, library_id="X9", progress=False)
    assert P.patch_cache(two, cache_dir=tmp_path, library_id="C2", progress=False).shape[0] == 5
    bad = adata.copy()
    del bad.uns["spatial"]["C2"]["metadata"]["um_per_px"]
    with pytest.raises(ValueError, match="um_per_px"):
        P.patch_cache(bad, cache_dir=tmp_path, progress=False)
    bad = adata.copy()
    bad.obsm["spatial"] = bad.obsm["spatial"] * 100
    with pytest.raises(ValueError, match="pixel frame"):
        P.patch_cache(bad, cache_dir=tmp_path, progress=False)
    bad = adata.copy()
    del bad.uns["spatial"]
    with pytest.raises(ValueError, match="uns\\['spatial'\\]"):
        P.patch_cache(bad, cache_dir=tmp_path, progress=False)


@_needs("C2")
def test_default_cache_dir_used_when_none_given(c2, tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "envcache"))
    adata = c2[:3].copy()
    P.patch_cache(adata, progress=False)
    assert Path(adata.uns["mclstexp"]["patches"]["path"]).parent == tmp_path / "envcache" / "patches"


@_needs("A1")
def test_a1_reduced_image_crops_same_tissue_width(tmp_path):
    adata = make_section_adata("A1")
    um = adata.uns["spatial"]["A1"]["metadata"]["um_per_px"]
    crop_px = P.crop_size_px(um)
    assert abs(crop_px - 49) <= 1  # ~63 px spot pitch: 200/63 um/px -> 154.5 um is ~49 px
    arr = P.patch_cache(adata, cache_dir=tmp_path, progress=False)
    assert arr.shape == (adata.n_obs, 224, 224, 3) and arr.dtype == np.uint8
    assert adata.uns["mclstexp"]["patches"]["params"]["crop_px"] == crop_px
    image = Path(adata.uns["spatial"]["A1"]["metadata"]["source_image_path"])
    for k in (0, 100, adata.n_obs - 1):
        cx, cy = adata.obsm["spatial"][k]
        np.testing.assert_array_equal(arr[k], _reference_patch(image, cx, cy, crop_px, 224))


# --------------------------------------------------------------------------------------
# batches and the dataset (synthetic)
# --------------------------------------------------------------------------------------
@pytest.fixture()
def small_patches(tmp_path):
    """SYNTHETIC: 20 random 8x8 patches saved and memory-mapped like a cache entry."""
    arr = np.random.default_rng(4).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "p.npy", arr)
    return arr, np.load(tmp_path / "p.npy", mmap_mode="r")


def test_to_torch_batch_keeps_order_and_layout(small_patches):
    arr, mm = small_patches
    idx = [5, 1, 5, 19, 0, 7]
    expected = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2)
    for source in (arr, mm):
        for index in (idx, np.array(idx), torch.tensor(idx)):
            got = to = P.to_torch_batch(source, index, device="cpu")
            assert got.dtype == torch.uint8 and got.shape == (6, 3, 8, 8)
            assert torch.equal(to, expected)
    assert P.to_torch_batch(mm, []).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="outside 0..19"):
        P.to_torch_batch(mm, [0, 20])
    with pytest.raises(TypeError, match="integer"):
        P.to_torch_batch(mm, [0.0, 1.0])
    with pytest.raises(TypeError, match="uint8"):
        P.to_torch_batch(arr.astype(np.float32), [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_torch_batch_cuda(small_patches):
    arr, mm = small_patches
    got = P.to_torch_batch(mm, [3, 2, 9], device="cuda")
    assert got.is_cuda
    assert torch.equal(got.cpu(), torch.from_numpy(arr[[3, 2, 9]]).permute(0, 3, 1, 2))


def test_patch_dataset_items_and_batches(small_patches):
    arr, mm = small_patches
    rng = np.random.default_rng(5)
    expr = rng.poisson(2.0, (20, 7)).astype(np.float64)
    pos = rng.integers(0, 30, (20, 2))
    groups = np.array(["C2", "B4"] * 10)
    ds = P.PatchDataset(mm, expr, pos, groups=groups)
    assert len(ds) == 20 and list(ds.group_names) == ["B4", "C2"]
    item = ds[3]
    assert torch.equal(item["image"], torch.from_numpy(arr[3]).permute(2, 0, 1))
    assert item["image"].dtype == torch.uint8 and item["expression"].dtype == torch.float32
    assert torch.equal(item["expression"], torch.tensor(expr[3], dtype=torch.float32))
    assert item["position"].tolist() == pos[3].tolist() and item["group"] == 0 and item["index"] == 3
    assert ds[-1]["index"] == 19
    idx = np.array([4, 0, 4, 11])
    b = ds.batch(idx)
    assert torch.equal(b["image"], torch.stack([ds[i]["image"] for i in idx]))
    assert torch.equal(b["expression"], torch.stack([ds[i]["expression"] for i in idx]))
    assert b["position"].tolist() == pos[idx].tolist() and b["group"].tolist() == [1, 1, 1, 0]
    # sparse expression gives the same rows
    sparse_ds = P.PatchDataset(mm, sp.csr_matrix(expr), pos)
    assert torch.equal(sparse_ds.batch(idx)["expression"], b["expression"])
    assert torch.equal(sparse_ds[2]["expression"], ds[2]["expression"])
    # an epoch visits each spot once; reproducible with a generator
    seen = [bt["index"] for bt in ds.iter_batches(6, generator=torch.Generator().manual_seed(0))]
    assert [len(s) for s in seen] == [6, 6, 6, 2]
    assert sorted(torch.cat(seen).tolist()) == list(range(20))
    again = [bt["index"] for bt in ds.iter_batches(6, generator=torch.Generator().manual_seed(0))]
    assert all(torch.equal(a, c) for a, c in zip(seen, again))
    assert [len(bt["index"]) for bt in ds.iter_batches(6, drop_last=True, shuffle=False)] == [6, 6, 6]
    # works with a DataLoader (default collate)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    first = next(iter(loader))
    assert torch.equal(first["image"], ds.batch(range(5))["image"])


def test_patch_dataset_validates(small_patches):
    _, mm = small_patches
    with pytest.raises(ValueError, match="expr has 3 rows"):
        P.PatchDataset(mm, np.zeros((3, 2)), np.zeros((20, 2), int))
    with pytest.raises(ValueError, match="pos must have shape"):
        P.PatchDataset(mm, np.zeros((20, 2)), np.zeros((20, 3), int))
    with pytest.raises(ValueError, match="non-negative whole"):
        P.PatchDataset(mm, np.zeros((20, 2)), np.full((20, 2), 1.5))
    with pytest.raises(ValueError, match="groups"):
        P.PatchDataset(mm, np.zeros((20, 2)), np.zeros((20, 2), int), groups=[1, 2])
    ds = P.PatchDataset(mm, np.zeros((20, 2)), np.zeros((20, 2), int))
    with pytest.raises(IndexError):
        ds[20]


# --------------------------------------------------------------------------------------
# augmentation (synthetic)
# --------------------------------------------------------------------------------------
def _batch(n=16, size=12, seed=6):
    """SYNTHETIC: random uint8 NCHW batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_gpu_augment_is_deterministic_given_a_generator():
    x = _batch()
    a = P.gpu_augment(x, generator=torch.Generator().manual_seed(1))
    b = P.gpu_augment(x, generator=torch.Generator().manual_seed(1))
    c = P.gpu_augment(x, generator=torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(x, _batch())  # input untouched


def test_geometry_is_the_drawn_symmetry_of_the_square():
    """Without jitter each sample is exactly its drawn flip/rotation (pixel multiset kept)."""
    x = _batch(n=64)
    out, params = P.gpu_augment(
        x, generator=torch.Generator().manual_seed(3), brightness=0, contrast=0, saturation=0, return_params=True
    )
    got = torch.round(out * 255).to(torch.uint8)
    for i in range(len(x)):
        ref = x[i].numpy()
        if params["hflip"][i]:
            ref = ref[:, :, ::-1]
        if params["vflip"][i]:
            ref = ref[:, ::-1, :]
        ref = np.rot90(ref, int(params["k90"][i]), axes=(1, 2))
        np.testing.assert_array_equal(got[i].numpy(), ref)
        assert torch.equal(torch.sort(got[i].flatten()).values, torch.sort(x[i].flatten()).values)
    # all four quarter turns and both flips occur
    assert set(params["k90"].tolist()) == {0, 1, 2, 3}
    assert 0 < params["hflip"].sum() < 64 and 0 < params["vflip"].sum() < 64


def test_draws_follow_the_documented_distributions():
    x = torch.zeros((4000, 3, 2, 2), dtype=torch.uint8)
    _, p = P.gpu_augment(x, generator=torch.Generator().manual_seed(0), return_params=True)
    assert abs(p["hflip"].float().mean() - 0.5) < 0.04 and abs(p["vflip"].float().mean() - 0.5) < 0.04
    counts = torch.bincount(p["k90"], minlength=4).float() / 4000
    assert torch.all((counts - 0.25).abs() < 0.03)
    f = p["factors"]
    assert f.min() >= 0.5 and f.max() <= 1.5 and torch.all((f.mean(0) - 1.0).abs() < 0.03)
    perms = {tuple(r) for r in p["order"].tolist()}
    assert perms == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def test_colour_jitter_matches_torchvision_per_sample():
    x = _batch(n=24, size=10)
    out, p = P.gpu_augment(
        x, generator=torch.Generator().manual_seed(4), flips=False, rotation=None, return_params=True
    )
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(len(x)):
        ref = x[i].float() / 255
        for j in p["order"][i].tolist():
            ref = ops[j](ref, float(p["factors"][i, j]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_rotation_any_matches_torchvision_rotate():
    x = _batch(n=12, size=32)
    out, p = P.gpu_augment(
        x,
        generator=torch.Generator().manual_seed(5),
        flips=False,
        rotation="any",
        brightness=0,
        contrast=0,
        saturation=0,
        return_params=True,
    )
    assert p["angle"].min() >= -180 and p["angle"].max() < 180
    for i in range(len(x)):
        ref = TF.rotate(x[i].float() / 255, float(p["angle"][i]))
        agree = torch.isclose(out[i], ref, atol=1e-6).float().mean()
        assert agree > 0.99, (i, float(p["angle"][i]), float(agree))
    # a 45 degree turn leaves black corners
    y = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    rotated = P._rotate_any(y.float() / 255, torch.tensor([45.0]))
    assert rotated[0, :, 0, 0].eq(0).all() and rotated[0, :, 8, 8].eq(1).all()


def test_identity_settings_and_errors():
    x = _batch(n=3)
    same = P.gpu_augment(x, flips=False, rotation=None, brightness=0, contrast=0, saturation=0)
    assert torch.equal(same, x.float() / 255)
    floats = x.float() / 255
    assert torch.equal(P.gpu_augment(floats, flips=False, rotation=None, brightness=0, contrast=0, saturation=0), floats)
    with pytest.raises(ValueError, match="square"):
        P.gpu_augment(torch.zeros((1, 3, 4, 6), dtype=torch.uint8))
    with pytest.raises(ValueError, match="rotation"):
        P.gpu_augment(x, rotation="180")
    with pytest.raises(ValueError, match="brightness"):
        P.gpu_augment(x, brightness=-0.1)
    with pytest.raises(TypeError, match="uint8"):
        P.gpu_augment(x.to(torch.int32))
    with pytest.raises(TypeError, match="N, 3, H, W"):
        P.gpu_augment(x[0])
