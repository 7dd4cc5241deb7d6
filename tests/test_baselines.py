"""Baselines: the mean predictor, ridge regression, colour/stain features, frozen
encoder features, and their runs through cv.run_cv on the same folds.

Data are SYNTHETIC (seeded random arrays; tiny random sections from
tests/factories.py::synthetic_sections); every expected value comes from a plain NumPy
or scikit-image computation written out here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mclstexp_lite import _baselines as bl
from mclstexp_lite import cv
from mclstexp_lite import train as tr
from mclstexp_lite import _embed as embed

from .factories import PATIENTS, RUN, SPOTS, synthetic_sections, tiny_config


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    torch.set_num_threads(2)
    return synthetic_sections(tmp_path_factory.mktemp("synthetic_images"), seed=1)


# ============================================================================= mean
def test_mean_expression_is_the_column_mean():
    rng = np.random.default_rng(0)
    X = rng.random((50, 7)).astype(np.float32)
    np.testing.assert_array_equal(bl.mean_expression(X), X.astype(np.float64).sum(0) / 50)
    from scipy import sparse

    np.testing.assert_allclose(bl.mean_expression(sparse.csr_matrix(X)), X.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        bl.mean_expression(X[0])
    with pytest.raises(ValueError, match="no spots"):
        bl.mean_expression(X[:0])


def test_mean_baseline_run_predicts_the_training_mean(sections, tmp_path):
    import anndata as ad

    out = tmp_path / "mean"
    df = cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(),
                   out_dir=out, **RUN)
    for fold in cv.load_folds(out):
        train = np.concatenate([np.asarray(sections[s].X, dtype=np.float64)
                                for s in fold.train])
        expected = (train.sum(axis=0) / train.shape[0]).astype(np.float32)
        for s in fold.test:
            pred = ad.read_h5ad(out / fold.name / f"pred_{s}.h5ad")
            np.testing.assert_array_equal(pred.X, np.tile(expected, (SPOTS[s], 1)))
            assert all(PATIENTS[t] != fold.name for t in
                       pred.uns["mclstexp_prediction"]["train_sections"])
    # a constant prediction has no correlation; errors are still defined
    assert df["pcc_acg"].isna().all() and (df["mse"] > 0).all()


# ============================================================================ ridge
W_TRUE = np.random.default_rng(42).normal(size=(10, 5))


def _linear_problem(n, seed, noise=0.05):
    """SYNTHETIC: expression = features @ W_TRUE + 1 + noise, spots in 3 'sections'."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 10)) * rng.uniform(0.5, 5, 10) + rng.normal(size=10)
    Y = X @ W_TRUE + 1.0 + noise * rng.normal(size=(n, 5))
    return X, Y, np.repeat(["a", "b", "c"], n // 3 + 1)[:n]


def test_ridge_recovers_a_linear_map():
    X, Y, groups = _linear_problem(300, 0)
    Xt, Yt, _ = _linear_problem(200, 1, noise=0.0)
    model = bl.fit_ridge(X, Y, groups=groups)
    pred = model.predict(Xt)
    r = [np.corrcoef(pred[:, g], Yt[:, g])[0, 1] for g in range(5)]
    assert min(r) > 0.99
    assert model[-1].alpha_ <= 1.0  # almost noise-free: a small penalty wins
    # a map that ignores the features (mean of Y) is far worse: the test can fail
    assert np.mean((pred - Yt) ** 2) < 0.01 * np.mean((Y.mean(0) - Yt) ** 2)


def test_ridge_matches_the_closed_form_on_standardised_features():
    X, Y, groups = _linear_problem(120, 2)
    model = bl.fit_ridge(X, Y, groups=groups, alphas=[3.0])
    mu, sd = X.mean(0), X.std(0)
    Z = (X - mu) / sd
    Yc = Y - Y.mean(0)
    coef = np.linalg.solve(Z.T @ Z + 3.0 * np.eye(Z.shape[1]), Z.T @ Yc)
    Xt = np.random.default_rng(5).normal(size=(7, 10))
    expected = ((Xt - mu) / sd) @ coef + Y.mean(0)
    np.testing.assert_allclose(model.predict(Xt), expected, rtol=1e-8, atol=1e-8)


def test_ridge_alpha_is_chosen_by_leaving_sections_out():
    """The chosen alpha is the one with the lowest leave-one-group-out MSE, checked
    against a plain loop over groups and alphas."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 20))
    Y = X[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(90, 3))  # noisy
    groups = np.repeat([0, 1, 2], 30)
    alphas = [0.1, 10.0, 1000.0]
    model = bl.fit_ridge(X, Y, groups=groups, alphas=alphas)
    Z = (X - X.mean(0)) / X.std(0)  # the scaler is fitted on all training spots
    errs = []
    for a in alphas:
        se = 0.0
        for g in range(3):
            tr_, te = groups != g, groups == g
            mz, my = Z[tr_].mean(0), Y[tr_].mean(0)
            c = np.linalg.solve((Z[tr_] - mz).T @ (Z[tr_] - mz) + a * np.eye(20),
                                (Z[tr_] - mz).T @ (Y[tr_] - my))
            se += np.mean(((Z[te] - mz) @ c + my - Y[te]) ** 2)
        errs.append(se / 3)
    assert model[-1].alpha_ == alphas[int(np.argmin(errs))]


def test_ridge_penalty_at_the_grid_edge_is_logged(caplog):
    """SYNTHETIC: pure-noise targets want the largest penalty; the fit says the grid
    may be too small. An interior choice logs nothing."""
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(90, 20)), rng.normal(size=(90, 3))
    groups = np.repeat([0, 1, 2], 30)
    with caplog.at_level("WARNING", logger="mclstexp_lite._baselines"):
        model = bl.fit_ridge(X, Y, groups=groups, alphas=[0.1, 1.0, 10.0])
    assert model[-1].alpha_ == 10.0
    assert "alpha=10 is the largest of the 3 searched" in caplog.text
    caplog.clear()
    Y = X[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(90, 3))  # signal + noise
    with caplog.at_level("WARNING", logger="mclstexp_lite._baselines"):
        model = bl.fit_ridge(X, Y, groups=groups)
    assert min(bl.DEFAULT_ALPHAS) < model[-1].alpha_ < max(bl.DEFAULT_ALPHAS)
    assert caplog.text == ""


def test_ridge_at_the_largest_penalty_that_predicts_the_mean_is_no_warning(caplog):
    """SYNTHETIC pure noise with the default grid: the largest penalty wins and already
    flattens the fit to the training mean, so a wider grid could change nothing; an
    info line says so instead of a warning (notebook 03's ridge_color on two sections)."""
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(90, 20)), rng.normal(size=(90, 3))
    groups = np.repeat([0, 1, 2], 30)
    with caplog.at_level("INFO", logger="mclstexp_lite._baselines"):
        model = bl.fit_ridge(X, Y, groups=groups)
    assert model[-1].alpha_ == max(bl.DEFAULT_ALPHAS)
    assert np.ptp(model.predict(X), axis=0).max() < 0.01 * Y.std(axis=0).min()
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "the fit is the training mean" in caplog.text


def test_default_alphas_extend_the_old_grid_exactly():
    old = np.logspace(-2, 5, 15)
    assert set(old.tolist()) <= set(bl.DEFAULT_ALPHAS)  # the same floats, not just close
    assert max(bl.DEFAULT_ALPHAS) == 1e7 and len(bl.DEFAULT_ALPHAS) == 19


def test_ridge_errors():
    X, Y, _ = _linear_problem(30, 0)
    with pytest.raises(ValueError, match="one row per training spot"):
        bl.fit_ridge(X[:10], Y)
    with pytest.raises(ValueError, match="alphas"):
        bl.fit_ridge(X, Y, alphas=[0.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        bl.fit_ridge(np.where(X > 2, np.nan, X), Y)
    with pytest.raises(ValueError, match="one label per spot"):
        bl.fit_ridge(X, Y, groups=np.zeros(3))


# ========================================================================= features
def test_color_features_of_a_constant_patch():
    from skimage.color import rgb2hed

    colour = np.array([200, 120, 180], dtype=np.uint8)  # pinkish H&E-like
    patches = np.broadcast_to(colour, (2, 16, 16, 3)).copy()
    f = bl.color_features(patches)
    assert f.shape == (2, 30) and len(bl.COLOR_FEATURE_NAMES) == 30
    named = dict(zip(bl.COLOR_FEATURE_NAMES, f[0]))
    hed = rgb2hed(colour[None, None, :] / 255.0)[0, 0]
    for i, c in enumerate("RGB"):
        assert named[f"{c}_mean"] == pytest.approx(colour[i] / 255.0)
    for i, c in enumerate("HED"):
        assert named[f"{c}_mean"] == pytest.approx(hed[i])
    for c in "RGBHED":
        assert named[f"{c}_sd"] == pytest.approx(0.0, abs=1e-12)
        for p in (10, 50, 90):
            assert named[f"{c}_p{p}"] == pytest.approx(named[f"{c}_mean"])
    assert named["H_mean"] > 0  # a stained pixel has positive haematoxylin density


def test_color_features_match_a_plain_per_patch_computation():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)  # 63 px: interpolated pct
    patches[1] = rng.choice(np.array([0, 1, 254, 255], dtype=np.uint8), (7, 9, 3))  # extremes
    patches[2, :4] = 255  # mostly white
    f = bl.color_features(patches, batch_size=2)
    # histogram statistics and the threads do not change the result
    np.testing.assert_array_equal(f, bl.color_features(patches, batch_size=3, threads=1))
    np.testing.assert_array_equal(f, bl.color_features(patches, threads=3))
    assert bl.color_features(patches[:0]).shape == (0, 30)
    for i, patch in enumerate(patches):
        rgb = patch / 255.0
        chans = np.concatenate([rgb, rgb2hed(rgb)], axis=-1).reshape(-1, 6)
        expected = np.concatenate([chans.mean(0), chans.std(0)]
                                  + [np.percentile(chans, p, axis=0) for p in (10, 50, 90)])
        np.testing.assert_allclose(f[i], expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        bl.color_features(patches.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        bl.color_features(patches[..., :2])


def test_encoder_features_are_the_untrained_encoder_of_the_config():
    data = _spotdata()
    cfg = tiny_config()
    f = bl.encoder_features(data, config=cfg, device="cpu")
    assert f.shape == (len(data), 512) and f.dtype == np.float32
    torch.manual_seed(cfg.seed)
    model = tr.build_model(cfg, data.n_genes).eval()
    x = embed.prepare_images(data.images(np.arange(len(data))), model.image_encoder, cfg,
                           train=False, generator=None, channels_last=False)
    with torch.no_grad():
        expected = model.image_encoder(x).numpy()
    # the feature cache computes channels-last: the same numbers up to float32 rounding
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    other = bl.encoder_features(data, config=tiny_config(seed=1), device="cpu")
    assert not np.allclose(f, other)


def _spotdata(n=10, size=32, genes=4, seed=0):
    """SYNTHETIC SpotData of one section."""
    rng = np.random.default_rng(seed)
    return tr.SpotData(patches=[rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)],
                       expr=rng.random((n, genes), dtype=np.float32),
                       pos=rng.integers(0, 8, (n, 2)), groups=np.zeros(n, dtype=np.int64),
                       sections=["S"], genes=[f"g{i}" for i in range(genes)],
                       obs_names=[f"s{i}" for i in range(n)])


# =================================================================== through run_cv
@pytest.mark.parametrize("method", ["ridge_color", "ridge_features"])
def test_ridge_baselines_run_on_the_same_folds(method, sections, tmp_path):
    out = tmp_path / method
    df = cv.run_cv(sections, scheme="patient", method=method, config=tiny_config(),
                   out_dir=out, **RUN)
    assert list(df.columns) == list(cv.ROW_COLUMNS)
    assert sorted(df["test_section"]) == sorted(SPOTS) and (df["method"] == method).all()
    width = 30 if method == "ridge_color" else 512
    for fold in cv.load_folds(out):
        z = np.load(out / fold.name / "embeddings.npz")
        assert z["train"].shape == (sum(SPOTS[s] for s in fold.train), width)
        assert set(z["train_sections"].tolist()) == set(fold.train)
        assert all(PATIENTS[s] != fold.name for s in z["train_sections"].tolist())
        rec = json.loads((out / fold.name / "metrics.json").read_text())
        assert rec["ridge_alpha"] in bl.DEFAULT_ALPHAS
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["top_k"] is None and cfg["baseline"]["alphas"] == list(bl.DEFAULT_ALPHAS)
