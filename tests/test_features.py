"""Tests for mclstexp_lite.features: the frozen-feature cache (keyed by content, atomic,
stale entries refused), dihedral views, and training / embedding from cached features.

Everything here runs on SYNTHETIC patches and expression (random numbers, labelled so)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from mclstexp_lite import features as fx
from mclstexp_lite import models as mdl
from mclstexp_lite import train as tr
from mclstexp_lite import _embed as embed

from .factories import synthetic_spotdata, tiny_config

#: the frozen-training tests: two epochs (mode="frozen" is the factory's default)
FROZEN = dict(epochs=2, seed=3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MCLSTEXP_CACHE", str(folder))
    return folder / "features"


def _encoder(seed=0, size=32):
    torch.manual_seed(seed)
    return mdl.ImageEncoder("resnet18", weights=None, freeze=True, image_size=size).eval()


def _patches(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _direct(encoder, patches, view=0):
    """The plain computation: normalise, view, encode, one image at a time."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    x = fx.apply_view((x - mean) / std, view)
    with torch.no_grad():
        return torch.cat([encoder(x[i:i + 1]) for i in range(len(x))]).numpy()


def test_features_equal_the_plain_computation_and_are_cached_once(cache, caplog):
    enc, p = _encoder(), _patches()
    with caplog.at_level(logging.INFO, logger="mclstexp_lite.features"):
        first = fx.section_features(enc, p, device="cpu", name="S1", progress=False)
    np.testing.assert_allclose(first, _direct(enc, p), rtol=1e-4, atol=1e-5)
    assert "cached 6 x 512 features (S1_resnet18_32px_v0)" in caplog.text
    (meta_path,) = cache.glob("S1_*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["weights_sha256"] == enc.fingerprint() and meta["view"] == 0
    assert meta["patches"].startswith("pixels:") and meta["n_spots"] == 6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mclstexp_lite.features"):
        again = fx.section_features(enc, p, device="cpu", name="S1", progress=False)
    assert "cached" not in caplog.text  # read back, not recomputed
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again, first)


@pytest.mark.parametrize("change", ["weights", "pixels", "view", "size"])
def test_another_encoder_weights_patches_or_view_never_reuses_an_entry(cache, change):
    enc, p = _encoder(), _patches()
    base = fx.section_features(enc, p, device="cpu", progress=False)
    kw = {}
    if change == "weights":
        enc = _encoder(seed=1)
    elif change == "pixels":
        p = p.copy()
        p[0, 0, 0, 0] ^= 1
    elif change == "view":
        kw["view"] = 1
    else:
        enc = _encoder(size=24)
    other = fx.section_features(enc, p, device="cpu", progress=False, **kw)
    assert len(list(cache.glob("*.json"))) == 2
    if change != "pixels":
        assert not np.allclose(other, base)


def test_a_stale_entry_is_refused_and_recomputed(cache, caplog):
    enc, p = _encoder(), _patches()
    good = fx.section_features(enc, p, device="cpu", progress=False)
    (meta_path,) = cache.glob("*.json")
    npy = meta_path.with_suffix(".npy")
    np.save(npy, np.zeros_like(good))  # another computation's array under this key
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
        got = fx.section_features(enc, p, device="cpu", progress=False)
    assert "computed for other inputs (weights_sha256)" in caplog.text
    np.testing.assert_array_equal(got, good)
    np.save(npy, np.zeros((3, 512), np.float32))  # wrong shape
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
        np.testing.assert_array_equal(fx.section_features(enc, p, device="cpu", progress=False), good)
    assert "expected float32 (6, 512)" in caplog.text


def test_patch_cache_entries_are_identified_by_their_key(tmp_path):
    """A patch-cache memory map is named by its cache key (no hashing of the pixels)."""
    key = "C9_224px_c999_0123456789abcdef_aaaaaaaaaaaa"
    arr = np.lib.format.open_memmap(tmp_path / f"{key}.npy", mode="w+", dtype=np.uint8,
                                    shape=(2, 4, 4, 3))
    del arr
    (tmp_path / f"{key}.json").write_text(json.dumps({"key": key, "created": "t0", "n_spots": 2}))
    mm = np.load(tmp_path / f"{key}.npy", mmap_mode="r")
    assert fx.patch_identity(mm) == f"patch-cache:{key}:t0"
    assert fx.patch_identity(np.array(mm)).startswith("pixels:")


def test_views_are_the_dihedral_group():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = {fx.apply_view(x, v).numpy().tobytes() for v in range(fx.N_VIEWS)}
    assert len(seen) == 8
    assert torch.equal(fx.apply_view(x, 0), x)
    assert torch.equal(fx.apply_view(x, 2), torch.flip(x, dims=(-2, -1)))
    with pytest.raises(ValueError, match="view must be an integer from 0 to 7"):
        fx.apply_view(x, 8)


def test_spot_features_stack_sections_and_views(cache):
    data = synthetic_spotdata(size=32)
    enc = _encoder()
    bank = fx.spot_features(enc, data, views=2, device="cpu", progress=False)
    assert bank.shape == (2, len(data), 512)
    first = data.patches[0]
    np.testing.assert_allclose(bank[1, :len(first)].numpy(), _direct(enc, np.asarray(first), 1),
                               rtol=1e-4, atol=1e-5)
    assert len(list(cache.glob("*.json"))) == 2 * len(data.sections)
    with pytest.raises(ValueError, match="views must be a count from 1 to 8"):
        fx.spot_features(enc, data, views=0)


def test_frozen_training_reads_the_cache_and_embeds_like_the_pixel_path(cache):
    """Frozen training and prediction use the cached features; the image embeddings equal
    those of the full pixel path through the same (frozen) encoder."""
    data = synthetic_spotdata(size=32)
    res = tr.train(data, tiny_config(FROZEN), progress=False)
    assert all(np.isfinite(h["loss"]) for h in res.history)
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == len(data.sections)
    cached = tr.embed_images(res.model, data, device="cpu", progress=False)
    assert sorted(cache.glob("*.json")) == entries  # reused, nothing new
    pixel = embed._batched(res.model, data, tr.TrainConfig(device="cpu"), torch.device("cpu"), 64,
                        False, "").numpy()
    np.testing.assert_allclose(cached, pixel, rtol=1e-4, atol=1e-4)


def test_frozen_training_with_views_is_reproducible(cache):
    data = synthetic_spotdata(size=32)
    a = tr.train(data, tiny_config(FROZEN, feature_views=4), progress=False)
    b = tr.train(data, tiny_config(FROZEN, feature_views=4), progress=False)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert len(list(cache.glob("*.json"))) == 4 * len(data.sections)


def test_frozen_mode_needs_a_frozen_encoder():
    data = synthetic_spotdata(size=32)
    model = mdl.MclSTExp(data.n_genes, image_arch="resnet18", weights=None, n_pos=16)
    with pytest.raises(ValueError, match="freeze_image=True"):
        tr.train(data, tiny_config(FROZEN), model=model, progress=False)


def test_color_features_are_cached_per_section(cache):
    """SYNTHETIC patches: the colour/stain statistics of a section are computed once,
    kept as float64, and equal the direct computation."""
    from mclstexp_lite import _baselines as bl

    p = _patches(n=5)
    first = bl.section_color_features(p, name="S1")
    np.testing.assert_array_equal(first, bl.color_features(p))
    assert first.dtype == np.float64 and len(list(cache.glob("S1_color_*.json"))) == 1
    again = bl.section_color_features(p, name="S1")
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, first)


def test_frozen_training_resumes_to_the_same_weights(cache, tmp_path):
    """SYNTHETIC: a frozen run with random views, stopped after 2 epochs and resumed to 3,
    ends with exactly the weights of an uninterrupted 3-epoch run."""
    data = synthetic_spotdata(size=32)
    whole = tr.train(data, tiny_config(FROZEN, epochs=3, feature_views=2), progress=False)
    run = tmp_path / "run"
    tr.train(data, tiny_config(FROZEN, epochs=2, feature_views=2), out_dir=run, progress=False)
    resumed = tr.train(data, tiny_config(FROZEN, epochs=3, feature_views=2), out_dir=run,
                       resume=True, progress=False)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]


def test_encoder_kwargs_are_part_of_the_key(cache):
    """The same weights built with other timm arguments (here max instead of average
    pooling) give other features, so they never share an entry."""
    torch.manual_seed(0)
    avg = mdl.ImageEncoder("timm:test_resnet", weights=None, freeze=True, image_size=64).eval()
    torch.manual_seed(0)
    mx = mdl.ImageEncoder("timm:test_resnet", weights=None, freeze=True, image_size=64,
                          encoder_kwargs={"global_pool": "max"}).eval()
    assert avg.fingerprint() == mx.fingerprint()
    p = _patches(size=64)  # a final feature map larger than 1 x 1: max != average
    a = fx.section_features(avg, p, device="cpu", progress=False)
    b = fx.section_features(mx, p, device="cpu", progress=False)
    assert len(list(cache.glob("*.json"))) == 2 and not np.allclose(a, b)
    with pytest.raises(TypeError, match="encoder_kwargs must hold JSON values"):
        mdl.ImageEncoder("timm:test_resnet", weights=None, encoder_kwargs={"act_layer": torch.nn.ReLU})


def test_slices_of_a_patch_cache_entry_are_not_the_entry(tmp_path):
    key = "C9_224px_c999_0123456789abcdef_aaaaaaaaaaaa"
    arr = np.lib.format.open_memmap(tmp_path / f"{key}.npy", mode="w+", dtype=np.uint8,
                                    shape=(4, 2, 2, 3))
    arr[:] = np.arange(48, dtype=np.uint8).reshape(4, 2, 2, 3)
    del arr
    (tmp_path / f"{key}.json").write_text(json.dumps({"key": key, "created": "t0", "n_spots": 4}))
    mm = np.load(tmp_path / f"{key}.npy", mmap_mode="r")
    assert fx.patch_identity(mm) == fx.patch_identity(mm[0:4]) == f"patch-cache:{key}:t0"
    ids = {fx.patch_identity(v) for v in (mm[:2], mm[2:], mm[::-1])}
    assert len(ids) == 3 and all(i.startswith("pixels:") for i in ids)


# -------------------------------- resizing and gathering batches (from test_train.py)
@pytest.mark.parametrize("n", [1, 7, 8, 19])
def test_grouped_resize_is_bitwise_equal_to_whole_batch(n):
    """SYNTHETIC uint8 patches: resizing a few images at a time (for speed on the CPU)
    gives exactly the whole-batch float32 resize, whatever the batch size."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)
    whole = F.interpolate(x.float(), size=(64, 64), mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    got = fx.resize_u8(x, 64)
    assert got.dtype == torch.uint8 and got.shape == (n, 3, 64, 64)
    assert torch.equal(got, whole)


def test_batch_images_gathers_and_resizes_in_groups_bitwise():
    """SYNTHETIC: gathering and resizing a few spots at a time equals gathering the
    whole batch and resizing it, for batches across sections, with repeats."""
    data = synthetic_spotdata(size=32)
    idx = np.array([21, 3, 3, 17, 0, 9, 12, 11, 20, 5, 14])  # 11 spots: groups of 8 + 3
    whole = fx.resize_u8(data.images(idx), 16)
    assert torch.equal(fx.batch_images(data, idx, 16, torch.device("cpu")), whole)
    # no resize needed: the plain gather, in the requested memory format
    same = fx.batch_images(data, idx, 32, None, memory_format=torch.channels_last)
    assert torch.equal(same, data.images(idx))
    assert same.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------- damaged cache entries (from test_bad_input.py)
def test_unreadable_feature_cache_is_recomputed_with_a_warning(trained_run, tmp_path, caplog):
    """SYNTHETIC patches: a damaged feature-cache entry (empty, not an array, or a
    half-written one without its JSON) is never used; it is recomputed with a warning."""
    from mclstexp_lite import features as fx

    model = tr.load_model(trained_run)
    patches = synthetic_spotdata().patches[0]
    enc = model.image_encoder
    expected = fx.section_features(enc, patches, device="cpu", cache_dir=False, progress=False)
    cache = tmp_path / "features"
    fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0", progress=False)
    (npy,) = cache.glob("*.npy")
    for content in (b"", b"not a numpy file"):
        npy.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
            got = fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0",
                                      progress=False)
        assert "cannot read feature cache entry" in caplog.text and str(npy) in caplog.text
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(np.load(npy), expected)  # rewritten, readable
    npy.with_suffix(".json").unlink()  # an interrupted write: array without its JSON
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
        fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0",
                            progress=False)
    assert "interrupted write" in caplog.text
