"""Checkpoints: write, read, rebuild the model; build a model from a config; the
one "same run?" rule.

A checkpoint is one dict (model and optimiser states, model and training config, epoch,
history, RNG states, genes, sections, preprocessing) written atomically after every
epoch (:func:`save_checkpoint`) and read with ``weights_only=True``
(:func:`load_checkpoint`). :func:`run_identity` / :func:`same_run` decide whether two
training configs describe the same run: what resume (:func:`mclstexp_lite.train.train`),
:func:`mclstexp_lite.workflow.train_or_load` and the cross-validation results folders
(:mod:`mclstexp_lite.cv`) compare. Re-exported by :mod:`mclstexp_lite.train`.
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
from .config import TrainConfig, input_size_of

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "model_from_checkpoint",
           "model_from_state", "rebuild_model", "build_model", "run_identity", "same_run",
           "run_diff"]

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


def model_from_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> mdl.MclSTExp:
    """Rebuild the model from a checkpoint's saved config and load its weights."""
    return model_from_state(load_checkpoint(path, map_location=map_location))


def model_from_state(ckpt: Mapping) -> mdl.MclSTExp:
    """The model of an already loaded checkpoint-like dict, in eval mode.

    ``ckpt`` needs ``model_config`` and ``model`` (the state dict) and may hold
    ``preprocessing`` (checked against the rebuilt encoder), ``config`` and ``genes``
    (set as ``model.genes``, which :func:`mclstexp_lite.tl.check_model_reference`
    compares name by name with a reference); a training checkpoint
    (:func:`load_checkpoint`) and a predictor (:mod:`mclstexp_lite.predict`) both qualify.
    """
    ckpt = dict(ckpt)
    model = rebuild_model(ckpt)
    model.load_state_dict(ckpt["model"])
    if ckpt.get("genes") is not None:  # what a reference must match, name by name
        model.genes = [str(g) for g in ckpt["genes"]]
    return model.eval()


def rebuild_model(ckpt: Mapping) -> mdl.MclSTExp:
    """The architecture of a checkpoint (weights not loaded), with its preprocessing.

    Checkpoints written before the encoder registry kept the input size only in the
    training config; it is taken from there. The preprocessing recorded in the
    checkpoint (input size, mean, std) must be what the rebuilt encoder uses.
    """
    mc = dict(ckpt["model_config"])
    if "image_size" not in mc:
        mc["image_size"] = (ckpt.get("config") or {}).get("image_size")
    try:
        model = mdl.MclSTExp.from_config(mc)
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
    saved = ckpt.get("preprocessing")
    if saved is not None:
        mine = model.preprocessing
        diff = {k: (saved.get(k), mine.get(k)) for k in ("image_size", "mean", "std")
                if saved.get(k) != mine.get(k)}
        if diff:
            raise ValueError(
                f"the checkpoint's encoder was trained with other preprocessing than "
                f"{mc.get('image_arch')!r} uses here (saved, here): {diff}. The encoder's "
                "defaults changed (e.g. another timm version); use the versions that wrote "
                "the checkpoint.")
    return model


def build_model(config: TrainConfig, n_genes: int) -> mdl.MclSTExp:
    """The :class:`~mclstexp_lite.models.MclSTExp` that ``config`` trains (``n_genes`` genes).

    ``mode="frozen"`` freezes the image encoder; ``config.image_size`` (if set) becomes
    the model's ``image_size``; the input options (``feature_norm``, ``expr_norm``,
    ``context``, ``context_um``, ``wide_view``) are recorded in the model.
    """
    kw = dict(config.model)
    kw.update(config.model_inputs())
    if config.mode == "frozen":
        kw["freeze_image"] = True
    if config.image_size is not None:
        kw["image_size"] = int(config.image_size)
    return mdl.MclSTExp(n_genes, **kw)


# ===================================================================== same run?
def run_identity(config: TrainConfig | Mapping, *, epochs: bool = False) -> dict:
    """What decides whether two training configs describe the same run.

    Every :class:`~mclstexp_lite.config.TrainConfig` field except ``device`` (where a run
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
