"""Baselines that mclSTExp must beat, run on the same folds with the same metrics.

Every baseline predicts a held-out section from the training sections only, and is
run through :func:`mclstexp_lite.cv.run_cv` (``method=...``), so its numbers sit in the
same table as mclSTExp's:

``"mean"``
    Every test spot gets the mean expression of all training spots
    (:func:`mean_expression`). No image is used: a model that cannot beat this has
    learnt nothing spot-specific. Its per-gene Pearson correlation is undefined (a
    constant prediction), so PCC-ACG and PCC-HEG are NaN; MSE and MAE are the
    reference errors.
``"ridge_features"``
    The linear probe of HEST-Benchmark / STP-Bench: ridge regression from the frozen
    image encoder's pooled features of each patch to expression
    (:func:`encoder_features`, :func:`fit_ridge`). The encoder is the one the training
    config describes (architecture, weights, input size), built with the config's seed,
    i.e. exactly the image encoder mclSTExp *starts* from, and its features come from
    the same on-disk feature cache (:mod:`mclstexp_lite.features`) as a frozen
    mclSTExp's: in the ``quick`` profile both read the *same* EfficientNet-Lite0
    ImageNet features. With ``weights=None`` the encoder is randomly initialised and the
    features are random projections of the image.
``"ridge_color"``
    Ridge regression from simple colour and stain statistics of each patch
    (:func:`color_features`): per channel the mean, standard deviation and 10th, 50th
    and 90th percentiles of the RGB values (scaled to [0, 1]) and of the haematoxylin,
    eosin and DAB optical densities of a colour deconvolution
    (``skimage.color.rgb2hed``, Ruifrok and Johnston's stain vectors); 30 features.
``"bleep"``
    Not here: the BLEEP-style contrastive model is
    ``MclSTExp(..., spot_encoder="none")`` trained with the same trainer and predicted
    with the same retrieval; :func:`mclstexp_lite.cv.run_cv` runs it with
    ``method="bleep"``.

Ridge details: features are standardised (``StandardScaler`` fitted on the training
spots) and the penalty is chosen over :data:`DEFAULT_ALPHAS` with leave-one-section-out
cross-validation **within the training sections** (mean squared error over all genes,
averaged over the held-out sections), so neighbouring, spatially correlated spots of one
section never sit on both sides of the alpha selection. Each split is solved once by an
eigendecomposition of its Gram matrix, which gives every penalty's fit at once (the same
fits as refitting :class:`sklearn.linear_model.Ridge` per penalty, and much faster on the
1,280 features of EfficientNet-Lite0). With a single training section :class:`~sklearn.linear_model.RidgeCV`'s
efficient leave-one-spot-out is used instead. One alpha is shared by all genes.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import _util

__all__ = [
    "METHODS",
    "DEFAULT_ALPHAS",
    "COLOR_FEATURE_NAMES",
    "mean_expression",
    "color_features",
    "section_color_features",
    "encoder_features",
    "fit_ridge",
    "ridge_fold",
    "RIDGE_METHODS",
]

#: Baselines implemented here (``"bleep"`` is a model variant, see the module notes).
METHODS = ("mean", "ridge_features", "ridge_color")
#: The ridge baselines (:func:`ridge_fold`).
RIDGE_METHODS = ("ridge_features", "ridge_color")

#: Ridge penalties searched by :func:`fit_ridge` (on standardised features): 1e-2 to
#: 1e7 in half decades. (Up to 1e5 before 2026-11-24; on random-encoder features the
#: choice reached that top in two folds, so the grid was extended.)
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 7, 19))

log = logging.getLogger(__name__)

_PERCENTILES = (10, 50, 90)
_CHANNELS = ("R", "G", "B", "H", "E", "D")
#: Names of the 30 columns of :func:`color_features`, in order.
COLOR_FEATURE_NAMES = tuple(
    [f"{c}_mean" for c in _CHANNELS]
    + [f"{c}_sd" for c in _CHANNELS]
    + [f"{c}_p{p}" for p in _PERCENTILES for c in _CHANNELS]
)


# ------------------------------------------------------------------------------ mean
def mean_expression(train_expr) -> np.ndarray:
    """Mean expression of the training spots, the ``"mean"`` baseline's prediction.

    Parameters
    ----------
    train_expr
        ``(n_spots, n_genes)`` expression of all training spots (stacked sections),
        dense array or scipy sparse matrix.

    Returns
    -------
    numpy.ndarray
        ``(n_genes,)`` float64 column means; every test spot is predicted as this.
    """
    X = _as_2d(train_expr, "train_expr")
    if X.shape[0] == 0:
        raise ValueError("`train_expr` has no spots; the mean baseline needs training data.")
    return X.mean(axis=0, dtype=np.float64)


# ----------------------------------------------------------------------- features
def color_features(patches, *, batch_size: int = 128, threads: int | None = None) -> np.ndarray:
    """Colour and H&E-stain statistics of each patch (30 features).

    Parameters
    ----------
    patches
        ``uint8`` array ``(n, H, W, 3)`` of RGB patches (e.g. a
        :func:`mclstexp_lite.patches.patch_cache` memory map).
    batch_size
        Patches read into memory at once (memory only; the result does not depend on it).
    threads
        Patches processed in parallel (NumPy releases the GIL); ``None``: up to 4, no
        more than the CPU count. The result does not depend on it.

    Returns
    -------
    numpy.ndarray
        ``(n, 30)`` float64, columns named by :data:`COLOR_FEATURE_NAMES`: for the
        channels R, G, B (values / 255) and H, E, D (``skimage.color.rgb2hed`` optical
        densities) the mean, the standard deviation (population, ``ddof=0``) and the
        10th, 50th and 90th percentiles (NumPy's default, linear interpolation) over the
        patch's pixels.

    Notes
    -----
    The R, G, B statistics come from each channel's 256-bin histogram, exact for 8-bit
    values; H, E and D are ``rgb2hed``'s formula (Ruifrok and Johnston's stain matrix
    ``skimage.color.hed_from_rgb`` applied to the optical densities) with the logarithm
    of the 256 possible values tabulated once. The result equals ``rgb2hed`` with
    ``numpy.mean`` / ``std`` / ``percentile`` per patch to ~1e-12 (summation order), in
    about a sixth of the time.

    Raises
    ------
    TypeError
        If ``patches`` is not a uint8 array.
    ValueError
        If its shape is not ``(n, H, W, 3)``.
    """
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from skimage.color import hed_from_rgb

    if not hasattr(patches, "dtype") or not hasattr(patches, "shape"):
        raise TypeError(f"`patches` must be a numpy uint8 array, got {type(patches).__name__}.")
    if patches.dtype != np.uint8:
        raise TypeError(f"`patches` must have dtype uint8 (RGB 0-255), got {patches.dtype}.")
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"`patches` must have shape (n, H, W, 3), got {tuple(patches.shape)}.")
    batch_size = _util.positive_int(batch_size, "`batch_size`")
    threads = (min(4, os.cpu_count() or 1) if threads is None
               else _util.positive_int(threads, "`threads`"))
    n = patches.shape[0]
    out = np.empty((n, len(COLOR_FEATURE_NAMES)), dtype=np.float64)
    one = partial(_patch_color_stats, stain_matrix=hed_from_rgb)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, n, batch_size):
            chunk = np.asarray(patches[start:start + batch_size])
            out[start:start + len(chunk)] = list(pool.map(one, chunk))
    return out


_VALUES_01 = np.arange(256, dtype=np.float64) / 255.0
# rgb2hed's optical density of each 8-bit value: log(max(v / 255, 1e-6)) / log(1e-6)
_OD_TABLE = np.log(np.maximum(_VALUES_01, 1e-6)) / np.log(1e-6)


def _lerp_percentiles(lo_vals, hi_vals, t):
    # NumPy's linear interpolation, including its form for t >= 0.5
    return np.where(t >= 0.5, hi_vals - (hi_vals - lo_vals) * (1 - t),
                    lo_vals + (hi_vals - lo_vals) * t)


def _patch_color_stats(patch: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """The 30 statistics of one ``(H, W, 3)`` uint8 patch, in COLOR_FEATURE_NAMES order
    (``stain_matrix``: skimage's ``hed_from_rgb``)."""
    flat = patch.reshape(-1, 3)
    n = flat.shape[0]
    q = np.asarray(_PERCENTILES, dtype=np.float64) / 100.0 * (n - 1)
    k_lo = np.floor(q).astype(np.int64)
    k_hi = np.minimum(k_lo + 1, n - 1)
    t = q - k_lo
    means, sds, pcts = [], [], []
    for c in range(3):  # R, G, B from histograms
        counts = np.bincount(flat[:, c], minlength=256).astype(np.float64)
        mean = counts @ _VALUES_01 / n
        means.append(mean)
        sds.append(np.sqrt(counts @ (_VALUES_01 - mean) ** 2 / n))
        cum = np.cumsum(counts)  # the k-th smallest value is the first with cum > k
        pcts.append(_lerp_percentiles(_VALUES_01[np.searchsorted(cum, k_lo, side="right")],
                                      _VALUES_01[np.searchsorted(cum, k_hi, side="right")], t))
    hed = _OD_TABLE[flat] @ stain_matrix
    np.maximum(hed, 0, out=hed)
    hed = np.ascontiguousarray(hed.T)  # (3, pixels)
    means.extend(hed.mean(axis=1))
    sds.extend(hed.std(axis=1))
    pcts.extend(np.percentile(hed, _PERCENTILES, axis=1).T)
    pct = np.asarray(pcts)  # (6 channels, 3 percentiles)
    return np.concatenate([means, sds, pct.T.ravel()])


def section_color_features(patches, *, name: str = "section", cache_dir=None) -> np.ndarray:
    """:func:`color_features` of one section's patches, cached on disk.

    The statistics of a patch never change, so they are computed once per patch-cache
    entry and kept in the feature cache (:func:`mclstexp_lite.features.cached_array`,
    float64, keyed by the patch entry and the feature definition) instead of again in
    every fold.
    """
    from . import features as fx

    identity = {"format": 1, "patches": fx.patch_identity(patches),
                "n_spots": int(len(patches)), "features": "color and H&E-stain statistics",
                "columns": list(COLOR_FEATURE_NAMES)}
    return fx.cached_array(identity, lambda: color_features(patches),
                           dim=len(COLOR_FEATURE_NAMES), cache_dir=cache_dir,
                           label=f"{fx.safe_name(name)}_color", dtype=np.float64)


def encoder_features(data, *, config, device="auto", progress: bool = False) -> np.ndarray:
    """Frozen image-encoder features of every patch (the ``"ridge_features"`` input).

    The encoder is built from ``config`` (architecture, ``weights``, input size) after
    ``torch.manual_seed(config.seed)``, i.e. the image encoder mclSTExp starts from
    before training. With ``weights=None`` it is randomly initialised. Features come
    from the feature cache (view 0), so a frozen mclSTExp with the same encoder and
    this baseline compute them once. The config's input options (``feature_norm``,
    ``context``, ``wide_view``; :mod:`mclstexp_lite._inputs`) apply as they do to the
    model, so the probe reads the same features as the model it is compared with.

    Parameters
    ----------
    data
        :class:`mclstexp_lite.train.SpotData`.
    config
        :class:`mclstexp_lite.train.TrainConfig`; ``image_size`` sets the input size.
    device
        Where to compute.
    progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``(len(data), out_dim)`` float32 pooled backbone features (no projection head);
        ``(len(data), k * out_dim)`` with ``k`` feature blocks (context, wide view).
    """
    import torch

    from . import train as tr

    if not isinstance(data, tr.SpotData):
        raise TypeError(f"`data` must be a SpotData, got {type(data).__name__}.")
    if not isinstance(config, tr.TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}.")
    from . import _inputs as inputs

    torch.manual_seed(config.seed)
    model = tr.build_model(config, data.n_genes)
    # the cached features with the config's input options, as the frozen model reads them
    feats = inputs.image_inputs(model, data, views=1, device=device, amp=config.amp,
                                progress=progress)[0]
    return feats.numpy().astype(np.float32, copy=False)


# -------------------------------------------------------------------------- ridge
def fit_ridge(features, expr, *, groups=None, alphas=DEFAULT_ALPHAS):
    """Standardise features and fit a multi-output ridge regression.

    Parameters
    ----------
    features
        ``(n_spots, n_features)`` training features.
    expr
        ``(n_spots, n_genes)`` training expression (dense or sparse).
    groups
        ``(n_spots,)`` section label of each spot. With two or more distinct labels
        the penalty is chosen by leave-one-section-out cross-validation (mean squared
        error); otherwise by RidgeCV's efficient leave-one-out.
    alphas
        Candidate penalties (positive).

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``StandardScaler`` then a fitted ridge (``Ridge`` at the chosen penalty, or
        ``RidgeCV`` with one training section); ``pipeline[-1].alpha_`` is the chosen
        penalty. ``pipeline.predict(test_features)`` gives ``(n, n_genes)``.
        A warning is logged when the chosen penalty is the smallest or largest of
        ``alphas``.

    Raises
    ------
    ValueError
        On mismatched row counts, non-finite values or bad ``alphas``.
    """
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = _as_2d(features, "features")
    Y = _as_2d(expr, "expr")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"`features` has {X.shape[0]} rows but `expr` has {Y.shape[0]}; "
                         "one row per training spot in both.")
    if X.shape[0] < 2:
        raise ValueError("ridge needs at least 2 training spots.")
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"`alphas` must be positive finite numbers, got {alphas.tolist()}.")
    cv = None
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (X.shape[0],):
            raise ValueError(f"`groups` must have one label per spot ({X.shape[0]}), got "
                             f"shape {groups.shape}.")
        if len(np.unique(groups)) >= 2:
            cv = list(LeaveOneGroupOut().split(X, Y, groups))
    if cv is None:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
        model.fit(X, Y)
        chosen = float(model[-1].alpha_)
    else:
        Z = StandardScaler().fit_transform(X)
        chosen = float(alphas[int(np.argmin(_split_mse(Z, Y, cv, alphas)))])
        model = make_pipeline(StandardScaler(), Ridge(alpha=chosen))
        model.fit(X, Y)
        model[-1].alpha_ = chosen
    if alphas.size > 1 and chosen == alphas.max() and _flat(model, X, Y):
        # beyond this penalty the fit can only get flatter: it already predicts the
        # training mean, so the grid is wide enough; the features carry nothing that
        # holds across the training sections
        log.info("ridge: the largest penalty (alpha=%g) was chosen and the fit is the training "
                 "mean: these features predict nothing that holds across the training sections",
                 chosen)
    elif alphas.size > 1 and chosen in (alphas.min(), alphas.max()):
        side = "largest" if chosen == alphas.max() else "smallest"
        log.warning(
            "ridge: the chosen penalty alpha=%g is the %s of the %d searched; "
            "the best value may lie beyond the grid, so extend `alphas` in that direction.",
            chosen, side, alphas.size)
    return model


def ridge_fold(method: str, adatas, *, train, test, config, patch_um: float,
               patch_size: int = 224, stain=None, device="auto", progress: bool = False,
               cache=None) -> dict:
    """Fit one ridge baseline on a fold's training sections and predict its test sections.

    The ``"ridge_features"`` / ``"ridge_color"`` fold of :func:`mclstexp_lite.cv.run_cv`:
    features of every patch (:func:`encoder_features` or :func:`section_color_features`),
    a ridge from the training spots' features to their expression (:func:`fit_ridge`,
    penalty chosen leave-one-training-section-out), then its prediction for each test
    section.

    Parameters
    ----------
    method
        ``"ridge_features"`` or ``"ridge_color"`` (:data:`RIDGE_METHODS`).
    adatas
        ``{section: AnnData}`` prepared with one gene panel; holds at least the
        ``train`` and ``test`` sections.
    train, test
        Section names to fit on and to predict.
    config
        :class:`mclstexp_lite.train.TrainConfig`: the image encoder of
        ``"ridge_features"`` with its input options (:func:`encoder_features`); with
        ``expr_norm="center"`` both ridges fit the per-section centred training
        expression (:func:`mclstexp_lite._inputs.center_expression`), as the model reads it.
    patch_um, patch_size, stain
        Patch geometry and stain normalisation of
        :meth:`mclstexp_lite.train.SpotData.from_anndata`.
    device, progress
        Where to compute encoder features; progress bars.
    cache
        Path of an ``.npz`` that keeps the features (``run_cv``: the fold's
        ``embeddings.npz``, keys ``kind``, ``train``, ``train_obs_names``,
        ``train_sections``, ``test__<section>``, ``test_obs_names__<section>``,
        ``seconds``): reused when its method and spots match, else computed and written
        atomically. ``None``: always computed, nothing written.

    Returns
    -------
    dict
        ``predictions`` (``{section: (n_spots, n_genes) array}``), ``alpha`` (the chosen
        penalty), ``fit_seconds`` (the ridge fit), ``feature_seconds`` (computing the
        features; when reused, the time they took then) and ``predict_seconds``
        (``{section: seconds}``).
    """
    from . import train as tr

    if method not in RIDGE_METHODS:
        raise ValueError(f"method must be one of {RIDGE_METHODS}, got {method!r}.")

    def spot_data(names):
        return tr.SpotData.from_anndata({s: adatas[s] for s in names}, patch_um=patch_um,
                                        patch_size=patch_size, progress=progress, stain=stain)

    def features(data):
        if method == "ridge_features":
            return encoder_features(data, config=config, device=device, progress=progress)
        return np.concatenate([section_color_features(p, name=n)
                               for p, n in zip(data.patches, data.sections)])

    train_expr = np.concatenate([_util.to_dense(adatas[s].X, np.float32) for s in train])
    train_sections = np.concatenate(
        [np.full(adatas[s].n_obs, s, dtype=object) for s in train]).astype(str)
    if getattr(config, "expr_norm", None) == "center":  # the targets the model reads too
        from ._inputs import center_expression

        train_expr = center_expression(train_expr, train_sections)
    train_data = spot_data(train)
    expect = {"train_obs_names": np.array(train_data.obs_names, dtype=str),
              "kind": np.array(method)}
    for s in test:
        expect[f"test_obs_names__{s}"] = np.array(adatas[s].obs_names, dtype=str)
    feats = None if cache is None else _util.load_matching_npz(cache, expect)
    if feats is None:
        t0 = time.time()
        feats = dict(expect)
        feats["train_sections"] = train_sections
        feats["train"] = features(train_data)
        for s in test:
            feats[f"test__{s}"] = features(spot_data([s]))
        feats["seconds"] = np.array(time.time() - t0)
        if cache is not None:
            _util.atomic_savez(cache, feats)
    t0 = time.time()
    ridge = fit_ridge(feats["train"], train_expr, groups=train_sections)
    fit_seconds = time.time() - t0
    preds, predict_seconds = {}, {}
    for s in test:
        t0 = time.time()
        preds[s] = ridge.predict(feats[f"test__{s}"])
        predict_seconds[s] = time.time() - t0
    return {"predictions": preds, "alpha": float(ridge[-1].alpha_), "fit_seconds": fit_seconds,
            "feature_seconds": float(feats["seconds"]), "predict_seconds": predict_seconds}


def _flat(model, X, Y, tol: float = 0.01) -> bool:
    """Whether a fitted ridge predicts (almost) a constant: the spread of its predictions
    is below ``tol`` of the spread of the targets, for every target."""
    spread = np.asarray(model.predict(X)).reshape(len(X), -1).std(axis=0)
    target = np.asarray(Y, dtype=np.float64).reshape(len(X), -1).std(axis=0)
    return bool(np.all(spread <= tol * np.maximum(target, 1e-12)))


def _split_mse(Z, Y, splits, alphas) -> np.ndarray:
    """Mean over ``splits`` of the held-out MSE of a ridge with intercept, per alpha.

    For each split, with centred training features ``Z`` and targets ``Y``, the smaller
    Gram matrix is decomposed once: ``Z Z^T = U diag(l) U^T`` when there are fewer spots
    than features (predictions ``Zt Z^T U diag(1 / (l + a)) U^T Y``), else
    ``Z^T Z = V diag(l) V^T`` (coefficients ``V diag(1 / (l + a)) V^T Z^T Y``). Every
    penalty ``a`` then costs one matrix product instead of a new fit.
    """
    scores = np.zeros(len(alphas))
    for train, test in splits:
        mx, my = Z[train].mean(axis=0), Y[train].mean(axis=0)
        zc, yc, zt = Z[train] - mx, Y[train] - my, Z[test] - mx
        if zc.shape[0] <= zc.shape[1]:
            lam, U = np.linalg.eigh(zc @ zc.T)
            left, right = (zt @ zc.T) @ U, U.T @ yc
        else:
            lam, V = np.linalg.eigh(zc.T @ zc)
            left, right = zt @ V, V.T @ (zc.T @ yc)
        lam = np.clip(lam, 0.0, None)  # round-off can make tiny eigenvalues negative
        for i, a in enumerate(alphas):
            pred = (left / (lam + a)) @ right + my
            scores[i] += np.mean((pred - Y[test]) ** 2)
    return scores / len(splits)


# ------------------------------------------------------------------------- helpers
def _as_2d(x, name: str) -> np.ndarray:
    try:
        arr = _util.to_dense(x, np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a numeric 2-D array.") from err
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (spots x columns), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return arr
