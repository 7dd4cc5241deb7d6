"""Tests for mclstexp_lite._patch_cache: the on-disk patch cache (``patches.patch_cache``):
entries keyed by content, reuse of rows, provenance, damaged or half-written entries
rebuilt, interrupted writes leaving nothing, and input errors.

The cache tests marked with a section name use the real HER2+ images in the shared data
folder and skip when it is absent; the others use a SYNTHETIC section
(tests/factories.py: random counts, a random-noise "H&E" JPEG on a 4 x 3 grid).
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
import torch
from PIL import Image

import mclstexp_lite._patch_extract as PX
import mclstexp_lite._patch_cache as PC
from mclstexp_lite import _util
from mclstexp_lite import datasets as ds
from mclstexp_lite import patches as P

from .factories import damage_jpeg, listing, write_section

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




@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep every test's default cache inside its own tmp dir."""
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------
# cache directory resolution (synthetic, no data)
# --------------------------------------------------------------------------------------
def test_default_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "c"))
    assert PC._default_cache_dir() == tmp_path / "c" / "patches"
    monkeypatch.delenv("MCLSTEXP_CACHE")
    monkeypatch.setenv("MCLSTEXP_DATA", str(tmp_path / "data"))
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda name: str(tmp_path / "user"))
    # derived files never go inside the data root (it may be a shared, read-only copy)
    assert PC._default_cache_dir() == tmp_path / "user" / "cache" / "patches"
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

    monkeypatch.setattr(PX, "_open_image", no_decode)
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
    monkeypatch.setattr(PX, "_open_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
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
    _util._SHA256_MEMO.clear()
    got = P.patch_cache(other, cache_dir=tmp_path, progress=False)
    assert other.uns["mclstexp"]["patches"]["params"]["source_image_sha256"] == expected
    assert len(_util._SHA256_MEMO) == 1
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

    monkeypatch.setattr(PX, "_open_image", broken)
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


# ------------------------ damaged images, interrupted writes (from test_bad_input.py)
@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_patch_cache_of_damaged_image_names_it_and_writes_nothing(tmp_path, how):
    """The image is fine when the section loads and damaged later, when patches are cut."""
    c, s, img = write_section(tmp_path / "sec")
    adata = ds.from_files(c, s, img, section="S")
    damage_jpeg(img, how)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="re-download") as err:
        P.patch_cache(adata, cache_dir=cache, progress=False)
    assert str(img) in str(err.value)
    assert listing(cache) == []


@pytest.fixture()
def synthetic_section(tmp_path):
    c, s, img = write_section(tmp_path / "sec")
    adata = ds.from_files(c, s, img, section="S")
    crop = P.crop_size_px(adata.uns["spatial"]["S"]["metadata"]["um_per_px"])
    expected = P.extract_patches(img, adata.obsm["spatial"], crop_px=crop, out_size=32)
    return adata, expected


def _interrupt_half_way(monkeypatch, exc):
    real = P.extract_patches

    def half_then_fail(image, centers, *, out, ids=None, **kw):
        half = len(centers) // 2
        real(image, centers[:half], out=out[:half], ids=None if ids is None else ids[:half], **kw)
        raise exc

    monkeypatch.setattr(PC, "extract_patches", half_then_fail)  # what the cache calls


def test_interrupted_patch_cache_write_leaves_no_entry(synthetic_section, tmp_path, monkeypatch):
    adata, expected = synthetic_section
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        _interrupt_half_way(m, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert listing(cache) == []  # neither the entry nor its temporary file
    got = P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(got, expected)
    # an interrupted rebuild (overwrite=True) leaves the valid entry as it was
    files = {name: (cache / name).read_bytes() for name in listing(cache)}
    assert len(files) == 2
    with monkeypatch.context() as m:
        _interrupt_half_way(m, OSError("disk full (simulated)"))
        with pytest.raises(OSError, match="simulated"):
            P.patch_cache(adata, out_size=32, cache_dir=cache, overwrite=True, progress=False)
    assert {name: (cache / name).read_bytes() for name in listing(cache)} == files


def test_patch_cache_entry_without_metadata_is_never_used(synthetic_section, tmp_path,
                                                          monkeypatch, caplog):
    """A crash after the array is in place but before its JSON is written."""
    adata, expected = synthetic_section
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise OSError("killed before the metadata was written (simulated)")

    with monkeypatch.context() as m:
        m.setattr(PC, "atomic_write_text", crash)  # the JSON write
        with pytest.raises(OSError, match="simulated"):
            P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert [Path(n).suffix for n in listing(cache)] == [".npy"]
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert "interrupted write" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(got, expected)
    assert sorted(Path(n).suffix for n in listing(cache)) == [".json", ".npy"]


def test_patch_cache_refuses_spots_without_pixel_coordinates(synthetic_section, tmp_path):
    adata, _ = synthetic_section
    adata.obsm["spatial"][2] = np.nan
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"1 non-finite row\(s\) \(first at index 2\)"):
        P.patch_cache(adata, cache_dir=cache, progress=False)
    assert listing(cache) == [] if cache.exists() else True
