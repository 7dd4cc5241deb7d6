"""Glue the tutorials use: parameter checks, cached preparation, train-or-load, outputs.

The numbered notebooks pass results forward through files in one output folder
(``OUTPUT_DIR``), never through hidden state. Each notebook writes to
``OUTPUT_DIR/<notebook name>/`` and ends with ``metrics.json``; the functions here reuse
what an earlier notebook wrote, or produce it when the notebook runs alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from . import datasets as ds
from . import cv, pp
from . import download as dl
from ._progress import progress_bar
from ._util import atomic_write, atomic_write_h5ad, atomic_write_json, positive_int

__all__ = [
    "check_params",
    "check_own_files",
    "train_config",
    "untrained_model",
    "parameter_comparison",
    "prepared_sections",
    "train_or_load",
    "notebook_dir",
    "training_run_dir",
    "cv_dir",
    "checkpoint",
    "write_metrics",
    "save_figure",
    "cv_or_load",
    "atomic_write",
    "atomic_write_h5ad",
    "atomic_write_json",
]

log = logging.getLogger(__name__)



def __getattr__(name: str):
    # ``workflow.PROFILES`` is the one profile table, :data:`mclstexp_lite.train.PROFILES`
    # (looked up on first use, so importing this module does not import torch)
    if name == "PROFILES":
        from ._config import PROFILES

        return PROFILES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ parameters
def check_params(*, dataset: str, sections: Sequence[str], profile: str | None = None,
                 epochs: int | None = None, batch_size: int | None = None, methods=None, top_k=None,
                 test_section: str | None = None, data_dir=None, need_images: bool = True,
                 seed: int | None = None, labelled_section: str | None = None) -> None:
    """Stop early, with a message that says the fix, on bad notebook parameters.
    ``methods`` (notebook 03's ``METHODS``) must be a non-empty list of
    :data:`mclstexp_lite.cv.METHODS` and ``top_k`` a positive integer, when given.

    Checks the dataset and section names, the profile, positive epochs and batch size,
    that ``test_section`` is one of ``sections``, that ``labelled_section`` is one of
    ``sections`` with pathologist labels in the data manifest, and that every section's
    files are present locally or downloadable (offline: lists the missing files).
    """
    valid = {"her2st": ds.HER2ST_SECTIONS, "cscc": ds.CSCC_SECTIONS}
    if dataset not in valid:
        raise ValueError(f"DATASET={dataset!r} is not known; use one of {sorted(valid)}")
    if isinstance(sections, str) or not sections:
        raise ValueError(f"SECTIONS must be a non-empty list of section names, got {sections!r}")
    bad = [s for s in sections if s not in valid[dataset]]
    if bad:
        raise ValueError(f"SECTIONS has unknown {dataset} section(s) {bad}; valid: "
                         f"{', '.join(valid[dataset])}")
    if len(set(sections)) != len(sections):
        raise ValueError(f"SECTIONS lists a section twice: {list(sections)}")
    if profile is not None:
        from ._config import PROFILES

        if profile not in PROFILES:
            raise ValueError(f"PROFILE={profile!r} is not known; use one of {tuple(PROFILES)}")
    for name, value in (("EPOCHS", epochs), ("BATCH_SIZE", batch_size), ("TOP_K", top_k)):
        if value is not None:
            positive_int(value, name)
    if methods is not None:

        if isinstance(methods, str) or not methods or set(methods) - set(cv.METHODS):
            raise ValueError(f"METHODS must be a non-empty list from {list(cv.METHODS)}, got "
                             f"{methods!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"SEED must be an integer, got {seed!r}")
    if test_section is not None and test_section not in sections:
        raise ValueError(f"TEST_SECTION={test_section!r} must be one of SECTIONS {list(sections)}")
    if labelled_section is not None:
        if labelled_section not in sections:
            raise ValueError(f"LABELLED_SECTION={labelled_section!r} must be one of SECTIONS "
                             f"{list(sections)}")
        st = dl.status(dataset, data_dir=data_dir)
        labelled = list(dict.fromkeys(st.loc[st["kind"] == "labels", "section"].astype(str)))
        if labelled_section not in labelled:
            raise ValueError(f"LABELLED_SECTION={labelled_section!r} has no pathologist labels; "
                             f"{dataset} sections with labels: {', '.join(labelled) or 'none'}")
    offline = os.environ.get(dl.ENV_OFFLINE, "") in ("1", "true", "yes")
    if offline:
        table = ds.list_sections(dataset, data_dir=data_dir).set_index("section")
        col = "trainable" if need_images else "counts"
        missing = [s for s in sections if not table.loc[s, col]]
        if missing:
            avail = list(table.index[table[col]])
            raise ValueError(
                f"offline (MCLSTEXP_OFFLINE=1) and these sections lack local files: {missing}. "
                f"Sections available under {dl.data_dir(data_dir)}: {avail}. Point "
                f"MCLSTEXP_DATA at a folder with the data, allow downloads, or pick from those.")


def check_own_files(counts, spots, image, *, section, um_per_px=None,
                    spot_pitch_um=None, pixel_scale=1.0, gene_map=None) -> None:
    """Stop early, with a message that says the fix, on bad own-file parameters of
    notebook 01 (``COUNTS_PATH``, ``SPOTS_PATH``, ``IMAGE_PATH``, ``SECTION``,
    ``UM_PER_PX``, ``SPOT_PITCH_UM``, ``PIXEL_SCALE``, ``GENE_MAP_PATH``).

    The files themselves are checked by :func:`mclstexp_lite.datasets.from_files` when
    the notebook loads them.
    """
    for name, value in (("COUNTS_PATH", counts), ("SPOTS_PATH", spots), ("IMAGE_PATH", image),
                        ("GENE_MAP_PATH", gene_map)):
        if value is None:
            if name == "GENE_MAP_PATH":
                continue
            raise ValueError(f"{name} is None: your own section needs COUNTS_PATH, SPOTS_PATH "
                             "and IMAGE_PATH (set all three, or none of them for the "
                             "tutorial's HER2+ data).")
        if not isinstance(value, (str, os.PathLike)) or not Path(value).is_file():
            raise FileNotFoundError(
                f"{name}={value!r}: no such file (seen from {Path.cwd()}; the notebook runs "
                "in notebooks/, so give an absolute path).")
    if not isinstance(section, str) or not section.strip():
        raise ValueError(f"SECTION must be a non-empty name for your section, got {section!r}")
    for name, value, allow_none in (("UM_PER_PX", um_per_px, True),
                                    ("SPOT_PITCH_UM", spot_pitch_um, True),
                                    ("PIXEL_SCALE", pixel_scale, False)):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}" + (
                "" if not allow_none else " (or None to estimate it from the spots)"
                if name == "UM_PER_PX" else " (or None: the spot array's own, told from the "
                "layout of the spots)"))


def train_config(profile: str, *, epochs: int | None = None, batch_size: int | None = None,
                 seed: int | None = None, device: str = "auto"):
    """The notebooks' :class:`~mclstexp_lite.train.TrainConfig`: ``profile`` with the
    given overrides; ``None`` keeps the profile's own value (its epochs, batch size...)."""
    from . import train as tr

    over = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed))
            if v is not None}
    return tr.TrainConfig.profile(profile, device=device, **over)


def untrained_model(config, n_genes: int):
    """The :class:`~mclstexp_lite.models.MclSTExp` that ``config`` trains (its encoder,
    frozen or not, its spot encoder and heads), without pretrained weights: enough to
    count and draw its parts, and nothing is downloaded."""
    from . import train as tr

    cfg = tr.TrainConfig.from_dict({**config.to_dict(),
                                    "model": {**config.model, "weights": None}})
    return tr.build_model(cfg, n_genes)


def parameter_comparison(models: Mapping):
    """Parameters per part of several models side by side, trainable and frozen.

    Parameters
    ----------
    models
        ``{label: MclSTExp}``, e.g. ``{"paper": ..., "quick": ...}``.

    Returns
    -------
    pandas.DataFrame
        The parts of :meth:`~mclstexp_lite.models.MclSTExp.parameter_table` as rows;
        per label the columns ``<label>: parameters`` and ``<label>: trainable``; last,
        ``published code`` (the published implementation's counts, from the first
        model that has its architecture; left out when none has).
    """
    import pandas as pd

    cols, published = {}, None
    for label, model in models.items():
        t = model.parameter_table(trainable=True)
        cols[f"{label}: parameters"] = t["parameters"]
        cols[f"{label}: trainable"] = t["trainable"]
        if published is None and t["published"].notna().all():
            published = t["published"].astype("int64")
    if published is not None:
        cols["published code"] = published
    return pd.DataFrame(cols)


# ---------------------------------------------------------------- preparation
def _panel_hash(genes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()[:16]


def prepared_sections(dataset: str, sections: Sequence[str], *, output_dir,
                      genes: str | Sequence[str] = "published", method: str = "library_size",
                      data_dir=None, raw: Mapping | None = None, progress: bool = True) -> dict:
    """Load, subset to the gene panel and normalise each section, cached as .h5ad.

    Files: ``OUTPUT_DIR/prepared/<dataset>_<section>.h5ad`` with ``panel.txt`` beside
    them. A cached file is reused only when its panel and method match.

    ``raw`` (optional): ``{section: AnnData}`` of sections already loaded with
    :func:`mclstexp_lite.datasets.load` (as notebook 01 does), used instead of reading
    their files again; sections not in it are loaded.

    Returns
    -------
    dict
        ``{section: AnnData}`` in the order of ``sections``.
    """
    import anndata as ad


    if isinstance(genes, str):
        if genes != "published":
            raise ValueError("genes must be 'published' or a list of gene names")
        genes = pp.published_panel(dataset, data_dir=data_dir)
    genes = list(genes)
    folder = Path(output_dir) / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    key = {"panel": _panel_hash(genes), "method": method, "n_genes": len(genes)}
    out = {}
    for s in progress_bar(list(sections), desc="preparing sections", disable=not progress):
        path = folder / f"{dataset}_{s}.h5ad"
        if path.exists():
            a = ad.read_h5ad(path)
            if a.uns.get("mclstexp_prepared") == key:
                out[s] = a
                continue
            log.info("%s was prepared differently; rebuilding", path)
        if raw is not None and s in raw:
            section = raw[s]
        else:
            section = ds.load(dataset, s, data_dir=data_dir, progress=False)
        a = pp.prepare(section, genes, method=method, missing="zero")
        a.uns["mclstexp_prepared"] = key
        atomic_write_h5ad(a, path)
        out[s] = a
    pp.save_panel(genes, folder / "panel.txt",
                  provenance=f"{dataset} panel used by the tutorials ({len(genes)} genes)")
    return out


# -------------------------------------------------------------------- training
def train_or_load(train_adatas: Mapping, config, *, out_dir, progress: bool = True):
    """Train on ``train_adatas`` into ``out_dir`` or reuse a finished run there.

    A finished run of this training (same config, sections in order, genes and epochs:
    :func:`mclstexp_lite.train.run_mismatch`) is loaded as it is; an interrupted one
    resumes; a checkpoint of another config or data (e.g. another gene panel) is an error
    (use another folder). Returns ``(model, history, data)``.
    """
    from . import train as tr

    data = tr.SpotData.from_anndata(train_adatas, progress=progress)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / tr.CHECKPOINT
    if ckpt_path.exists():
        ck = tr.load_checkpoint(ckpt_path)
        if tr.run_mismatch(ck, config, sections=data.sections, genes=data.genes) is None:
            log.info("reusing the finished training run in %s", out_dir)
            return tr.load_model(ck), list(ck["history"]), data
    res = tr.train(data, config, out_dir=out_dir, resume=True, progress=progress)
    return res.model, res.history, data


# --------------------------------------------------------------------- outputs
def notebook_dir(output_dir, name: str) -> Path:
    """``OUTPUT_DIR/<name>``, created."""
    path = Path(output_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def training_run_dir(output_dir) -> Path:
    """Where notebook 02 keeps its training run (``OUTPUT_DIR/02_training/run``).

    Notebooks 03 and 06 reuse that run; ask here instead of building the path by hand.
    """
    return notebook_dir(output_dir, "02_training") / "run"


def cv_dir(output_dir, scheme: str, method: str) -> Path:
    """Where notebook 03 keeps one cross-validation run
    (``OUTPUT_DIR/03_evaluation/cv_<scheme>_<method>``); notebooks 04 and 05 read it."""
    if scheme not in ("section", "patient"):
        raise ValueError(f"scheme must be 'section' or 'patient', not {scheme!r}")
    return notebook_dir(output_dir, "03_evaluation") / f"cv_{scheme}_{method}"


def checkpoint(condition, what: str, *, hint: str = "") -> None:
    """A tutorial checkpoint: print ``checkpoint passed: <what>`` or stop the notebook.

    Parameters
    ----------
    condition
        What the learner's run must show (truthy when it does).
    what
        The claim in words, e.g. ``"training loss fell below chance (log N)"``.
    hint
        What to check when it fails (a parameter, an earlier cell, the data).

    Raises
    ------
    AssertionError
        With ``what`` and ``hint`` when ``condition`` is false.
    """
    if not bool(condition):
        msg = f"checkpoint failed: {what}."
        raise AssertionError(msg + (f" What to check: {hint}" if hint else ""))
    print(f"checkpoint passed: {what}")


def write_metrics(folder, metrics: dict) -> Path:
    """Write ``metrics.json`` atomically; NaN and infinities are written as ``null``."""
    path = Path(folder) / "metrics.json"
    clean = _no_nan(metrics)
    json.dumps(clean, allow_nan=False)  # fail here, with the offending value, not half-way
    atomic_write_json(path, clean)
    return path


def _no_nan(obj):
    """NaN/inf (e.g. a PCC of a constant prediction) become None: strict JSON has no NaN."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _no_nan(obj.item())
    return obj


def save_figure(fig, folder, name: str, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<folder>/<name>.png`` atomically."""
    return atomic_write(Path(folder) / f"{name}.png",
                           lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight"),
                           suffix=".png")


# --------------------------------------------------------------------------- CV
def cv_or_load(adatas: Mapping, *, scheme: str, method: str, config, out_dir, folds=None,
               top_k: int = 200, reuse: Mapping | None = None, progress: bool = True):
    """Run :func:`mclstexp_lite.cv.run_cv` and return the rows of the asked-for folds
    (every fold of ``scheme`` when ``folds`` is ``None``). Folds already complete in
    ``out_dir`` are read, not run again (a rerun of a notebook then costs nothing).
    ``reuse`` is run_cv's: finished runs of a fold's exact training, taken instead of
    training it again (notebook 03 passes notebook 02's model for its held-out section).

    :func:`~mclstexp_lite.cv.run_cv` checks the saved configuration: a folder holding
    results of another configuration is an error (choose another ``OUTPUT_DIR``); an
    incomplete one is resumed.
    """

    table = cv.run_cv(adatas, scheme=scheme, method=method, config=config, out_dir=out_dir,
                      folds=folds, top_k=top_k, reuse=reuse, progress=progress)
    names = folds if folds is not None else [
        f.name for f in cv.make_folds(cv.patients_of(adatas), scheme)]
    names = [names] if isinstance(names, str) else list(names)
    return table[table["fold"].astype(str).isin(names)].reset_index(drop=True)
