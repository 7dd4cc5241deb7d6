"""Stain normalisation (mclstexp_lite._stain) and its patch-cache / cross-validation option.

All images here are SYNTHETIC: Beer-Lambert mixtures of two made-up stain colours with
random per-pixel concentrations ("H&E-like" in colour only, no tissue structure), small
(32 px) so the file runs in seconds. The real-data check is tools/stain_a1.py
(docs/results.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mclstexp_lite import cv, features, _stain as stain
from mclstexp_lite import patches as pt
from mclstexp_lite import train as tr

#: SYNTHETIC stain optical-density vectors (rows: haematoxylin-like, eosin-like; R, G, B).
REF_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
#: A SYNTHETIC "other lab": bluer haematoxylin, paler, more orange eosin.
SRC_STAINS = np.array([[0.80, 0.55, 0.22], [0.02, 0.85, 0.50]])


def synthetic_he(n, size=32, *, stains=REF_STAINS, h=(0.3, 1.4), e=(0.2, 0.9), white=0.1, seed=0):
    """SYNTHETIC uint8 (n, size, size, 3) patches: I = 240 * exp(-c_H * s_H - c_E * s_E)."""
    rng = np.random.default_rng(seed)
    s = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.stack([rng.uniform(*h, (n, size, size)), rng.uniform(*e, (n, size, size))], -1)
    conc[rng.random((n, size, size)) < white] = 0.0  # glass
    rgb = 240.0 * np.exp(-(conc @ s))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _mean_rgb(x):
    return x.reshape(-1, 3).astype(float).mean(0)


@pytest.fixture(scope="module")
def ref():
    return synthetic_he(12, seed=1)


@pytest.fixture(scope="module")
def src():
    return synthetic_he(6, stains=SRC_STAINS, h=(0.2, 0.9), seed=2)


# ============================================================================ fit / transform
@pytest.mark.parametrize("method", stain.METHODS)
def test_normalisation_moves_other_stain_towards_reference(method, ref, src):
    norm = stain.StainNormalizer(method).fit(ref, description="synthetic")
    out = norm.transform(src)
    assert out.shape == src.shape and out.dtype == np.uint8
    assert norm.last_stats == {"n": 6, "normalised": 6, "low_tissue": 0, "failed": 0}
    before = np.abs(_mean_rgb(src) - _mean_rgb(ref)).sum()
    after = np.abs(_mean_rgb(out) - _mean_rgb(ref)).sum()
    assert after < 0.5 * before, (method, before, after)
    # the reference itself barely moves
    same = norm.transform(ref[:3])
    assert np.abs(_mean_rgb(same) - _mean_rgb(ref[:3])).sum() < 0.5 * before
    assert norm.reference["n_patches"] == 12 and norm.reference["description"] == "synthetic"


def test_macenko_recovers_the_reference_stain_vectors(ref):
    norm = stain.StainNormalizer("macenko").fit(ref)
    he = np.asarray(norm.to_dict()["fitted"]["stain_matrix"])  # (3, 2): columns H, E
    truth = (REF_STAINS / np.linalg.norm(REF_STAINS, axis=1, keepdims=True)).T
    cos = (he * truth).sum(0) / np.linalg.norm(he, axis=0)
    assert (cos > 0.98).all(), cos


def test_transform_writes_into_out_and_reads_memmaps_in_batches(ref, src, tmp_path):
    norm = stain.StainNormalizer("reinhard").fit(ref)
    np.save(tmp_path / "p.npy", src)
    mm = np.load(tmp_path / "p.npy", mmap_mode="r")
    dest = np.zeros_like(src)
    got = norm.transform(mm, out=dest, batch_size=4)
    assert got is dest
    np.testing.assert_array_equal(dest, norm.transform(src, batch_size=100))
    assert norm(src[:1]).shape == (1, 32, 32, 3)


# ============================================================================ awkward patches
def test_near_empty_and_black_patches_are_left_unchanged(ref):
    norm = stain.StainNormalizer("macenko").fit(ref)
    white = np.full((32, 32, 3), 245, np.uint8)
    black = np.zeros((32, 32, 3), np.uint8)
    speck = black.copy()
    speck[:4, :4] = ref[0, :4, :4]  # 16 of 1,024 pixels tissue: 1.6 % < min_tissue 5 %
    flat = np.full((32, 32, 3), (150, 90, 160), np.uint8)  # tissue-coloured but one colour
    batch = np.stack([white, black, speck, flat])
    out = norm.transform(batch)
    np.testing.assert_array_equal(out, batch)
    assert norm.last_stats == {"n": 4, "normalised": 0, "low_tissue": 3, "failed": 1}
    r = stain.StainNormalizer("reinhard").fit(ref)
    out = r.transform(batch)
    np.testing.assert_array_equal(out[:3], batch[:3])
    # a flat patch has no colour spread (Reinhard would divide by a zero sd): unchanged
    np.testing.assert_array_equal(out[3], flat)
    assert r.last_stats == {"n": 4, "normalised": 0, "low_tissue": 3, "failed": 1}


@pytest.mark.parametrize("method", stain.METHODS)
def test_black_background_is_kept_and_not_used(method, ref, src):
    """A1-like patch: half black background, half tissue of another stain."""
    norm = stain.StainNormalizer(method).fit(ref)
    patch = src[:1].copy()
    patch[0, :, :16] = 0
    out = norm.transform(patch)
    np.testing.assert_array_equal(out[0, :, :16], 0)
    # the tissue half is normalised exactly as the tissue alone would be
    alone = norm.transform(np.ascontiguousarray(src[:1, :, 16:]))
    np.testing.assert_array_equal(out[0, :, 16:], alone[0])
    assert not np.array_equal(out[0, :, 16:], src[0, :, 16:])


def test_fit_refuses_patches_without_tissue():
    with pytest.raises(ValueError, match="only 0 stained tissue pixels.*reference_patches"):
        stain.StainNormalizer("macenko").fit(np.zeros((3, 32, 32, 3), np.uint8))


def test_reference_patches_are_deterministic_and_balanced(ref, src):
    empty = np.full((5, 32, 32, 3), 250, np.uint8)
    a = stain.reference_patches({"big": np.concatenate([ref, empty]), "small": src}, per_section=4)
    b = stain.reference_patches([np.concatenate([ref, empty]), src], per_section=4)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 8
    # the empty patches are never chosen while enough tissue patches exist
    assert not any(np.array_equal(p, empty[0]) for p in a)
    # evenly spaced rows of the 12 tissue patches: 0, 4, 7, 11
    np.testing.assert_array_equal(a[:4], ref[[0, 4, 7, 11]])
    assert len(stain.reference_patches([src], per_section=50)) == 6


# ============================================================================ identity
@pytest.mark.parametrize("method", stain.METHODS)
def test_dict_round_trip_keeps_the_transform(method, ref, src):
    norm = stain.StainNormalizer(method, min_tissue=0.1).fit(ref)
    d = json.loads(json.dumps(norm.to_dict()))  # plain JSON types only
    back = stain.StainNormalizer.from_dict(d)
    assert back.fingerprint == norm.fingerprint and len(norm.fingerprint) == 12
    assert back.settings() == norm.settings() and back.method == method
    np.testing.assert_array_equal(back.transform(src), norm.transform(src))
    values = [v for col in d["fitted"].values() for v in np.ravel(col)]
    assert all(isinstance(v, float) for v in values)


def test_fingerprint_tells_fits_apart(ref, src):
    a = stain.StainNormalizer("macenko").fit(ref)
    assert stain.StainNormalizer("macenko").fit(ref, description="other words").fingerprint == a.fingerprint
    assert stain.StainNormalizer("macenko").fit(src).fingerprint != a.fingerprint
    assert stain.StainNormalizer("macenko", beta=0.2).fit(ref).fingerprint != a.fingerprint
    assert stain.StainNormalizer("reinhard").fit(ref).fingerprint != a.fingerprint


# ============================================================================ bad input
def test_bad_input_names_the_parameter_and_the_fix(ref):
    with pytest.raises(ValueError, match=r"method must be one of \('macenko', 'reinhard'\).*'vahadane'"):
        stain.StainNormalizer("vahadane")
    norm = stain.StainNormalizer("macenko")
    with pytest.raises(RuntimeError, match=r"not fitted.*\.fit\(reference_patches\)"):
        norm.transform(ref)
    with pytest.raises(RuntimeError, match="not fitted"):
        norm.to_dict()
    norm.fit(ref)
    with pytest.raises(TypeError, match=r"patches must have dtype uint8.*astype\(np.uint8\)"):
        norm.transform(ref.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"one patch of shape \(32, 32, 3\).*patches\[None\]"):
        norm.transform(ref[0])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*transpose\(0, 2, 3, 1\)"):
        norm.transform(np.ascontiguousarray(ref.transpose(0, 3, 1, 2)))
    with pytest.raises(TypeError, match="patches must be a numpy uint8 array"):
        norm.transform(ref.tolist())
    with pytest.raises(ValueError, match="out must be a uint8 array of shape"):
        norm.transform(ref, out=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 50\)"):
        stain.StainNormalizer("macenko", alpha=0)
    with pytest.raises(ValueError, match="black_level must be an integer 0..255"):
        stain.StainNormalizer("reinhard", black_level=300)
    with pytest.raises(ValueError, match=r"d lacks \['fitted'\]"):
        stain.StainNormalizer.from_dict({"format": 1, "method": "macenko", "settings": {}})
    bad = norm.to_dict()
    bad["fitted"]["max_concentrations"] = [1.0, float("nan")]
    with pytest.raises(ValueError, match="Macenko fit is unusable"):
        stain.StainNormalizer.from_dict(bad)


# ============================================================================ patch cache
@pytest.fixture()
def section(tmp_path):
    """A SYNTHETIC section: a 160 px stained image (1 um/px) with 6 spots."""
    import anndata as ad
    from PIL import Image

    img = synthetic_he(1, 160, stains=SRC_STAINS, seed=3)[0]
    path = tmp_path / "S1.png"
    Image.fromarray(img).save(path)
    a = ad.AnnData(X=np.ones((6, 3), np.float32))
    a.obs_names = [f"s{i}" for i in range(6)]
    a.var_names = ["g0", "g1", "g2"]
    a.obs["section"] = pd.Categorical(["S1"] * 6)
    a.obs["patient"] = pd.Categorical(["P"] * 6)
    a.obs["array_x"] = np.arange(6)
    a.obs["array_y"] = np.arange(6)
    a.obsm["spatial"] = np.array([[30, 30], [60, 40], [90, 50], [120, 60], [50, 120], [110, 110]], float)
    a.uns["spatial"] = {"S1": {"metadata": {"source_image_path": str(path), "source_image_sha256": "",
                                            "um_per_px": 1.0}}}
    return a


GEOM = dict(patch_um=32.0, out_size=32, progress=False)


def test_stained_cache_entry_is_separate_keyed_and_reused(section, ref, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    norm = stain.StainNormalizer("macenko").fit(ref)
    plain = pt.patch_cache(section, cache_dir=cache, **GEOM)
    stained = pt.patch_cache(section, cache_dir=cache, stain=norm, **GEOM)
    assert stained.shape == plain.shape and stained.dtype == np.uint8
    assert Path(stained.filename).parent == cache / "stained"
    assert not np.array_equal(stained, plain)
    np.testing.assert_array_equal(stained, norm.transform(np.asarray(plain)))
    meta = json.loads(Path(section.uns["mclstexp"]["patches"]["json"]).read_text())
    assert meta["stain_fingerprint"] == norm.fingerprint and meta["key"].endswith(f"macenko-{norm.fingerprint}")
    assert meta["stain_stats"]["n"] == 6 and meta["source_entry"] == Path(plain.filename).stem
    assert section.uns["mclstexp"]["patches"]["params"]["stain"] == {"method": "macenko",
                                                                     "fingerprint": norm.fingerprint}
    # features are keyed on the entry: normalised and plain patches are told apart
    assert features.patch_identity(stained) != features.patch_identity(plain)
    assert norm.fingerprint in features.patch_identity(stained)

    # a second call reuses the entry without normalising again
    def boom(*a, **k):
        raise AssertionError("normalised again")

    monkeypatch.setattr(stain.StainNormalizer, "transform", boom)
    again = pt.patch_cache(section, cache_dir=cache, stain=stain.StainNormalizer.from_dict(norm.to_dict()), **GEOM)
    assert again.filename == stained.filename
    np.testing.assert_array_equal(again, stained)
    monkeypatch.undo()

    # another normaliser, another entry; the plain entry is untouched and still the plain one
    other = pt.patch_cache(section, cache_dir=cache, stain=stain.StainNormalizer("reinhard").fit(ref), **GEOM)
    assert other.filename != stained.filename
    np.testing.assert_array_equal(pt.patch_cache(section, cache_dir=cache, **GEOM), plain)
    # a spot subset is copied from the plain entry, never from a stained one
    sub = section[[0, 2, 4]].copy()
    np.testing.assert_array_equal(pt.patch_cache(sub, cache_dir=cache, **GEOM), np.asarray(plain)[[0, 2, 4]])


def test_stale_stained_entry_is_rebuilt(section, ref, tmp_path, caplog):
    cache = tmp_path / "cache"
    norm = stain.StainNormalizer("reinhard").fit(ref)
    first = pt.patch_cache(section, cache_dir=cache, stain=norm, **GEOM)
    json_path = Path(first.filename).with_suffix(".json")
    meta = json.loads(json_path.read_text())
    meta["source_created"] = "1999-01-01T00:00:00+00:00"  # as if the plain entry had been rebuilt
    json_path.write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        again = pt.patch_cache(section, cache_dir=cache, stain=norm, **GEOM)
    assert "does not match (source_created)" in caplog.text
    np.testing.assert_array_equal(again, first)


def test_patch_cache_and_spotdata_take_a_fitted_normaliser(section, ref, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(TypeError, match=r"got the string 'macenko'.*fit_on_sections"):
        pt.patch_cache(section, cache_dir=cache, stain="macenko", **GEOM)
    with pytest.raises(ValueError, match="stain is not fitted"):
        pt.patch_cache(section, cache_dir=cache, stain=stain.StainNormalizer("macenko"), **GEOM)
    norm = stain.StainNormalizer("reinhard").fit(ref)
    data = tr.SpotData.from_anndata({"S1": section}, patch_um=32.0, patch_size=32, cache_dir=cache,
                                    progress=False, stain=norm)
    np.testing.assert_array_equal(data.patches[0], pt.patch_cache(section, cache_dir=cache, stain=norm, **GEOM))
    fitted = stain.fit_on_sections({"S1": section}, "reinhard", per_section=3, patch_um=32.0,
                                   out_size=32, cache_dir=cache)
    assert fitted.reference["sections"] == ["S1"] and fitted.reference["n_patches"] == 3


# ============================================================================ cross-validation
def test_run_cv_fits_per_fold_and_records_the_setting(tmp_path):
    from .factories import RUN, synthetic_sections, tiny_config

    sections = synthetic_sections(tmp_path / "img", spots={"S1": 10, "S2": 9, "S3": 8},
                                  patients={"S1": "P", "S2": "Q", "S3": "R"}, genes=4)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="method must be one of"):
        cv.run_cv(sections, scheme="section", method="mclstexp", config=tiny_config(),
                  out_dir=out, folds=["S3"], stain="sepia", **RUN)
    cv.run_cv(sections, scheme="section", method="mclstexp", config=tiny_config(), out_dir=out,
              folds=["S3"], stain="reinhard", **RUN)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stain"]["method"] == "reinhard"
    fold = json.loads((out / "S3" / "metrics.json").read_text())
    back = stain.StainNormalizer.from_dict(fold["stain"])
    assert back.reference["sections"] == ["S1", "S2"]  # the fold's training sections only
    with pytest.raises(ValueError, match="different configuration"):
        cv.run_cv(sections, scheme="section", method="mclstexp", config=tiny_config(), out_dir=out,
                  folds=["S1"], **RUN)
