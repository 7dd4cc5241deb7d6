"""Checkpoints: write and read them, build a model, the one "same run?" rule.

A checkpoint is one dict (model and optimiser states, model and training config, epoch,
history, RNG states, genes, sections, preprocessing) written atomically after every
epoch (:func:`save_checkpoint`) and read with ``weights_only=True``
(:func:`load_checkpoint`). A model is built one way, :func:`build_model` (from a
training config, or from the model config a checkpoint saved), and read back one way,
:func:`load_model` (a checkpoint path or an already loaded checkpoint or predictor).

"Same run?": :func:`run_identity` / :func:`same_run` / :func:`run_diff` compare two
training configs (what the cross-validation results folders compare,
:mod:`mclstexp_lite._run_folder`); :func:`run_mismatch` compares a checkpoint with a
training (config, sections in order, genes, epochs): what resume
(:func:`mclstexp_lite.train.train`), :func:`mclstexp_lite.workflow.train_or_load` and
the reuse of finished runs in :func:`mclstexp_lite.cv.run_cv` ask.
Re-exported by :mod:`mclstexp_lite.train`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from . import _util
from . import models as mdl
from ._util import atomic_write
from ._config import TrainConfig, input_size_of

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "build_model", "load_model",
           "run_identity", "same_run", "run_diff", "run_mismatch"]

#: File name of the checkpoint inside a run's folder.
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: str | os.PathLike, *, model: mdl.MclSTExp, optimizer, config,
                    epoch: int, history: list, genes: Sequence[str],
                    sections: Sequence[str]) -> None:
    """Write a training checkpoint atomically: one dict of the model and optimiser
    states, the model's and the training config, the epoch, the history, the RNG states,
    the genes and sections trained on and the encoder's preprocessing. The genes are
    also recorded on the model (``model.genes``), so that a reference prepared with
    another gene order is refused (:func:`mclstexp_lite.tl.check_model_reference`)."""
    model.genes = [str(g) for g in genes]
    obj = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "model_config": model.config, "config": config.to_dict(),
        "epoch": epoch, "history": history, "rng": _rng_state(),
        "genes": list(genes), "sections": list(sections),
        "preprocessing": model.preprocessing,
    }
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain types and tensors only, so the checkpoint loads with weights_only=True
    st = {"torch": torch.get_rng_state(),
          "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                    int(has_gauss), float(cached)],
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read a checkpoint (``weights_only=True``: no arbitrary code is unpickled)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = _util.torch_load_plain(path, what="checkpoint", map_location=map_location,
                                  fix="It may be truncated; delete it and train again")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not an mclstexp_lite checkpoint (it holds a "
                         f"{type(ckpt).__name__}, not a dict)")
    for key in ("model", "model_config", "config", "epoch", "history"):
        if key not in ckpt:
            raise ValueError(f"{path} is not an mclstexp_lite checkpoint (no '{key}')")
    return ckpt


def build_model(config: TrainConfig | Mapping, n_genes: int | None = None, *,
                preprocessing: Mapping | None = None) -> mdl.MclSTExp:
    """The :class:`~mclstexp_lite.models.MclSTExp` a config describes, with fresh weights.

    Parameters
    ----------
    config
        A :class:`~mclstexp_lite.train.TrainConfig`: the model it trains, for
        ``n_genes`` genes (``mode="frozen"`` freezes the image encoder;
        ``config.image_size``, if set, becomes the model's ``image_size``; the input
        options ``feature_norm``, ``expr_norm``, ``context``, ``context_um``,
        ``wide_view`` are recorded in the model). Or a model config as a checkpoint or
        a predictor saves it (``model.config``: the number of genes and the whole
        architecture), to rebuild that model (:func:`load_model` then loads its weights).
    n_genes
        Number of genes; needed with a ``TrainConfig``, read from a model config.
    preprocessing
        With a model config: the preprocessing (input size, mean, std) the saved encoder
        was trained with; it must be what the rebuilt encoder uses.

    Raises
    ------
    ValueError
        A model config whose image encoder cannot be rebuilt here (a missing package, an
        unknown encoder) or uses other preprocessing than ``preprocessing``.
    """
    if isinstance(config, TrainConfig):
        if n_genes is None:
            raise TypeError("build_model(config, n_genes): a TrainConfig needs the number "
                            "of genes the model predicts")
        kw = dict(config.model)
        kw.update(config.model_inputs())
        if config.mode == "frozen":
            kw["freeze_image"] = True
        if config.image_size is not None:
            kw["image_size"] = int(config.image_size)
        return mdl.MclSTExp(n_genes, **kw)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a TrainConfig or a saved model config (dict), got "
                        f"{type(config).__name__}")
    mc = dict(config)
    if n_genes is not None and int(n_genes) != int(mc.get("n_genes", n_genes)):
        raise ValueError(f"the model config is for {mc['n_genes']} genes, not {n_genes}")
    model = _model_from_config(mc)
    if preprocessing is not None:
        mine = model.preprocessing
        diff = {k: (preprocessing.get(k), mine.get(k)) for k in ("image_size", "mean", "std")
                if preprocessing.get(k) != mine.get(k)}
        if diff:
            raise ValueError(
                f"the checkpoint's encoder was trained with other preprocessing than "
                f"{mc.get('image_arch')!r} uses here (saved, here): {diff}. The encoder's "
                "defaults changed (e.g. another timm version); use the versions that wrote "
                "the checkpoint.")
    return model


def _model_from_config(mc: dict) -> mdl.MclSTExp:
    try:
        return mdl.MclSTExp.from_config(mc)
    except (ImportError, RuntimeError, OSError, KeyError) as exc:
        raise ValueError(
            f"the checkpoint's image encoder {mc.get('image_arch')!r} cannot be rebuilt here "
            f"({type(exc).__name__}: {exc}). Install what it needs (for 'timm:' encoders the "
            "same timm version and, for hub models, access to the model), or use the "
            "mclstexp_lite version that wrote the checkpoint.") from exc
    except ValueError as exc:
        if "encoder" not in str(exc) and "timm" not in str(exc):
            raise
        raise ValueError(
            f"the checkpoint's image encoder {mc.get('image_arch')!r} cannot be rebuilt here "
            f"({exc}). Install what it needs, or use the mclstexp_lite version that wrote "
            "the checkpoint.") from exc


def load_model(source: str | os.PathLike | Mapping, *, map_location="cpu") -> mdl.MclSTExp:
    """The trained model of a checkpoint, in eval mode: the one way to get a model back.

    Parameters
    ----------
    source
        A checkpoint file or a run folder holding ``checkpoint.pt`` (read with
        :func:`load_checkpoint`), or an already loaded checkpoint-like dict: a training
        checkpoint or a predictor file's contents (:mod:`mclstexp_lite.predict`). It
        needs ``model_config`` and ``model`` (the state dict) and may hold
        ``preprocessing`` (checked against the rebuilt encoder), ``config`` and ``genes``.
    map_location
        Where tensors are loaded (for a path).

    Returns
    -------
    MclSTExp
        The architecture rebuilt from the saved model config (:func:`build_model`), its
        weights loaded, ``model.genes`` set from the checkpoint's genes (what a reference
        must match name by name, :func:`mclstexp_lite.tl.check_model_reference`).

    Notes
    -----
    Checkpoints written before the encoder registry kept the input size only in the
    training config; it is taken from there.
    """
    if isinstance(source, Mapping):
        ckpt = dict(source)
        missing = [k for k in ("model_config", "model") if k not in ckpt]
        if missing:
            raise ValueError(f"not a checkpoint: the dict lacks {missing}; pass a checkpoint "
                             "path, or what load_checkpoint returns")
    else:
        ckpt = load_checkpoint(source, map_location=map_location)
    mc = dict(ckpt["model_config"])
    if "image_size" not in mc:
        mc["image_size"] = (ckpt.get("config") or {}).get("image_size")
    model = build_model(mc, preprocessing=ckpt.get("preprocessing"))
    model.load_state_dict(ckpt["model"])
    if ckpt.get("genes") is not None:  # what a reference must match, name by name
        model.genes = [str(g) for g in ckpt["genes"]]
    return model.eval()


# ===================================================================== same run?
def run_identity(config: TrainConfig | Mapping, *, epochs: bool = False) -> dict:
    """What decides whether two training configs describe the same run.

    Every :class:`~mclstexp_lite.train.TrainConfig` field except ``device`` (where a run
    computes, not what) and, unless ``epochs=True``, ``epochs`` (a resumed run may extend
    them); ``image_size=None`` is replaced by the size it means (the encoder's own), so
    an explicit default equals ``None``. ``config`` may be a ``TrainConfig`` or its dict.
    """
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    d = config.to_dict()
    d.pop("device")
    if not epochs:
        d.pop("epochs")
    if d.get("image_size") is None:  # None means the encoder's own size: compare that
        try:
            d["image_size"] = input_size_of(config)
        except ValueError:
            pass
    return d


def same_run(a: TrainConfig | Mapping, b: TrainConfig | Mapping, *,
             epochs: bool = False) -> bool:
    """``True`` when ``a`` and ``b`` describe the same run (:func:`run_identity`)."""
    return run_identity(a, epochs=epochs) == run_identity(b, epochs=epochs)


def run_diff(a: TrainConfig | Mapping, b: TrainConfig | Mapping, *,
             epochs: bool = False) -> dict:
    """``{field: (value in a, value in b)}`` for the fields of :func:`run_identity` that
    differ (empty when :func:`same_run`)."""
    ia, ib = run_identity(a, epochs=epochs), run_identity(b, epochs=epochs)
    return {k: (v, ib.get(k)) for k, v in ia.items() if ib.get(k) != v}


def _short_list(items, n: int = 6) -> str:
    items = [str(x) for x in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def run_mismatch(ckpt: Mapping, config: TrainConfig | Mapping, *, sections: Sequence[str],
                 genes: Sequence[str], finished: bool = True) -> str | None:
    """Whether the checkpoint ``ckpt`` is this training: the one "same run?" rule for
    checkpoints, used by resume (:func:`mclstexp_lite.train.train`), by
    :func:`mclstexp_lite.workflow.train_or_load` and by the reuse of finished runs in
    :func:`mclstexp_lite.cv.run_cv`.

    Parameters
    ----------
    ckpt
        A loaded checkpoint (:func:`load_checkpoint`).
    config
        The training config asked for (:class:`~mclstexp_lite.train.TrainConfig` or its
        dict), compared by :func:`run_identity`.
    sections, genes
        The training data's sections and genes, compared in order with the ones the
        checkpoint was trained on.
    finished
        ``True``: the checkpoint must be a finished run of exactly this training (epochs
        compared too, every epoch done). ``False``: a run that ``config`` may continue
        (resume): its epochs may differ and it may be unfinished.

    Returns
    -------
    str or None
        ``None`` when it is the same run, else a sentence naming what differs (the
        config fields with both values, the sections or genes, the epochs done).
    """
    diff = run_diff(ckpt["config"], config, epochs=finished)
    if diff:
        return f"it was trained with a different config {diff}"
    for what, mine in (("sections", list(sections)), ("genes", list(genes))):
        theirs = ckpt.get(what)
        if theirs is None:
            return f"it does not record the {what} it was trained on"
        theirs = [str(x) for x in theirs]
        if theirs != [str(x) for x in mine]:
            order = ("; the same ones in another order"
                     if sorted(theirs) == sorted(map(str, mine)) else "")
            return (f"it was trained on other {what} ({len(theirs)}: {_short_list(theirs)}) "
                    f"than the data given ({len(mine)}: {_short_list(mine)}){order}")
    if finished:
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        epochs = int(cfg.epochs)
        if int(ckpt["epoch"]) < epochs:
            return f"it is unfinished ({ckpt['epoch']} of {epochs} epochs)"
    return None
