"""A cross-validation results folder: what ``config.json`` records, whether a folder
already holds this run, and preparing it for :func:`mclstexp_lite.cv.run_cv` /
:func:`mclstexp_lite.cv.rescore`.

A folder holds one (scheme, method, settings, data) run. :func:`run_config` is what
``config.json`` records (the training config, retrieval settings, gene panel, sections and
their patients, a fingerprint of every section's data, patch geometry, baseline and stain
settings); :func:`folder_identity` drops the keys that may differ between runs of the same
study and compares the training config by the one "same run?" rule
(:func:`mclstexp_lite.train.run_identity`); :func:`prepare_out_dir` refuses a folder
that holds another run unless told to replace it, and says when the folds asked for are
already complete (the results are then read back, not recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from . import __version__, _util
from . import _baselines as bl
from . import _stain as st
from ._folds import Fold

log = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "METRICS_FILE", "VOLATILE_KEYS", "RETRIEVAL_METHODS", "METHODS",
           "sha256_text",
           "fingerprint", "run_config", "folder_identity", "config_diff", "prepare_out_dir",
           "clear_folds", "stain_config"]

#: The run's settings, in every results folder.
CONFIG_FILE = "config.json"
#: A fold's record; its presence marks the fold complete.
METRICS_FILE = "metrics.json"
#: config.json keys that may differ between runs of the same study.
VOLATILE_KEYS = ("package_version", "created", "device")
#: Methods that retrieve from a reference bank (their ``top_k`` and ``metric`` count).
RETRIEVAL_METHODS = ("mclstexp", "bleep")
#: Methods :func:`mclstexp_lite.cv.run_cv` runs (the one list of them, ``cv.METHODS``):
#: the two retrieval models, then the baselines of :data:`mclstexp_lite._baselines.METHODS`.
METHODS = RETRIEVAL_METHODS + bl.METHODS


def sha256_text(items) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(str(x).encode())
        h.update(b"\n")
    return h.hexdigest()


def fingerprint(adata) -> dict:
    return {"n_spots": int(adata.n_obs),
            "obs_sha256": sha256_text(adata.obs_names),
            "expr_sha256": hashlib.sha256(
                _util.to_dense(adata.X, np.float32).tobytes()).hexdigest()}


def run_config(*, adatas, patients, scheme, method, config, top_k, metric, patch_um,
                patch_size, device) -> dict:
    genes = list(next(iter(adatas.values())).var_names)
    d = {
        "scheme": scheme,
        "method": method,
        "train_config": config.to_dict(),
        "top_k": int(top_k) if method in RETRIEVAL_METHODS else None,
        "metric": metric if method in RETRIEVAL_METHODS else None,
        "genes": {"n": len(genes), "sha256": sha256_text(genes)},
        "sections": dict(patients),
        "data": {s: fingerprint(a) for s, a in adatas.items()},
        "patch": {"patch_um": float(patch_um), "patch_size": int(patch_size)},
        "baseline": ({"alphas": list(bl.DEFAULT_ALPHAS),
                      "alpha_selection": "leave-one-training-section-out, MSE",
                      "features": (list(bl.COLOR_FEATURE_NAMES) if method == "ridge_color"
                                   else "frozen image encoder of train_config.model, "
                                        "seed train_config.seed, view 0 of the feature cache")}
                     if method in bl.RIDGE_METHODS else None),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
    }
    return d


def folder_identity(cfg: Mapping) -> dict:
    """What must match for a results folder to hold this run: ``config.json`` without
    its volatile keys, the training config compared by the one "same run?" rule
    (:func:`mclstexp_lite.train.run_identity`, with ``epochs``)."""
    from . import _checkpoint as checkpoint  # torch, only here

    d = {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}
    tc = dict(d.get("train_config") or {})
    try:
        tc = checkpoint.run_identity(tc, epochs=True)
    except (TypeError, ValueError):  # not a TrainConfig of this version: compare as written
        tc.pop("device", None)
    d["train_config"] = tc
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {_short(va)} -> {_short(vb)}")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def prepare_out_dir(out: Path, run_cfg: dict, all_folds: list[Fold], selected: list[Fold],
                     overwrite: bool) -> bool:
    """Make ``out`` ready for the folds ``selected`` of the run ``run_cfg``.

    Returns ``True``, and writes nothing, when ``out`` already holds this run with every
    selected fold complete (the caller reads the results instead); else writes
    ``config.json`` and returns ``False``. With ``overwrite`` the selected folds (all
    folds, for another configuration) are cleared first.

    Raises
    ------
    ValueError
        ``out`` holds another configuration (without ``overwrite``).
    FileExistsError
        ``out`` is a file, or a non-empty folder that is not a results folder.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} is a file, not a folder; choose another out_dir.")
    cfg_path = out / CONFIG_FILE
    if cfg_path.exists():
        with open(cfg_path) as fh:
            saved = json.load(fh)
        diff = config_diff(folder_identity(saved), folder_identity(run_cfg))
        if diff:
            if not overwrite:
                raise ValueError(
                    f"{out} holds results of a different configuration ({'; '.join(diff)}). "
                    "Use another out_dir, or overwrite=True to replace those results.")
            log.warning("%s: configuration changed (%s); replacing its results", out,
                        "; ".join(diff))
            clear_folds(out, all_folds)
        else:
            done = [f.name for f in selected if (out / f.name / METRICS_FILE).exists()]
            if len(done) == len(selected):
                if not overwrite:
                    log.info("%s already holds complete results for fold(s) %s", out, done)
                    return True
                clear_folds(out, selected)
            elif overwrite:
                clear_folds(out, selected)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and has no {CONFIG_FILE}, so it is not a run_cv "
            "results folder; choose another out_dir (nothing was written).")
    out.mkdir(parents=True, exist_ok=True)
    _util.atomic_write_json(cfg_path, run_cfg)
    return False


def clear_folds(out: Path, folds: Sequence[Fold]) -> None:
    """Remove the results run_cv writes for these folds (and the aggregated tables)."""
    for f in folds:
        d = out / f.name
        if d.is_dir():
            shutil.rmtree(d)
    for name in ("metrics.csv", "summary.csv", "summary.md"):
        (out / name).unlink(missing_ok=True)


def stain_config(stain) -> dict | None:
    """What ``run_cv(stain=...)`` records in ``config.json``; validates ``stain``."""
    if stain is None:
        return None
    if isinstance(stain, str):
        norm = st.StainNormalizer(stain)  # checks the method name
        return {"method": norm.method, "fit": "each fold's training sections, "
                "stain.fit_on_sections defaults", "settings": norm.settings()}
    if isinstance(stain, st.StainNormalizer):
        return {"method": stain.method, "fit": "given", "fingerprint": stain.fingerprint}
    raise TypeError(f"stain must be None, 'macenko', 'reinhard' or a fitted "
                    f"stain.StainNormalizer, got {type(stain).__name__}.")
