"""Cross-validation: explicit folds, one results folder per run, one table per study.

Two fold schemes (:func:`make_folds`):

``"section"``
    Leave one section out, as in the mclSTExp paper: each fold holds out one section;
    training and reference bank are *all other* sections, including other replicate
    sections of the same patient. Replicate sections of one tumour are cut a few
    microns apart and share its biology, so this scheme lets a model "recognise the
    patient" and is optimistic about unseen patients.
``"patient"``
    Leave one patient out: each fold holds out every section of one patient (each
    scored separately); training and reference bank contain no section of that
    patient. This measures what a new patient would get.

:func:`run_cv` trains/fits a method on each fold and scores every held-out section
with :func:`mclstexp_lite.metrics.summarize`. Methods: ``"mclstexp"`` (the model),
``"bleep"`` (the BLEEP-style model, ``spot_encoder="none"``), and the baselines of
:mod:`mclstexp_lite.baselines` (``"mean"``, ``"ridge_features"``, ``"ridge_color"``).

Results folder written by :func:`run_cv`
----------------------------------------
``config.json``
    Everything that defines the run: scheme, method, the
    :class:`~mclstexp_lite.train.TrainConfig` (as a dict), ``top_k``, ``metric``, the
    gene panel (count and sha256), the sections and their patients, a fingerprint of
    every section's data (spots, obs-name and expression sha256), patch geometry,
    baseline settings, stain normalisation (only when on), package version. A rerun
    with a different config is refused.
``folds.json``
    The scheme, the section -> patient map and every fold (name, test, train,
    reference).
``<fold>/checkpoint.pt``, ``<fold>/history.json``
    From :func:`mclstexp_lite.train.train` (neural methods).
``<fold>/embeddings.npz``
    Neural methods: ``reference`` (reference spot embeddings), ``reference_obs_names``,
    ``reference_sections`` (section of each reference spot), and per test section
    ``test__<section>`` (image embeddings) and ``test_obs_names__<section>``, plus
    ``checkpoint_sha256`` (the weights they came from) and ``seconds``. Ridge
    baselines store their features the same way (``train``, ``train_obs_names``,
    ``train_sections``, ``test__<section>``...). Reused by a rerun when they match.
``<fold>/pred_<section>.h5ad``
    The prediction, laid out like the truth (:func:`mclstexp_lite.tl.prediction_anndata`),
    with ``uns['mclstexp_prediction']`` recording method, scheme, fold, training and
    reference sections.
``<fold>/metrics.json``
    The fold's rows of the metrics table plus per-section details (highly expressed
    genes) and fit information. Written last: its presence marks the fold complete.
``metrics.csv``
    All completed folds, one row per held-out section, columns :data:`ROW_COLUMNS`.
``summary.csv``, ``summary.md``
    Mean and sample sd over held-out sections per method and scheme
    (:func:`summarize_results`).

Every file is written atomically (temporary file in the same folder, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import download

log = logging.getLogger(__name__)

__all__ = [
    "SCHEMES",
    "METHODS",
    "ROW_COLUMNS",
    "Fold",
    "make_folds",
    "save_folds",
    "load_folds",
    "patients_of",
    "method_config",
    "run_cv",
    "rescore",
    "load_results",
    "summarize_results",
    "summary_markdown",
    "compare",
]

#: Fold schemes of :func:`make_folds`.
SCHEMES = ("section", "patient")
#: Methods :func:`run_cv` runs.
METHODS = ("mclstexp", "bleep", "mean", "ridge_features", "ridge_color")
_NEURAL = ("mclstexp", "bleep")
_RIDGE = ("ridge_features", "ridge_color")
#: Columns of the per-section metrics table (``metrics.csv``), in order.
ROW_COLUMNS = ("method", "scheme", "fold", "test_section", "pcc_acg", "pcc_heg", "mse",
               "mae", "n_spots", "n_genes", "n_constant_genes", "seconds")
_CONFIG = "config.json"
_FOLDS = "folds.json"
_METRICS = "metrics.json"
_EMB = "embeddings.npz"
# config.json keys that may differ between runs of the same study
_VOLATILE = ("package_version", "created", "device")


# ============================================================================ folds
@dataclass(frozen=True)
class Fold:
    """One cross-validation fold.

    Attributes
    ----------
    name
        Fold name, also its folder name: the held-out section (``"section"`` scheme)
        or patient (``"patient"`` scheme).
    test
        Held-out sections, each scored separately.
    train
        Sections the model is trained (or the baseline fitted) on.
    reference
        Sections whose spots form the retrieval reference bank (equal to ``train``
        in both schemes).
    """

    name: str
    test: tuple
    train: tuple
    reference: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "test": list(self.test), "train": list(self.train),
                "reference": list(self.reference)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Fold":
        return cls(name=str(d["name"]), test=tuple(d["test"]), train=tuple(d["train"]),
                   reference=tuple(d["reference"]))


def make_folds(sections: Mapping[str, str], scheme: str = "section") -> list[Fold]:
    """Build the folds of a scheme.

    Parameters
    ----------
    sections
        ``{section: patient}`` for every section of the study, in the order folds and
        training lists should follow.
    scheme
        ``"section"`` (leave one section out; other sections of the same patient stay
        in training and reference) or ``"patient"`` (leave one patient out).

    Returns
    -------
    list of Fold
        ``"section"``: one fold per section, named after it. ``"patient"``: one fold
        per patient (in order of first appearance), named after it, whose ``test`` is
        all that patient's sections.

    Raises
    ------
    ValueError
        Unknown ``scheme``; fewer than two sections (``"section"``) or patients
        (``"patient"``), since a fold would have no training data; a section or patient
        name that cannot be a folder name.
    TypeError
        If ``sections`` is not a mapping of strings to strings.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
    if not isinstance(sections, Mapping):
        raise TypeError("`sections` must be a mapping {section: patient}, got "
                        f"{type(sections).__name__}; e.g. cv.patients_of(adatas).")
    for s, p in sections.items():
        if not isinstance(s, str) or not isinstance(p, str):
            raise TypeError(f"`sections` must map str to str, got {s!r}: {p!r}.")
        for name in (s, p):
            _check_folder_name(name)
    names = list(sections)
    if scheme == "section":
        if len(names) < 2:
            raise ValueError(f"the 'section' scheme needs at least 2 sections, got {names}; "
                             "a fold would have no training data.")
        return [Fold(s, (s,), tuple(o for o in names if o != s),
                     tuple(o for o in names if o != s)) for s in names]
    patients = list(dict.fromkeys(sections.values()))
    if len(patients) < 2:
        raise ValueError(
            f"the 'patient' scheme needs sections from at least 2 patients, got only "
            f"{patients}; holding out the only patient leaves no training data. Add "
            "sections of another patient or use scheme='section'.")
    folds = []
    for p in patients:
        test = tuple(s for s in names if sections[s] == p)
        rest = tuple(s for s in names if sections[s] != p)
        folds.append(Fold(p, test, rest, rest))
    return folds


def save_folds(folds: Sequence[Fold], path, *, scheme: str, sections: Mapping[str, str]) -> None:
    """Write folds to a JSON file (atomically).

    Parameters
    ----------
    folds
        From :func:`make_folds`.
    path
        Target file (e.g. ``results/folds.json``).
    scheme, sections
        Recorded alongside, as given to :func:`make_folds`.
    """
    _atomic_write_json(Path(path), {"scheme": scheme, "sections": dict(sections),
                                    "folds": [f.to_dict() for f in folds]})


def load_folds(path) -> list[Fold]:
    """Read folds written by :func:`save_folds`."""
    path = Path(path)
    if path.is_dir():
        path = path / _FOLDS
    with open(path) as fh:
        d = json.load(fh)
    if "folds" not in d:
        raise ValueError(f"{path} is not a folds file (no 'folds').")
    return [Fold.from_dict(f) for f in d["folds"]]


def patients_of(adatas: Mapping) -> dict[str, str]:
    """``{section: patient}`` from each section's ``obs['patient']``.

    Raises
    ------
    ValueError
        If a section lacks ``obs['patient']`` or holds several patients.
    """
    out = {}
    for s, a in adatas.items():
        if "patient" not in a.obs:
            raise ValueError(f"section {s!r} has no obs['patient']; load it with "
                             "mclstexp_lite.datasets or set obs['patient'] yourself.")
        values = a.obs["patient"].astype(str).unique()
        if len(values) != 1:
            raise ValueError(f"section {s!r} holds spots of several patients {list(values)}; "
                             "one patient per section is expected.")
        out[str(s)] = str(values[0])
    return out


def _check_leakage(fold: Fold, patients: Mapping[str, str], scheme: str) -> None:
    """Refuse a fold whose training or reference data include what it tests."""
    seen = set(fold.train) | set(fold.reference)
    bad = set(fold.test) & seen
    if bad:
        raise RuntimeError(f"fold {fold.name}: test section(s) {sorted(bad)} are also in "
                           "training/reference; folds.json was edited or corrupted.")
    if scheme == "patient":
        test_patients = {patients[s] for s in fold.test}
        leaked = sorted(s for s in seen if patients[s] in test_patients)
        if leaked:
            raise RuntimeError(f"fold {fold.name}: section(s) {leaked} of held-out patient(s) "
                               f"{sorted(test_patients)} are in training/reference.")


def _check_folder_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in '/\\:*?"<>|\0'):
        raise ValueError(f"{name!r} cannot be used as a fold folder name; rename the section "
                         "or patient (letters, digits, '_', '-', '.').")


# =========================================================================== config
def method_config(method: str, config):
    """The :class:`~mclstexp_lite.train.TrainConfig` a method trains with.

    ``"bleep"`` is ``config`` with ``model['spot_encoder'] = "none"``; every other
    method uses ``config`` unchanged (the baselines read only the image-encoder
    settings, seed and image size).

    Raises
    ------
    ValueError
        Unknown method, or ``method="mclstexp"`` with ``spot_encoder="none"`` in
        ``config.model`` (that is the BLEEP baseline: use ``method="bleep"``).
    """
    from . import train as tr

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if not isinstance(config, tr.TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}; "
                        "e.g. TrainConfig.profile('quick').")
    config.validate()
    if method == "bleep":
        d = config.to_dict()
        d["model"] = {**d["model"], "spot_encoder": "none"}
        return tr.TrainConfig.from_dict(d).validate()
    if method == "mclstexp" and config.model.get("spot_encoder", "transformer") == "none":
        raise ValueError("config.model['spot_encoder'] is 'none', which is the BLEEP-style "
                         "baseline; use method='bleep', or drop spot_encoder for mclSTExp.")
    return config


def _sha256_text(items) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(str(x).encode())
        h.update(b"\n")
    return h.hexdigest()


def _dense_f32(X) -> np.ndarray:
    if hasattr(X, "toarray") and hasattr(X, "nnz"):
        X = X.toarray()
    return np.ascontiguousarray(np.asarray(X, dtype=np.float32))


def _fingerprint(adata) -> dict:
    return {"n_spots": int(adata.n_obs),
            "obs_sha256": _sha256_text(adata.obs_names),
            "expr_sha256": hashlib.sha256(_dense_f32(adata.X).tobytes()).hexdigest()}


def _run_config(*, adatas, patients, scheme, method, config, top_k, metric, patch_um,
                patch_size, device) -> dict:
    from . import __version__
    from . import baselines as bl

    genes = list(next(iter(adatas.values())).var_names)
    d = {
        "scheme": scheme,
        "method": method,
        "train_config": config.to_dict(),
        "top_k": int(top_k) if method in _NEURAL else None,
        "metric": metric if method in _NEURAL else None,
        "genes": {"n": len(genes), "sha256": _sha256_text(genes)},
        "sections": dict(patients),
        "data": {s: _fingerprint(a) for s, a in adatas.items()},
        "patch": {"patch_um": float(patch_um), "patch_size": int(patch_size)},
        "baseline": ({"alphas": list(bl.DEFAULT_ALPHAS),
                      "alpha_selection": "leave-one-training-section-out, MSE",
                      "features": (list(bl.COLOR_FEATURE_NAMES) if method == "ridge_color"
                                   else "frozen image encoder of train_config.model, "
                                        "seed train_config.seed, view 0 of the feature cache")}
                     if method in _RIDGE else None),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
    }
    return d


def _identity(cfg: Mapping) -> dict:
    d = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    tc = dict(d.get("train_config") or {})
    tc.pop("device", None)
    d["train_config"] = tc
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {_short(va)} -> {_short(vb)}")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# ====================================================================== atomic I/O
_umask_mode = download._umask_mode


def _atomic_write_text(path: Path, text: str) -> None:
    download.atomic_write_text(path, text)


def _atomic_write_json(path: Path, obj) -> None:
    download.atomic_write_json(path, obj)


_atomic_write_h5ad = download.atomic_write_h5ad


def _atomic_savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    download.atomic_write(path, write, suffix=".npz")


def _file_sha256(path: Path) -> str:
    return download.sha256_file(path)


# ========================================================================== run_cv
def _check_adatas(adatas) -> dict:
    import anndata as ad

    if not isinstance(adatas, Mapping) or not adatas:
        raise TypeError("`adatas` must be a non-empty mapping {section: AnnData} of "
                        "prepared sections (pp.prepare).")
    items = {}
    genes = None
    for s, a in adatas.items():
        if not isinstance(s, str):
            raise TypeError(f"section names must be str, got {s!r}.")
        if not isinstance(a, ad.AnnData):
            raise TypeError(f"`adatas[{s!r}]` must be an AnnData, got {type(a).__name__}.")
        if genes is None:
            genes, first = list(a.var_names), s
        elif list(a.var_names) != genes:
            raise ValueError(f"section {s!r} has other genes than {first!r}; prepare every "
                             "section with one panel: pp.prepare(adatas, genes).")
        items[s] = a
    return items


def _select(all_folds: list[Fold], folds) -> list[Fold]:
    if folds is None:
        return list(all_folds)
    if isinstance(folds, str):
        folds = [folds]
    names = [f.name for f in all_folds]
    unknown = [f for f in folds if f not in names]
    if unknown:
        raise ValueError(f"unknown fold(s) {unknown}; this scheme's folds are {names}.")
    return [f for f in all_folds if f.name in set(folds)]


def _check_top_k(top_k) -> int:
    import numbers

    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    return int(top_k)


def _prepare_out_dir(out: Path, run_cfg: dict, all_folds: list[Fold], selected: list[Fold],
                     overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} is a file, not a folder; choose another out_dir.")
    cfg_path = out / _CONFIG
    if cfg_path.exists():
        with open(cfg_path) as fh:
            saved = json.load(fh)
        diff = _diff(_identity(saved), _identity(run_cfg))
        if diff:
            if not overwrite:
                raise ValueError(
                    f"{out} holds results of a different configuration ({'; '.join(diff)}). "
                    "Use another out_dir, or overwrite=True to replace those results.")
            log.warning("%s: configuration changed (%s); replacing its results", out,
                        "; ".join(diff))
            _clear(out, all_folds)
        else:
            done = [f.name for f in selected if (out / f.name / _METRICS).exists()]
            if len(done) == len(selected):
                if not overwrite:
                    raise FileExistsError(
                        f"{out} already holds complete results for fold(s) {done}. Pass "
                        "overwrite=True to recompute them, choose another out_dir, or read "
                        "them with cv.load_results(out_dir).")
                _clear(out, selected)
            elif overwrite:
                _clear(out, selected)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and has no {_CONFIG}, so it is not a run_cv "
            "results folder; choose another out_dir (nothing was written).")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(cfg_path, run_cfg)


def _clear(out: Path, folds: Sequence[Fold]) -> None:
    """Remove the results run_cv writes for these folds (and the aggregated tables)."""
    for f in folds:
        d = out / f.name
        if d.is_dir():
            shutil.rmtree(d)
    for name in ("metrics.csv", "summary.csv", "summary.md"):
        (out / name).unlink(missing_ok=True)


def run_cv(
    adatas: Mapping,
    *,
    scheme: str,
    method: str = "mclstexp",
    config,
    out_dir,
    folds: Sequence[str] | str | None = None,
    top_k: int = 200,
    metric: str = "l1",
    n_heg: int = 50,
    overwrite: bool = False,
    progress: bool = True,
    device="auto",
    patch_um: float | None = None,
    patch_size: int = 224,
    stain=None,
) -> pd.DataFrame:
    """Cross-validate one method under one fold scheme and write a results folder.

    Parameters
    ----------
    adatas
        ``{section: AnnData}``, prepared with one gene panel
        (:func:`mclstexp_lite.pp.prepare`); ``obs['patient']`` gives each section's
        patient.
    scheme
        ``"section"`` or ``"patient"`` (:func:`make_folds`).
    method
        ``"mclstexp"``, ``"bleep"``, ``"mean"``, ``"ridge_features"`` or
        ``"ridge_color"`` (see :mod:`mclstexp_lite.baselines`).
    config
        :class:`mclstexp_lite.train.TrainConfig`, e.g. ``TrainConfig.profile("quick")``;
        ``"bleep"`` trains it with ``spot_encoder="none"`` (:func:`method_config`).
    out_dir
        Results folder (layout in the module docstring).
    folds
        Names of the folds to run now (default all). The others can be run later into
        the same folder; aggregated tables always cover every completed fold.
    top_k, metric
        Retrieval settings (:func:`mclstexp_lite.tl.retrieve`), neural methods only;
        ``top_k`` is capped at the reference bank size of a fold, with a warning.
    n_heg
        Number of highly expressed genes of PCC-HEG (paper: 50).
    overwrite
        Recompute the selected folds (or replace results of a different config).
        Without it, a folder whose selected folds are all complete, or that holds
        another configuration, is refused.
    progress
        Progress bars and log messages.
    device
        Where to train and predict.
    patch_um, patch_size
        Patch geometry for :meth:`mclstexp_lite.train.SpotData.from_anndata`
        (default: the package default tissue width, cached at 224 px and resized to
        the image encoder's input size on the fly).
    stain
        Stain normalisation of every patch (:mod:`mclstexp_lite.stain`): ``None`` (off),
        ``"macenko"`` or ``"reinhard"`` (fitted anew in every fold on the patches of
        that fold's *training* sections, :func:`mclstexp_lite.stain.fit_on_sections`
        with its defaults, and applied to training, reference and held-out patches), or
        a fitted :class:`mclstexp_lite.stain.StainNormalizer` used in every fold. It is
        part of ``config.json`` (a folder with another setting is refused); each fold's
        ``metrics.json`` keeps its fitted normaliser under ``stain``.

    Returns
    -------
    pandas.DataFrame
        Contents of ``metrics.csv``: one row per held-out section of every completed
        fold of this folder, columns :data:`ROW_COLUMNS`. ``seconds`` is the fit
        time of the fold (summed epoch times for neural methods, also after a resume)
        plus its embedding/feature time plus the prediction time of that section.

    Raises
    ------
    FileExistsError
        The selected folds are complete (pass ``overwrite=True``), or ``out_dir`` is
        a non-empty folder that is not a results folder.
    ValueError
        ``out_dir`` holds another configuration, or on bad arguments.

    Notes
    -----
    An interrupted run continues when called again with the same arguments: complete
    folds (with ``metrics.json``) are skipped, training resumes from the fold's
    ``checkpoint.pt`` (:func:`mclstexp_lite.train.train` with ``resume=True``), and
    embeddings/features in ``embeddings.npz`` are reused when they match the
    checkpoint and spots.
    """
    from . import patches as pt

    adatas = _check_adatas(adatas)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
    cfg = method_config(method, config)
    top_k = _check_top_k(top_k)
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}.")
    patch_um = pt.DEFAULT_PATCH_UM if patch_um is None else float(patch_um)
    n_genes = next(iter(adatas.values())).n_vars
    if isinstance(n_heg, bool) or not isinstance(n_heg, (int, np.integer)) or not 1 <= n_heg <= n_genes:
        raise ValueError(f"n_heg must be an integer between 1 and the number of genes "
                         f"({n_genes}), got {n_heg!r}.")
    stain_cfg = _stain_config(stain)
    patients = patients_of(adatas)
    all_folds = make_folds(patients, scheme)
    selected = _select(all_folds, folds)
    out = Path(out_dir)
    run_cfg = _run_config(adatas=adatas, patients=patients, scheme=scheme, method=method,
                          config=cfg, top_k=top_k, metric=metric, patch_um=patch_um,
                          patch_size=patch_size, device=device)
    run_cfg["n_heg"] = int(n_heg)
    if stain_cfg is not None:  # absent when off, so folders written before still match
        run_cfg["stain"] = stain_cfg
    _prepare_out_dir(out, run_cfg, all_folds, selected, overwrite)
    save_folds(all_folds, out / _FOLDS, scheme=scheme, sections=patients)
    geometry = {"patch_um": patch_um, "patch_size": patch_size}
    for fold in selected:
        fold_dir = out / fold.name
        if (fold_dir / _METRICS).exists():
            if progress:
                log.info("%s: fold %s already complete, skipped", out, fold.name)
            continue
        _check_leakage(fold, patients, scheme)
        fold_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        fold_geometry, normaliser = geometry, _fold_stain(stain, adatas, fold, geometry, progress)
        if normaliser is not None:
            fold_geometry = dict(geometry, stain=normaliser)
        record = _run_fold(fold, adatas, method=method, scheme=scheme, config=cfg,
                           fold_dir=fold_dir, top_k=top_k, metric=metric, device=device,
                           geometry=fold_geometry, n_heg=n_heg, progress=progress)
        if normaliser is not None:
            record["stain"] = normaliser.to_dict()
        record["wall_seconds_this_run"] = time.time() - t0
        _atomic_write_json(fold_dir / _METRICS, record)
        if progress:
            for r in record["rows"]:
                log.info("%s %s fold %s / %s: PCC-ACG %.3f PCC-HEG %.3f MSE %.4f", method,
                         scheme, fold.name, r["test_section"], r["pcc_acg"], r["pcc_heg"],
                         r["mse"])
    return _aggregate(out, all_folds)


def _stain_config(stain) -> dict | None:
    """What ``run_cv(stain=...)`` records in ``config.json``; validates ``stain``."""
    from . import stain as st

    if stain is None:
        return None
    if isinstance(stain, str):
        method = st._check_method(stain)
        return {"method": method, "fit": "each fold's training sections, "
                "stain.fit_on_sections defaults", "settings": st.StainNormalizer(method).settings()}
    if isinstance(stain, st.StainNormalizer):
        return {"method": stain.method, "fit": "given", "fingerprint": stain.fingerprint}
    raise TypeError(f"stain must be None, 'macenko', 'reinhard' or a fitted "
                    f"stain.StainNormalizer, got {type(stain).__name__}.")


def _fold_stain(stain, adatas, fold: Fold, geometry, progress):
    """The fold's normaliser: ``stain`` itself, or one fitted on the fold's training sections."""
    from . import stain as st

    if stain is None or isinstance(stain, st.StainNormalizer):
        return stain
    return st.fit_on_sections({s: adatas[s] for s in fold.train}, stain,
                              patch_um=geometry["patch_um"], out_size=geometry["patch_size"],
                              progress=progress)


def _spot_data(adatas, names, geometry, progress):
    from . import train as tr

    return tr.SpotData.from_anndata({s: adatas[s] for s in names},
                                    patch_um=geometry["patch_um"],
                                    patch_size=geometry["patch_size"], progress=progress,
                                    stain=geometry.get("stain"))


def _load_npz(path: Path, expect: Mapping[str, np.ndarray]) -> dict | None:
    """The arrays of ``path`` if it exists and every ``expect`` entry matches, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated or foreign file: recompute
        log.warning("cannot read %s (%s); recomputing", path, exc)
        return None
    for k, v in expect.items():
        if k not in arrays or arrays[k].shape != np.shape(v) or not np.array_equal(arrays[k], v):
            log.warning("%s does not match this fold (%s differs); recomputing", path, k)
            return None
    return arrays


def _run_fold(fold: Fold, adatas, *, method, scheme, config, fold_dir: Path, top_k, metric,
              device, geometry, n_heg, progress) -> dict:
    from . import baselines as bl
    from . import tl
    from . import train as tr

    train_data = None
    details: dict = {"method": method, "scheme": scheme, "fold": fold.to_dict()}
    preds: dict = {}
    extra_secs: dict = {s: 0.0 for s in fold.test}
    if method in _NEURAL:
        train_data = _spot_data(adatas, fold.train, geometry, progress)
        ref_data = (train_data if tuple(fold.reference) == tuple(fold.train)
                    else _spot_data(adatas, fold.reference, geometry, progress))
        result = tr.train(train_data, config, out_dir=fold_dir, resume=True,
                          progress=progress)
        fit_seconds = float(sum(h["seconds"] for h in result.history))
        details["history"] = result.history
        ckpt_sha = _file_sha256(fold_dir / tr.CHECKPOINT)
        expect = {"checkpoint_sha256": np.array(ckpt_sha),
                  "reference_obs_names": np.array(ref_data.obs_names, dtype=str)}
        for s in fold.test:
            expect[f"test_obs_names__{s}"] = np.array(adatas[s].obs_names, dtype=str)
        emb = _load_npz(fold_dir / _EMB, expect)
        if emb is None:
            t0 = time.time()
            emb = dict(expect)
            emb["reference"] = tl.embed_reference(result.model, ref_data, device=device)
            emb["reference_sections"] = np.array(ref_data.sections, dtype=str)[ref_data.groups]
            for s in fold.test:
                test_data = _spot_data(adatas, [s], geometry, progress)
                emb[f"test__{s}"] = tr.embed_images(result.model, test_data, config=config,
                                                    device=device, progress=progress)
            emb["seconds"] = np.array(time.time() - t0)
            _atomic_savez(fold_dir / _EMB, emb)
        embed_seconds = float(emb["seconds"])
        k = top_k
        if k > len(ref_data):
            warnings.warn(f"fold {fold.name}: top_k={top_k} exceeds the {len(ref_data)} "
                          f"reference spots; using top_k={len(ref_data)}", RuntimeWarning,
                          stacklevel=3)
            k = len(ref_data)
        details["top_k_used"] = k
        for s in fold.test:
            t0 = time.time()
            preds[s] = tl.predict_section(
                result.model, ref_data, adatas[s], config=config, top_k=k, metric=metric,
                device=device, image_emb=emb[f"test__{s}"], reference_emb=emb["reference"],
                method=method)
            extra_secs[s] = time.time() - t0
        model_config = json.dumps(result.model.config, sort_keys=True)
    else:
        t0 = time.time()
        train_expr = np.concatenate([_dense_f32(adatas[s].X) for s in fold.train])
        train_sections = np.concatenate(
            [np.full(adatas[s].n_obs, s, dtype=object) for s in fold.train]).astype(str)
        if method == "mean":
            mean = bl.mean_expression(train_expr)
            fit_seconds = time.time() - t0
            embed_seconds = 0.0
            for s in fold.test:
                preds[s] = np.broadcast_to(mean, (adatas[s].n_obs, mean.size))
        else:
            train_data = _spot_data(adatas, fold.train, geometry, progress)
            expect = {"train_obs_names": np.array(train_data.obs_names, dtype=str),
                      "kind": np.array(method)}
            for s in fold.test:
                expect[f"test_obs_names__{s}"] = np.array(adatas[s].obs_names, dtype=str)
            feats = _load_npz(fold_dir / _EMB, expect)
            if feats is None:
                t1 = time.time()
                feats = dict(expect)
                feats["train_sections"] = train_sections
                feats["train"] = _features(method, train_data, config, device, progress)
                for s in fold.test:
                    feats[f"test__{s}"] = _features(
                        method, _spot_data(adatas, [s], geometry, progress), config, device,
                        progress)
                feats["seconds"] = np.array(time.time() - t1)
                _atomic_savez(fold_dir / _EMB, feats)
            embed_seconds = float(feats["seconds"])
            t1 = time.time()
            ridge = bl.fit_ridge(feats["train"], train_expr, groups=train_sections)
            fit_seconds = time.time() - t1
            details["ridge_alpha"] = float(ridge[-1].alpha_)
            for s in fold.test:
                t2 = time.time()
                preds[s] = ridge.predict(feats[f"test__{s}"])
                extra_secs[s] = time.time() - t2
        model_config = "{}"
        details["top_k_used"] = None

    rows, per_section = [], {}
    for s in fold.test:
        info = {"method": method, "scheme": scheme, "fold": fold.name,
                "train_sections": list(fold.train),
                "reference_sections": list(fold.reference if method in _NEURAL else fold.train),
                "model_config": model_config}
        if method in _NEURAL:
            pred_ad = preds[s]
            pred_ad.uns[tl.PREDICTION_KEY].update(
                {k: tl._h5ad_value(v) for k, v in info.items() if k != "model_config"})
        else:
            pred_ad = tl.prediction_anndata(preds[s], adatas[s], info=info)
        _atomic_write_h5ad(pred_ad, fold_dir / f"pred_{s}.h5ad")
        with warnings.catch_warnings():
            if method == "mean":  # a constant prediction has no correlation, by design
                warnings.simplefilter("ignore", RuntimeWarning)
            scores, per_section[s] = _score(pred_ad, adatas[s], n_heg)
        rows.append({"method": method, "scheme": scheme, "fold": fold.name, "test_section": s,
                     **scores, "seconds": fit_seconds + embed_seconds + extra_secs[s]})
    details.update({"rows": rows, "per_section": per_section, "fit_seconds": fit_seconds,
                    "embed_seconds": embed_seconds})
    return details


def _score(pred_ad, truth, n_heg: int) -> tuple[dict, dict]:
    """Metrics of one predicted section: the metric columns of its ``metrics.csv`` row,
    and what ``metrics.json`` keeps per section (the HEG genes)."""
    from . import metrics as mt

    m = mt.summarize(pred_ad.X, _dense_f32(truth.X), genes=list(truth.var_names), n_heg=n_heg)
    return ({c: m[c] for c in ROW_COLUMNS[4:11]},
            {k: m[k] for k in ("n_heg", "n_constant_heg", "heg_genes")})


def _features(method, data, config, device, progress) -> np.ndarray:
    from . import baselines as bl

    if method == "ridge_features":
        return bl.encoder_features(data, config=config, device=device, progress=progress)
    return np.concatenate([bl.section_color_features(p, name=n)
                           for p, n in zip(data.patches, data.sections)])


# ====================================================================== aggregation
def _aggregate(out: Path, all_folds: Sequence[Fold]) -> pd.DataFrame:
    rows = []
    for f in all_folds:
        p = out / f.name / _METRICS
        if p.exists():
            with open(p) as fh:
                rows.extend(json.load(fh)["rows"])
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    _atomic_write_text(out / "metrics.csv", df.to_csv(index=False))
    if len(df):
        table = summarize_results(df)
        table = _with_top_k(table, out)
        _atomic_write_text(out / "summary.csv", table.to_csv(index=False))
        _atomic_write_text(out / "summary.md", summary_markdown(table) + "\n")
    return df


def _with_top_k(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    with open(out / _CONFIG) as fh:
        cfg = json.load(fh)
    table = table.copy()
    table.insert(2, "top_k", cfg.get("top_k"))
    return table


def load_results(out_dir) -> pd.DataFrame:
    """The per-section metrics (``metrics.csv``) of a results folder.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``metrics.csv`` (not a finished :func:`run_cv` folder).
    """
    p = Path(out_dir) / "metrics.csv"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; run cv.run_cv(..., out_dir={str(out_dir)!r}) "
                                "first.")
    return pd.read_csv(p, dtype={"fold": str, "test_section": str})


def summarize_results(per_section: pd.DataFrame, *, by=("method", "scheme"),
                      shared: bool = True) -> pd.DataFrame:
    """Mean and sample sd of the metrics over held-out sections.

    Parameters
    ----------
    per_section
        Rows as in ``metrics.csv`` (:data:`ROW_COLUMNS`).
    by
        Grouping columns.
    shared
        ``True`` (default): within each scheme, methods (the other ``by`` columns) are
        compared only on the held-out sections they all have, the rule of
        :func:`mclstexp_lite.pl.shared_sections` (which :func:`~mclstexp_lite.pl.metric_bars`
        uses too); a row that lost sections says which in ``left_out``. ``False``
        averages whatever sections each group has.

    Returns
    -------
    pandas.DataFrame
        The ``by`` columns, ``n_folds`` (distinct folds), ``n_sections`` (held-out
        sections averaged over: under both schemes every section of the study is
        scored once, so both schemes average the same sections), and
        ``<metric>_mean``/``<metric>_sd`` for PCC-ACG, PCC-HEG, MSE and MAE
        (:func:`mclstexp_lite.metrics.summary_table`). Only when sections were left
        out, a ``left_out`` column (after ``n_sections``): per row, the sections it was
        scored on that are not in its mean, each with the methods that lack it, e.g.
        ``"C2 (not scored for: ridge_color)"``; ``""`` for rows that lost none. A group
        with no section in common with the others keeps its row, with no metrics.
    """
    from . import metrics as mt

    by = [by] if isinstance(by, str) else list(by)
    left_out = None
    if shared and "test_section" in per_section.columns:
        per_section, left_out = _shared_rows(per_section, by)
    table = mt.summary_table(per_section, by=by).rename(columns={"n_folds": "n_sections"})
    folds = per_section.groupby(by, sort=True, dropna=False)["fold"].nunique()
    table.insert(len(by), "n_folds", folds.to_numpy())
    if left_out:
        empty = [k for k in left_out if k not in set(map(tuple, table[by].to_numpy().tolist()))]
        if empty:  # groups with nothing in common: a row without metrics
            extra = pd.DataFrame([dict(zip(by, k), n_folds=0, n_sections=0) for k in empty])
            table = pd.concat([table, extra], ignore_index=True).sort_values(by)
            table = table.reset_index(drop=True)
        cells = [left_out.get(tuple(k), "") for k in table[by].to_numpy().tolist()]
        table.insert(len(by) + 2, "left_out", cells)
    return table


def _run_label(columns, values) -> str:
    """A group's name in notes: the method, with ``k=`` for a retrieval top_k."""
    parts = []
    for c, v in zip(columns, values):
        if c in ("_k", "top_k"):
            if pd.notna(v) and float(v) >= 0:
                parts.append(f"k={int(v)}")
        else:
            parts.append(str(v))
    return " ".join(parts)


def _shared_rows(per_section: pd.DataFrame, by: list) -> tuple[pd.DataFrame, dict]:
    """The rows of the sections every group of a scheme has (pl.shared_sections), and
    ``{group key: "section (not scored for: ...)"}`` for the groups that lost rows."""
    from .pl import shared_sections

    col = "scheme" if "scheme" in by else None
    hue = [c for c in by if c != col]
    if not hue or per_section.empty:
        return per_section, {}
    df = per_section.reset_index(drop=True)
    df = df.assign(_run=[_run_label(hue, v) for v in zip(*(df[c] for c in hue))],
                   _col=df[col] if col else "")
    kept, _, missing = shared_sections(df, hue="_run", col="_col", with_missing=True)
    gone = df.loc[~df.index.isin(kept.index)]
    left_out: dict = {}
    for key, part in gone.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        c = part["_col"].iloc[0]
        left_out[key] = "; ".join(
            f"{s} (not scored for: {', '.join(missing[c][s])})"
            for s in sorted(set(part["test_section"].astype(str))))
    return kept.drop(columns=["_run", "_col"]), left_out


_LABELS = {"pcc_acg": "PCC-ACG", "pcc_heg": "PCC-HEG", "mse": "MSE", "mae": "MAE"}


def summary_markdown(table: pd.DataFrame, *, digits: int = 3) -> str:
    """Render a :func:`summarize_results` / :func:`compare` table as Markdown.

    Each metric becomes one ``mean ± sd`` column (:func:`mclstexp_lite.metrics.fmt`); a
    metric with no value in any held-out section (a correlation of the constant ``mean``
    prediction) is shown as ``undefined*`` with a footnote saying why. A ``left_out``
    column (sections not shared by every method, :func:`summarize_results`) gets a
    footnote that says methods are compared on the sections they share.
    """
    from . import metrics as mt

    lead = [c for c in table.columns if not c.endswith(("_mean", "_sd"))]
    metrics = [c[:-5] for c in table.columns if c.endswith("_mean")]
    head = lead + [_LABELS.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    undefined = False
    for _, r in table.iterrows():
        cells = [_cell(r[c]) for c in lead]
        for m in metrics:
            if "n_sections" in r and r["n_sections"] == 0:
                cells.append("-")
            elif pd.isna(r[f"{m}_mean"]):
                cells.append("undefined*")
                undefined = True
            else:
                cells.append(mt.fmt(r[f"{m}_mean"], r[f"{m}_sd"], digits=digits))
        lines.append("| " + " | ".join(cells) + " |")
    if undefined:
        lines += ["", "\\* undefined: no held-out section has a value, e.g. a correlation of a "
                  "prediction that is the same at every spot (the `mean` baseline), which "
                  "has no variation to correlate with."]
    if "left_out" in table.columns and (table["left_out"].astype(str) != "").any():
        lines += ["", "left_out: methods are compared only on the held-out sections they all "
                  "have (per scheme); these sections were scored for that row but are not in "
                  "its mean, because the methods named lack them (an incomplete or "
                  "interrupted run). Rerun those methods to compare on every section."]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def compare(results_dirs, *, per_section: bool = False) -> pd.DataFrame:
    """One table across results folders (methods, schemes, retrieval settings).

    Parameters
    ----------
    results_dirs
        Folders written by :func:`run_cv` or :func:`rescore` (a single path is
        accepted too).
    per_section
        Return the per-section rows of every folder (with a ``top_k`` column) instead
        of the summary.

    Returns
    -------
    pandas.DataFrame
        Summary: ``method``, ``scheme``, ``top_k`` (retrieval methods; NaN for
        baselines), ``n_folds``, ``n_sections`` and mean/sd columns of PCC-ACG,
        PCC-HEG, MSE, MAE; one row per folder, sorted by scheme, then method, then
        ``top_k``. Within a scheme every row averages the same held-out sections, those
        all folders have (:func:`summarize_results`); a ``left_out`` column names the
        others when there are any.
    """
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    parts = []
    for d in results_dirs:
        df = load_results(d)
        with open(Path(d) / _CONFIG) as fh:
            cfg = json.load(fh)
        df["top_k"] = cfg.get("top_k")
        parts.append(df)
    if not parts:
        raise ValueError("`results_dirs` is empty; pass at least one run_cv results folder.")
    allrows = pd.concat(parts, ignore_index=True)
    allrows["top_k"] = pd.to_numeric(allrows["top_k"])
    if per_section:
        return allrows
    key = allrows["top_k"].fillna(-1)
    allrows = allrows.assign(_k=key)
    table = summarize_results(allrows, by=("scheme", "method", "_k"))
    table = table.rename(columns={"_k": "top_k"})
    table["top_k"] = table["top_k"].where(table["top_k"] >= 0)
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.assign(_o=table["method"].map(order).fillna(len(order)))
    table = table.sort_values(["scheme", "_o", "top_k"], na_position="first")
    return table.drop(columns="_o").reset_index(drop=True)


# ========================================================================== rescore
def rescore(adatas: Mapping, results_dir, *, top_k: int, metric: str | None = None,
            out_dir, overwrite: bool = False, progress: bool = True,
            device="auto") -> pd.DataFrame:
    """Score a finished retrieval run again with other retrieval settings.

    Reads each fold's cached ``embeddings.npz`` in ``results_dir`` (no training, no
    encoder pass) and writes a new results folder, laid out like :func:`run_cv`'s
    (without checkpoints and embeddings), whose ``config.json`` records
    ``rescored_from``. Use it to report, e.g., ``top_k=50`` next to the paper's 200
    without training again.

    Parameters
    ----------
    adatas
        The same prepared sections as the original run (checked against its
        fingerprints).
    results_dir
        A :func:`run_cv` folder of method ``"mclstexp"`` or ``"bleep"`` whose folds are
        complete.
    top_k, metric
        New retrieval settings (``metric`` default: the original's).
    out_dir, overwrite, progress, device
        As in :func:`run_cv`.

    Returns
    -------
    pandas.DataFrame
        The new ``metrics.csv``.
    """
    from . import tl
    from . import train as tr

    src = Path(results_dir)
    with open(src / _CONFIG) as fh:
        src_cfg = json.load(fh)
    method = src_cfg["method"]
    if method not in _NEURAL:
        raise ValueError(f"{src} holds method {method!r}; only retrieval methods "
                         f"{_NEURAL} can be rescored.")
    adatas = _check_adatas(adatas)
    patients = patients_of(adatas)
    data_fp = {s: _fingerprint(a) for s, a in adatas.items()}
    if data_fp != src_cfg["data"] or patients != src_cfg["sections"]:
        raise ValueError(f"`adatas` are not the sections {src} was computed from (spots or "
                         "expression differ); load and prepare them the same way.")
    top_k = _check_top_k(top_k)
    metric = src_cfg["metric"] if metric is None else metric
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}.")
    all_folds = load_folds(src / _FOLDS)
    scheme = src_cfg["scheme"]
    run_cfg = dict(src_cfg)
    source = str(src.resolve())
    run_device = tr.resolve_device(device)
    run_cfg.update({"top_k": top_k, "metric": metric, "rescored_from": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device)})
    out = Path(out_dir)
    _prepare_out_dir(out, run_cfg, all_folds, all_folds, overwrite)
    save_folds(all_folds, out / _FOLDS, scheme=scheme, sections=patients)
    for fold in all_folds:
        npz = src / fold.name / _EMB
        if not (src / fold.name / _METRICS).exists() or not npz.exists():
            log.warning("%s: fold %s is not complete there; skipped", src, fold.name)
            continue
        fold_dir = out / fold.name
        if (fold_dir / _METRICS).exists():
            continue
        _check_leakage(fold, patients, scheme)
        fold_dir.mkdir(parents=True, exist_ok=True)
        with np.load(npz, allow_pickle=False) as z:
            emb = {k: z[k] for k in z.files}
        ref_names = [str(x) for x in emb["reference_obs_names"]]
        # expression + groups of the reference, without touching patches
        ref = _expression_only(adatas, fold.reference)
        if ref.obs_names != ref_names:
            raise ValueError(f"{npz}: reference spots differ from the folds' sections.")
        k = min(top_k, len(ref))
        rows, per_section = [], {}
        sizes = np.bincount(ref.groups, minlength=len(ref.sections))
        for s in fold.test:
            t0 = time.time()
            pred = tl.retrieve(emb[f"test__{s}"], emb["reference"], ref.expr, top_k=k,
                               metric=metric, device=run_device)
            info = {"method": method, "scheme": scheme, "fold": fold.name, "top_k": k,
                    "metric": metric, "train_sections": list(fold.train),
                    "reference_sections": list(fold.reference),
                    "reference_n_spots": [int(n) for n in sizes], "n_reference": len(ref),
                    "rescored_from": source}
            pred_ad = tl.prediction_anndata(pred, adatas[s], info=info)
            _atomic_write_h5ad(pred_ad, fold_dir / f"pred_{s}.h5ad")
            scores, per_section[s] = _score(pred_ad, adatas[s], src_cfg.get("n_heg", 50))
            rows.append({"method": method, "scheme": scheme, "fold": fold.name,
                         "test_section": s, **scores, "seconds": time.time() - t0})
        _atomic_write_json(fold_dir / _METRICS, {
            "method": method, "scheme": scheme, "fold": fold.to_dict(), "rows": rows,
            "per_section": per_section, "top_k_used": k, "rescored_from": source})
    return _aggregate(out, all_folds)


@dataclass
class _ExprBank:
    expr: np.ndarray
    groups: np.ndarray
    sections: list
    obs_names: list

    def __len__(self) -> int:
        return len(self.expr)


def _expression_only(adatas, names) -> _ExprBank:
    expr = np.concatenate([_dense_f32(adatas[s].X) for s in names])
    groups = np.concatenate([np.full(adatas[s].n_obs, i) for i, s in enumerate(names)])
    obs = [str(o) for s in names for o in adatas[s].obs_names]
    return _ExprBank(expr, groups, list(names), obs)

