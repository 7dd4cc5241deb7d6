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
with :func:`mclstexp_lite.metrics.section_metrics`. Methods: ``"mclstexp"`` (the model),
``"bleep"`` (the BLEEP-style model, ``spot_encoder="none"``), and the baselines of
:mod:`mclstexp_lite._baselines` (``"mean"``, ``"ridge_features"``, ``"ridge_color"``).
The result tables (:func:`load_results`, :func:`method_summary`,
:func:`summary_markdown`, :func:`compare`) live in :mod:`mclstexp_lite._results` and are
re-exported here.

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
    From :func:`mclstexp_lite.train.train` (neural methods), or a copy of a finished run
    of the same training passed as ``reuse`` (its source is ``reused_from`` in the
    fold's ``metrics.json``).
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
    (:func:`method_summary`); for retrieval methods ``summary.md`` adds where the
    retrieved neighbours come from (:func:`neighbours_markdown`).
``neighbours.csv``
    Retrieval methods: per held-out section, the share of the top-k neighbours that
    are spots of the held-out patient's other sections (:func:`neighbour_shares`).

Every file is written atomically (temporary file in the same folder, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import _util
from . import _baselines as bl
from ._baselines import (color_features, encoder_features, fit_ridge, mean_expression,
                         ridge_fold, section_color_features)
from . import metrics as mt
from . import _stain as st
from ._patch_extract import DEFAULT_PATCH_UM
from ._folds import FOLDS_FILE as _FOLDS
from ._folds import (SCHEMES, Fold, check_folder_name, check_leakage, load_folds, make_folds,
                    patients_of, save_folds)
from ._results import summarize_results  # noqa: F401 - deprecated, warns once
from ._results import (NEIGHBOURS_FILE, compare, load_predictions, load_results,
                       method_summary, neighbour_shares, neighbours_markdown, shared_sections,
                       summary_markdown)
from ._run_folder import CONFIG_FILE as _CONFIG
from ._run_folder import METRICS_FILE as _METRICS
from ._run_folder import METHODS  # the methods run_cv runs: retrieval models, baselines
from ._run_folder import RETRIEVAL_METHODS as _NEURAL
from ._run_folder import fingerprint, prepare_out_dir, run_config, stain_config

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
    "method_summary",
    "summary_markdown",
    "compare",
    "neighbour_shares",
    "neighbours_markdown",
    "load_predictions",
    "shared_sections",
    "check_leakage",
    "mean_expression",
    "fit_ridge",
    "ridge_fold",
    "encoder_features",
    "color_features",
    "section_color_features",
]

#: Columns of the per-section metrics table (``metrics.csv``), in order.
ROW_COLUMNS = ("method", "scheme", "fold", "test_section", "pcc_acg", "pcc_heg", "mse",
               "mae", "n_spots", "n_genes", "n_constant_genes", "seconds")
_EMB = "embeddings.npz"


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
    reuse: Mapping | None = None,
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
        ``"ridge_color"`` (see :mod:`mclstexp_lite._baselines`).
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
        Without it, a folder whose selected folds are all complete is read, not
        recomputed (the table is returned, nothing is written), and a folder that holds
        another configuration is refused.
    progress
        Progress bars and log messages.
    device
        Where to train and predict.
    patch_um, patch_size
        Patch geometry for :meth:`mclstexp_lite.train.SpotData.from_anndata`
        (default: the package default tissue width, cached at 224 px and resized to
        the image encoder's input size on the fly).
    stain
        Stain normalisation of every patch (:mod:`mclstexp_lite._stain`): ``None`` (off),
        ``"macenko"`` or ``"reinhard"`` (fitted anew in every fold on the patches of
        that fold's *training* sections, :func:`mclstexp_lite.patches.fit_on_sections`
        with its defaults, and applied to training, reference and held-out patches), or
        a fitted :class:`mclstexp_lite.patches.StainNormalizer` used in every fold. It is
        part of ``config.json`` (a folder with another setting is refused); each fold's
        ``metrics.json`` keeps its fitted normaliser under ``stain``.
    reuse
        Finished training runs to take instead of training a fold again:
        ``{fold name: run folder or checkpoint file}``, e.g. notebook 02's model for the
        section fold of its held-out section. Neural methods only. A run is taken (copied
        into the fold's folder) only when it has the fold's config (epochs and seed
        included), training sections (in order) and genes, and finished every epoch;
        otherwise the fold trains as usual and the reason is logged. A fold folder that
        already holds a checkpoint keeps it.

    Returns
    -------
    pandas.DataFrame
        Contents of ``metrics.csv``: one row per held-out section of every completed
        fold of this folder, columns :data:`ROW_COLUMNS` (also when every selected fold
        was complete already and nothing ran). ``seconds`` is the fit
        time of the fold (summed epoch times for neural methods, also after a resume)
        plus its embedding/feature time plus the prediction time of that section.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file, or a non-empty folder that is not a results folder.
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
    adatas = _check_adatas(adatas)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
    cfg = method_config(method, config)
    top_k = _util.positive_int(top_k, "top_k")
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}.")
    patch_um = DEFAULT_PATCH_UM if patch_um is None else float(patch_um)
    n_genes = next(iter(adatas.values())).n_vars
    if isinstance(n_heg, bool) or not isinstance(n_heg, (int, np.integer)) or not 1 <= n_heg <= n_genes:
        raise ValueError(f"n_heg must be an integer between 1 and the number of genes "
                         f"({n_genes}), got {n_heg!r}.")
    stain_cfg = stain_config(stain)
    patients = patients_of(adatas)
    all_folds = make_folds(patients, scheme)
    selected = _select(all_folds, folds)
    out = Path(out_dir)
    run_cfg = run_config(adatas=adatas, patients=patients, scheme=scheme, method=method,
                          config=cfg, top_k=top_k, metric=metric, patch_um=patch_um,
                          patch_size=patch_size, device=device)
    run_cfg["n_heg"] = int(n_heg)
    if stain_cfg is not None:  # absent when off, so folders written before still match
        run_cfg["stain"] = stain_cfg
    if prepare_out_dir(out, run_cfg, all_folds, selected, overwrite):
        return _finished_table(out, all_folds)
    save_folds(all_folds, out / _FOLDS, scheme=scheme, sections=patients)
    geometry = {"patch_um": patch_um, "patch_size": patch_size}
    for fold in selected:
        fold_dir = out / fold.name
        if (fold_dir / _METRICS).exists():
            if progress:
                log.info("%s: fold %s already complete, skipped", out, fold.name)
            continue
        check_leakage(fold, patients, scheme)
        fold_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        fold_geometry, normaliser = geometry, _fold_stain(stain, adatas, fold, geometry, progress)
        if normaliser is not None:
            fold_geometry = dict(geometry, stain=normaliser)
        record = _run_fold(fold, adatas, method=method, scheme=scheme, config=cfg,
                           fold_dir=fold_dir, top_k=top_k, metric=metric, device=device,
                           geometry=fold_geometry, n_heg=n_heg, progress=progress,
                           reuse=(reuse or {}).get(fold.name))
        if normaliser is not None:
            record["stain"] = normaliser.to_dict()
        record["wall_seconds_this_run"] = time.time() - t0
        _util.atomic_write_json(fold_dir / _METRICS, record)
        if progress:
            for r in record["rows"]:
                log.info("%s %s fold %s / %s: PCC-ACG %.3f PCC-HEG %.3f MSE %.4f", method,
                         scheme, fold.name, r["test_section"], r["pcc_acg"], r["pcc_heg"],
                         r["mse"])
    return _aggregate(out, all_folds)


def _fold_stain(stain, adatas, fold: Fold, geometry, progress):
    """The fold's normaliser: ``stain`` itself, or one fitted on the fold's training sections."""
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


def _take_finished_run(source, fold: Fold, fold_dir: Path, config, data) -> str | None:
    """Copy the finished run ``source`` into ``fold_dir`` when it is this fold's training
    (config with epochs and seed, sections in order, genes); its path, else ``None``."""
    from . import train as tr

    dst = fold_dir / tr.CHECKPOINT
    src = Path(source)
    src = src / tr.CHECKPOINT if src.is_dir() else src
    if dst.exists() or not src.is_file():
        if not dst.exists():
            log.info("fold %s: no checkpoint at %s to reuse; training", fold.name, src)
        return None
    ck = tr.load_checkpoint(src)
    why = tr.run_mismatch(ck, config, sections=data.sections, genes=data.genes)
    if why is not None:
        log.info("fold %s: not reusing %s (%s); training", fold.name, src, why)
        return None
    _util.atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), suffix=".pt")
    _util.atomic_write_json(fold_dir / "history.json", list(ck["history"]))
    log.info("fold %s: reusing the finished run %s", fold.name, src)
    return str(src.resolve())


def _run_fold(fold: Fold, adatas, *, method, scheme, config, fold_dir: Path, top_k, metric,
              device, geometry, n_heg, progress, reuse=None) -> dict:
    from . import tl
    from . import train as tr

    details: dict = {"method": method, "scheme": scheme, "fold": fold.to_dict()}
    preds: dict = {}
    extra_secs: dict = {s: 0.0 for s in fold.test}
    if method in _NEURAL:
        train_data = _spot_data(adatas, fold.train, geometry, progress)
        ref_data = (train_data if tuple(fold.reference) == tuple(fold.train)
                    else _spot_data(adatas, fold.reference, geometry, progress))
        if reuse is not None:
            details["reused_from"] = _take_finished_run(reuse, fold, fold_dir, config,
                                                        train_data)
        result = tr.train(train_data, config, out_dir=fold_dir, resume=True,
                          progress=progress)
        fit_seconds = float(sum(h["seconds"] for h in result.history))
        details["history"] = result.history
        ckpt_sha = _util.sha256_file(fold_dir / tr.CHECKPOINT)
        expect = {"checkpoint_sha256": np.array(ckpt_sha),
                  "reference_obs_names": np.array(ref_data.obs_names, dtype=str)}
        for s in fold.test:
            expect[f"test_obs_names__{s}"] = np.array(adatas[s].obs_names, dtype=str)
        emb = _util.load_matching_npz(fold_dir / _EMB, expect)
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
            _util.atomic_savez(fold_dir / _EMB, emb)
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
    elif method == "mean":
        t0 = time.time()
        train_expr = np.concatenate([_util.to_dense(adatas[s].X, np.float32)
                                     for s in fold.train])
        mean = bl.mean_expression(train_expr)
        fit_seconds = time.time() - t0
        embed_seconds = 0.0
        for s in fold.test:
            preds[s] = np.broadcast_to(mean, (adatas[s].n_obs, mean.size))
    else:
        ridge = bl.ridge_fold(method, adatas, train=fold.train, test=fold.test, config=config,
                              patch_um=geometry["patch_um"], patch_size=geometry["patch_size"],
                              stain=geometry.get("stain"), device=device, progress=progress,
                              cache=fold_dir / _EMB)
        preds, fit_seconds = ridge["predictions"], ridge["fit_seconds"]
        embed_seconds = ridge["feature_seconds"]
        extra_secs.update(ridge["predict_seconds"])
        details["ridge_alpha"] = ridge["alpha"]
    if method not in _NEURAL:
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
                {k: _util.h5ad_value(v) for k, v in info.items() if k != "model_config"})
        else:
            pred_ad = tl.prediction_anndata(preds[s], adatas[s], info=info)
        _util.atomic_write_h5ad(pred_ad, fold_dir / f"pred_{s}.h5ad")
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
    m = mt.section_metrics(pred_ad.X, _util.to_dense(truth.X, np.float32),
                     genes=list(truth.var_names), n_heg=n_heg)
    return ({c: m[c] for c in ROW_COLUMNS[4:11]},
            {k: m[k] for k in ("n_heg", "n_constant_heg", "heg_genes")})


# ====================================================================== aggregation
def _aggregate(out: Path, all_folds: Sequence[Fold]) -> pd.DataFrame:
    rows = []
    for f in all_folds:
        p = out / f.name / _METRICS
        if p.exists():
            with open(p) as fh:
                rows.extend(json.load(fh)["rows"])
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    _util.atomic_write_text(out / "metrics.csv", df.to_csv(index=False))
    if len(df):
        table = method_summary(df)
        table = _with_top_k(table, out)
        md = summary_markdown(table)
        shares = neighbour_shares(out) if table["top_k"].notna().all() else None
        if shares is not None and len(shares):
            _util.atomic_write_text(out / NEIGHBOURS_FILE, shares.to_csv(index=False))
            md += "\n\n" + neighbours_markdown(shares)
        _util.atomic_write_text(out / "summary.csv", table.to_csv(index=False))
        _util.atomic_write_text(out / "summary.md", md + "\n")
    return df


def _finished_table(out: Path, all_folds: Sequence[Fold]) -> pd.DataFrame:
    """The table of a folder whose asked-for folds are complete: ``metrics.csv`` as
    written, or aggregated now if a run stopped between a fold's ``metrics.json`` and
    the tables."""
    if (out / "metrics.csv").exists():
        return load_results(out)
    return _aggregate(out, all_folds)


def _with_top_k(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    with open(out / _CONFIG) as fh:
        cfg = json.load(fh)
    table = table.copy()
    table.insert(2, "top_k", cfg.get("top_k"))
    return table


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
    data_fp = {s: fingerprint(a) for s, a in adatas.items()}
    if data_fp != src_cfg["data"] or patients != src_cfg["sections"]:
        raise ValueError(f"`adatas` are not the sections {src} was computed from (spots or "
                         "expression differ); load and prepare them the same way.")
    top_k = _util.positive_int(top_k, "top_k")
    metric = src_cfg["metric"] if metric is None else metric
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}.")
    all_folds = load_folds(src / _FOLDS)
    scheme = src_cfg["scheme"]
    run_cfg = dict(src_cfg)
    source = str(src.resolve())
    run_device = tr.resolve_device(device)
    genes = [str(g) for g in next(iter(adatas.values())).var_names]
    run_cfg.update({"top_k": top_k, "metric": metric, "rescored_from": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device)})
    out = Path(out_dir)
    if prepare_out_dir(out, run_cfg, all_folds, all_folds, overwrite):
        return _finished_table(out, all_folds)
    save_folds(all_folds, out / _FOLDS, scheme=scheme, sections=patients)
    for fold in all_folds:
        npz = src / fold.name / _EMB
        if not (src / fold.name / _METRICS).exists() or not npz.exists():
            # a fold the run never started (it ran a subset, folds=) is no news; one
            # started and left incomplete is
            (log.warning if (src / fold.name).exists() else log.info)(
                "%s: fold %s is not complete there; skipped", src, fold.name)
            continue
        fold_dir = out / fold.name
        if (fold_dir / _METRICS).exists():
            continue
        check_leakage(fold, patients, scheme)
        fold_dir.mkdir(parents=True, exist_ok=True)
        with np.load(npz, allow_pickle=False) as z:
            emb = {k: z[k] for k in z.files}
        ref_names = [str(x) for x in emb["reference_obs_names"]]
        # expression + groups of the reference, without touching patches (as the model
        # reads it: per-section centred for expr_norm="center", mclstexp_lite._inputs)
        ref = _expression_only(adatas, fold.reference, src_cfg.get("train_config") or {})
        if ref.obs_names != ref_names:
            raise ValueError(f"{npz}: reference spots differ from the folds' sections.")
        k = min(top_k, len(ref))
        rows, per_section = [], {}
        bank = tl.ReferenceBank(emb=np.asarray(emb["reference"], dtype=np.float32),
                                expr=ref.expr, genes=genes,
                                sections=list(ref.sections),
                                n_spots=[int(n) for n in np.bincount(
                                    ref.groups, minlength=len(ref.sections))])
        for s in fold.test:
            t0 = time.time()
            pred_ad = tl.predict_spots(None, bank, adatas[s], image_emb=emb[f"test__{s}"],
                                       top_k=k, metric=metric, device=run_device,
                                       method=method, info={
                                           "scheme": scheme, "fold": fold.name,
                                           "train_sections": list(fold.train),
                                           "rescored_from": source})
            _util.atomic_write_h5ad(pred_ad, fold_dir / f"pred_{s}.h5ad")
            scores, per_section[s] = _score(pred_ad, adatas[s], src_cfg.get("n_heg", 50))
            rows.append({"method": method, "scheme": scheme, "fold": fold.name,
                         "test_section": s, **scores, "seconds": time.time() - t0})
        _util.atomic_write_json(fold_dir / _METRICS, {
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


def _expression_only(adatas, names, train_config=None) -> _ExprBank:
    from ._inputs import center_expression

    expr = np.concatenate([_util.to_dense(adatas[s].X, np.float32) for s in names])
    groups = np.concatenate([np.full(adatas[s].n_obs, i) for i, s in enumerate(names)])
    if (train_config or {}).get("expr_norm") == "center":
        expr = center_expression(expr, groups)
    obs = [str(o) for s in names for o in adatas[s].obs_names]
    return _ExprBank(expr, groups, list(names), obs)

