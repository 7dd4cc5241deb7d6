"""The contrastive trainer, its configuration, checkpoints and embedding helpers.

Reads top to bottom like a small training script: a :class:`TrainConfig` (the paper's
defaults, or the ``quick`` CPU profile as overrides of the same code path), the data
(:class:`SpotData`: cached uint8 patches plus expression, positions and section ids), the
model (:class:`mclstexp_lite.models.MclSTExp`), the optimiser and the loop.

On CUDA the loop uses bf16 autocast, channels-last images, pinned host memory and
augments uint8 batches on the device (:func:`mclstexp_lite.patches.gpu_augment`); no
PIL work happens per item. After every epoch a checkpoint (one dict: model, optimiser,
config, epoch, history, RNG states) is written atomically; ``resume=True`` continues an
interrupted run and, on CPU with a fixed seed, reaches exactly the weights of an
uninterrupted run, because every epoch's randomness is derived from ``(seed, epoch)``.

Multi-GPU: run the same code under ``torchrun --nproc_per_node N``; :func:`train`
notices the process group (``WORLD_SIZE`` > 1), wraps the model in
``DistributedDataParallel`` and gives each rank its share of every epoch's batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import features as fx
from . import models as mdl
from . import patches as pt
from .download import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


# =========================================================================== config
@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    The defaults are the paper's: 90 epochs, batch 128, learning rate 1e-4, weight decay
    1e-3, Adam (as in the published code; the paper's text says AdamW, select it with
    ``optimizer="adamw"``), DenseNet-121 with ImageNet weights at 224 px, fine-tuned end
    to end. Named profiles (:data:`PROFILES`) change numbers, not code paths.

    Attributes
    ----------
    model
        Keyword arguments for :class:`mclstexp_lite.models.MclSTExp` (``n_genes`` is
        taken from the data).
    image_size
        Side of the image encoder's input; ``None`` (default): the encoder's own
        (224 px for the built-in encoders, :mod:`mclstexp_lite.encoders`). Cached patches
        (224 px) are resized when this differs; the tissue area stays the same. Stored
        in the model's config, so the checkpoint says how to feed the encoder.
    mode
        ``"full"`` trains everything end to end (the paper). ``"frozen"`` freezes the
        image encoder, takes its features of every patch from the on-disk feature cache
        (:mod:`mclstexp_lite.features`, computed once per section, encoder and weights)
        and trains the projection heads and the spot encoder on them: the field's
        frozen-encoder protocol, and seconds per epoch on a CPU.
    feature_views
        ``"frozen"`` only: dihedral views of each patch (1-8; view 0 is the patch as
        cut) whose features are cached; each epoch every spot uses one of them at
        random. 1 (default) means no augmentation.
    augment, rotation, jitter
        ``"full"`` only: random flips, rotations (``"90"``: multiples of 90 degrees,
        ``"any"``: any angle, as the published RandomRotation(180)) and colour jitter of
        brightness, contrast and saturation (0.5 each in the published code), applied on
        the device.
    amp
        ``"auto"``: bf16 autocast on CUDA devices that support it, off elsewhere;
        ``"bf16"`` or ``"off"`` force it.
    channels_last
        ``None``: on for CUDA, off elsewhere.
    """

    epochs: int = 90
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    image_size: int | None = None
    mode: str = "full"
    feature_views: int = 1
    augment: bool = True
    rotation: str | None = "90"
    jitter: float = 0.5
    min_batch: int = 2
    model: dict = field(default_factory=lambda: {"image_arch": "densenet121",
                                                 "weights": "imagenet"})

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "batch_size", "image_size", "min_batch", "feature_views"):
            v = getattr(self, name)
            if v is None and name == "image_size":
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if self.feature_views > fx.N_VIEWS:
            raise ValueError(f"TrainConfig.feature_views must be at most {fx.N_VIEWS} (the "
                             f"dihedral views of a patch), got {self.feature_views}")
        if self.mode == "lite":
            raise ValueError("TrainConfig.mode='lite' was renamed 'frozen' (frozen encoder, "
                             "features from the on-disk cache); use mode='frozen'")
        if self.mode == "full" and self.feature_views != 1:
            raise ValueError(f"TrainConfig.feature_views={self.feature_views} applies to "
                             "mode='frozen' only (cached views of the frozen features); "
                             "mode='full' augments the pixels (augment, rotation, jitter)")
        for name in ("lr", "weight_decay", "jitter"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("TrainConfig.lr must be > 0")
        choices = {"optimizer": ("adam", "adamw"), "amp": ("auto", "bf16", "off"),
                   "mode": ("full", "frozen"), "rotation": ("90", "any", None)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if "weights" not in self.model:
            raise ValueError("TrainConfig.model must say weights='imagenet', None or a path")
        if "image_size" in self.model and self.image_size is not None \
                and self.model["image_size"] != self.image_size:
            raise ValueError(f"TrainConfig.image_size={self.image_size} and "
                             f"model['image_size']={self.model['image_size']} disagree; set one")
        resolve_device(self.device)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def profile(cls, name: str, **overrides) -> "TrainConfig":
        """A named profile of :data:`PROFILES` with optional overrides.

        ``model`` overrides are merged into the profile's model settings.
        """
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; valid: {', '.join(PROFILES)}")
        base = dataclasses.asdict(cls())
        prof = PROFILES[name]
        base.update({k: v for k, v in prof.items() if k != "model"})
        base["model"] = {**base["model"], **prof.get("model", {})}
        model_over = overrides.pop("model", None) or {}
        if not isinstance(model_over, Mapping):
            raise TypeError("TrainConfig.profile: model= must be a dict of MclSTExp keyword "
                            f"arguments, e.g. {{'n_pos': 128}}; got {type(model_over).__name__}")
        base.update(overrides)
        base["model"] = {**base["model"], **model_over}
        return cls.from_dict(base).validate()


#: Named profiles: overrides of the same dataclass, not a second code path.
PROFILES: dict[str, dict] = {
    # The paper: DenseNet-121 with ImageNet weights, fine-tuned end to end at 224 px, 90
    # epochs, batch 128 (GPU, full data, weights downloaded by torchvision).
    "paper": {},
    # Every machine, offline, a laptop CPU: EfficientNet-Lite0 with the ImageNet weights
    # of its pip package, frozen; its features of each 224 px patch are computed once and
    # cached, then the heads and the spot Transformer train on them (seconds per epoch).
    # lr and epochs from the sweep in docs/architecture.md ("Choosing the quick profile").
    "quick": {"mode": "frozen", "epochs": 20, "batch_size": 128, "lr": 1e-4,
              "model": {"image_arch": "efficientnet_lite0", "weights": "imagenet"}},
    # A CPU with internet: the paper's DenseNet-121 (ImageNet weights from torchvision),
    # frozen, the same cached-feature path and numbers as "quick".
    "densenet_frozen": {"mode": "frozen", "epochs": 20, "batch_size": 128, "lr": 1e-4,
                        "model": {"image_arch": "densenet121", "weights": "imagenet"}},
}


# =========================================================================== device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda > mps > cpu; an unavailable explicit device is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device name (try 'auto', 'cpu', "
                         "'cuda', 'cuda:1', 'mps')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use "
                         "device='auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for but MPS is not available; use 'auto'")
    return dev


def autocast_dtype(amp: str, device: torch.device):
    """Autocast dtype for an ``amp`` setting (``"auto"``, ``"bf16"``, ``"off"``) on
    ``device``: ``torch.bfloat16``, or ``None`` for full precision."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _amp_dtype(config: TrainConfig, device: torch.device):
    return autocast_dtype(config.amp, device)


# ============================================================================= data
@dataclass
class SpotData:
    """Training or reference spots: cached patches plus expression, positions, sections.

    Attributes
    ----------
    patches
        One uint8 array ``(n_spots_of_section, H, W, 3)`` per section (memory maps from
        :func:`mclstexp_lite.patches.patch_cache`).
    expr
        ``(N, G)`` float32 expression (normalised, panel genes), all sections stacked.
    pos
        ``(N, 2)`` int64 array coordinates (x, y).
    groups
        ``(N,)`` int64 section index into ``sections``.
    sections, genes, obs_names
        Names, for bookkeeping.
    """

    patches: list
    expr: np.ndarray
    pos: np.ndarray
    groups: np.ndarray
    sections: list[str]
    genes: list[str]
    obs_names: list[str]

    def __post_init__(self):
        n = len(self.expr)
        kind = getattr(getattr(self.expr, "dtype", None), "kind", "")
        if kind not in ("b", "i", "u", "f"):
            raise TypeError(f"SpotData: expr must be a numeric (N, G) array (float32), got "
                            f"dtype {getattr(self.expr, 'dtype', type(self.expr).__name__)}")
        if not (len(self.pos) == len(self.groups) == len(self.obs_names) == n):
            raise ValueError("SpotData: expr, pos, groups and obs_names must have the same length")
        sizes = np.bincount(self.groups, minlength=len(self.sections))
        if len(self.patches) != len(self.sections) or any(
                len(p) != s for p, s in zip(self.patches, sizes)):
            raise ValueError("SpotData: one patch array per section, with one row per spot")
        if not np.isfinite(self.expr).all():
            raise ValueError(f"SpotData: expression has {int((~np.isfinite(self.expr)).sum())} "
                             "non-finite values; check normalisation")
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        order = np.argsort(self.groups, kind="stable")
        if not (order == np.arange(n)).all():
            raise ValueError("SpotData: spots must be grouped by section in order")

    def __len__(self) -> int:
        return len(self.expr)

    @property
    def n_genes(self) -> int:
        return self.expr.shape[1]

    @classmethod
    def from_anndata(cls, adatas: Mapping[str, Any] | Sequence, *, layer: str | None = None,
                     patch_um: float = pt.DEFAULT_PATCH_UM, patch_size: int = 224,
                     cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, stain=None) -> "SpotData":
        """Stack sections prepared by :func:`mclstexp_lite.pp.prepare` (same genes in each).

        Patches are read from (or written to) the patch cache. ``stain``: an optional
        fitted :class:`mclstexp_lite.stain.StainNormalizer` applied to every section's
        patches (their own patch-cache entries, so the frozen features differ too; fit
        it on the training sections, :func:`mclstexp_lite.stain.fit_on_sections`).
        """
        from scipy import sparse

        items = list(adatas.items()) if isinstance(adatas, Mapping) else [
            (str(a.obs["section"].iloc[0]), a) for a in adatas]
        if not items:
            raise ValueError("SpotData.from_anndata: no sections given")
        genes = list(items[0][1].var_names)
        patches, exprs, poss, groups, names = [], [], [], [], []
        for gi, (name, a) in enumerate(items):
            if list(a.var_names) != genes:
                raise ValueError(f"section {name}: genes differ from section {items[0][0]}; "
                                 "subset every section to one panel first (pp.prepare)")
            X = a.layers[layer] if layer else a.X
            X = X.toarray() if sparse.issparse(X) else np.asarray(X)
            _warn_if_raw_counts(X, name)
            patches.append(pt.patch_cache(a, patch_um=patch_um, out_size=patch_size,
                                          cache_dir=cache_dir, progress=progress, stain=stain))
            exprs.append(X.astype(np.float32))
            poss.append(a.obs[["array_x", "array_y"]].to_numpy(np.int64))
            groups.append(np.full(a.n_obs, gi, dtype=np.int64))
            names.extend(a.obs_names)
        return cls(patches=patches, expr=np.concatenate(exprs), pos=np.concatenate(poss),
                   groups=np.concatenate(groups), sections=[n for n, _ in items], genes=genes,
                   obs_names=list(names))

    def images(self, idx: np.ndarray, *, device=None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """uint8 NCHW batch of the patches of spots ``idx`` (batch order kept).

        ``memory_format=torch.channels_last`` keeps the cache's pixel-interleaved
        layout (same shape and values) and saves a transposing copy.
        """
        idx = np.asarray(idx, dtype=np.int64)
        g = self.groups[idx]
        sections = np.unique(g)
        if len(sections) == 1 and memory_format == torch.channels_last:
            s = sections[0]
            return pt.to_torch_batch(self.patches[s], idx - self._offsets[s], device=device)
        out = None
        for s in sections:
            sel = np.nonzero(g == s)[0]
            part = pt.to_torch_batch(self.patches[s], idx[sel] - self._offsets[s], device=device)
            if out is None:
                out = torch.empty((len(idx),) + tuple(part.shape[1:]), dtype=torch.uint8,
                                  device=part.device, memory_format=memory_format)
            out[torch.as_tensor(sel, device=part.device)] = part
        return out


def _warn_if_raw_counts(X: np.ndarray, section: str) -> None:
    """Warn when a section's expression looks like raw counts (whole numbers reaching
    values that log-normalised expression does not): the model would learn count scale."""
    if X.size == 0:
        return
    top = float(np.max(X))
    if top > 30 and np.array_equal(X, np.round(X)):
        warnings.warn(
            f"SpotData: the expression of section {section} is whole numbers up to {top:g}: "
            "raw counts, not normalised expression. Prepare sections first with "
            "mclstexp_lite.pp.prepare(adata, genes) (per-spot normalisation, log1p, the gene "
            "panel).", UserWarning, stacklevel=3)


# ======================================================================== checkpoint
def _atomic_torch_save(obj: Any, path: Path) -> None:
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
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read the checkpoint {path}: {type(exc).__name__}: {exc}. It "
                         "may be truncated; delete it and train again") from exc
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not an mclstexp_lite checkpoint (it holds a "
                         f"{type(ckpt).__name__}, not a dict)")
    for key in ("model", "model_config", "config", "epoch", "history"):
        if key not in ckpt:
            raise ValueError(f"{path} is not an mclstexp_lite checkpoint (no '{key}')")
    return ckpt


def model_from_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> mdl.MclSTExp:
    """Rebuild the model from a checkpoint's saved config and load its weights."""
    return _model_from_ckpt(load_checkpoint(path, map_location=map_location))


def model_from_state(ckpt: Mapping) -> mdl.MclSTExp:
    """The model of an already loaded checkpoint-like dict, in eval mode.

    ``ckpt`` needs ``model_config`` and ``model`` (the state dict) and may hold
    ``preprocessing`` (checked against the rebuilt encoder) and ``config``; a training
    checkpoint (:func:`load_checkpoint`) and a predictor (:mod:`mclstexp_lite.predict`)
    both qualify.
    """
    return _model_from_ckpt(dict(ckpt))


def _model_from_ckpt(ckpt: dict) -> mdl.MclSTExp:
    """The model of an already loaded checkpoint (see :func:`model_from_checkpoint`)."""
    model = _rebuild(ckpt)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _rebuild(ckpt: dict) -> mdl.MclSTExp:
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
    the model's ``image_size``.
    """
    kw = dict(config.model)
    if config.mode == "frozen":
        kw["freeze_image"] = True
    if config.image_size is not None:
        kw["image_size"] = int(config.image_size)
    return mdl.MclSTExp(n_genes, **kw)


# ========================================================================= the loop
# The uint8 resize and batch gather live in mclstexp_lite.features (also used there).
_resize_u8 = fx.resize_u8
_batch_images = fx.batch_images


def _prepare_images(batch_u8: torch.Tensor, encoder: mdl.ImageEncoder, config: TrainConfig, *,
                    train: bool, generator: torch.Generator | None,
                    channels_last: bool) -> torch.Tensor:
    """uint8 NCHW patches -> normalised float input of ``encoder`` (resize to its
    ``image_size``, augment as ``config`` says when ``train``, normalise with its mean
    and std)."""
    size = encoder.image_size
    x = batch_u8
    if x.shape[-1] != size or x.shape[-2] != size:
        # resize first so augmentation works on the (usually smaller) model input
        x = _resize_u8(x, size)
    if train and config.augment:
        x = pt.gpu_augment(x, generator=generator, rotation=config.rotation,
                           brightness=config.jitter, contrast=config.jitter,
                           saturation=config.jitter)
    else:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt).div_(255.0)
    mean = torch.tensor(encoder.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _short_list(items, n: int = 6) -> str:
    items = [str(x) for x in items]
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_batches(n: int, config: TrainConfig, epoch: int, rank: int, world: int):
    g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    bs = config.batch_size
    batches = [perm[i:i + bs] for i in range(0, n, bs)]
    batches = [b for b in batches if len(b) >= config.min_batch]
    if world > 1:  # every rank gets the same number of batches
        per = len(batches) // world
        batches = batches[rank * per:(rank + 1) * per]
    return batches


@dataclass
class TrainResult:
    model: mdl.MclSTExp
    history: list
    out_dir: Path | None
    config: TrainConfig


def train(data: SpotData, config: TrainConfig | None = None, *,
          out_dir: str | os.PathLike | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True,
          callback: Callable[[int, list], None] | None = None,
          model: mdl.MclSTExp | None = None) -> TrainResult:
    """Train mclSTExp on ``data``.

    Parameters
    ----------
    data
        Training spots (:class:`SpotData`).
    config
        :class:`TrainConfig`; default the paper profile.
    out_dir
        Folder for ``checkpoint.pt`` (written after every epoch) and ``history.json``.
        ``None`` keeps everything in memory.
    resume
        Continue from ``out_dir/checkpoint.pt`` if it exists (its config, sections and
        genes must match the ones given).
    overwrite
        Start afresh even though ``out_dir`` holds a checkpoint (it is replaced after the
        first epoch). Without ``resume`` or ``overwrite`` an existing checkpoint is an
        error: earlier results are never silently replaced.
    callback
        Called as ``callback(epoch, history)`` after each epoch (1-based), e.g. to plot.
    model
        Train this model instead of building one from ``config.model``.

    Returns
    -------
    TrainResult
        The trained model (eval mode, on the training device), per-epoch history, the
        output folder and the config.
    """
    config = (config or TrainConfig()).validate()
    device = resolve_device(config.device)
    rank, world = _dist_info()
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    start_epoch, history = 0, []
    ckpt = None
    if ckpt_path is not None and ckpt_path.exists():
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            saved = TrainConfig.from_dict(ckpt["config"])
            if _comparable(saved) != _comparable(config):
                diff = {k: (v, _comparable(config).get(k)) for k, v in _comparable(saved).items()
                        if _comparable(config).get(k) != v}
                raise ValueError(f"{ckpt_path} was trained with a different config {diff}; "
                                 "resume with the same config, or use another out_dir")
            for what, mine in (("sections", list(data.sections)), ("genes", list(data.genes))):
                theirs = ckpt.get(what)
                if theirs is not None and list(theirs) != mine:
                    raise ValueError(
                        f"{ckpt_path} was trained on other {what} ({len(theirs)}: "
                        f"{_short_list(theirs)}) than the data given ({len(mine)}: "
                        f"{_short_list(mine)}); resume with the same data, or use another "
                        "out_dir (or overwrite=True to start afresh).")
            start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
        elif not overwrite:
            raise FileExistsError(
                f"{ckpt_path} already exists. Pass resume=True to continue that run, "
                "overwrite=True to start afresh, or choose another out_dir.")
    if model is None:
        torch.manual_seed(config.seed)  # same initial weights for the same seed (and on every rank)
        model = build_model(config, data.n_genes) if ckpt is None else _rebuild(ckpt)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if model.config["n_genes"] != data.n_genes:
        raise ValueError(f"model expects {model.config['n_genes']} genes, data has {data.n_genes}")
    max_pos = int(data.pos.max()) if len(data) else 0
    if model.spot_encoder is not None and max_pos >= model.config["n_pos"]:
        raise ValueError(f"array coordinates reach {max_pos} but the model's position tables "
                         f"have n_pos={model.config['n_pos']} rows; set "
                         f"config.model['n_pos'] to at least {max_pos + 1}")

    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = _amp_dtype(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # the fused kernel: same update, one pass over the parameters (1.6x faster per step on
    # a 2-core CPU for the quick profile's heads and spot Transformer)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    if ckpt is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    bank = None
    if config.mode == "frozen" and world > 1:
        raise ValueError("mode='frozen' trains only small heads on cached features; run it in "
                         "one process, not under torchrun")
    if config.mode == "frozen":
        if not model.image_encoder.freeze:
            raise ValueError("mode='frozen' needs a model whose image encoder is frozen "
                             "(MclSTExp(..., freeze_image=True)); build it with build_model")
        bank = fx.spot_features(model.image_encoder, data, views=config.feature_views,
                                device=device, amp=config.amp, progress=progress and rank == 0)
    size = model.image_encoder.image_size

    from tqdm.auto import tqdm

    expr_all = torch.from_numpy(data.expr)
    pos_all = torch.from_numpy(data.pos)
    groups_all = torch.from_numpy(data.groups)
    pin = device.type == "cuda"
    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout etc.: resumable
        aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
        aug_gen.manual_seed(config.seed * 7_919 + epoch)
        view_gen = torch.Generator().manual_seed(config.seed * 6_007 + epoch)
        batches = _epoch_batches(len(data), config, epoch, rank, world)
        net.train()
        t0, seen, total = time.time(), 0, 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not progress or rank != 0)
        for b in bar:
            bt = torch.from_numpy(b)
            expr = expr_all[bt]
            pos = pos_all[bt]
            grp = groups_all[bt]
            if pin:
                expr, pos, grp = expr.pin_memory(), pos.pin_memory(), grp.pin_memory()
            expr = expr.to(device, non_blocking=True)
            pos = pos.to(device, non_blocking=True)
            grp = grp.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                if bank is None:  # "full": pixels through the whole model
                    imgs = _prepare_images(_batch_images(data, b, size, device),
                                           model.image_encoder, config, train=True,
                                           generator=aug_gen, channels_last=channels_last)
                    loss = net(imgs, expr, pos, grp)["loss"]
                else:  # "frozen": the encoder's cached features of one view per spot
                    view = (torch.randint(len(bank), (len(b),), generator=view_gen)
                            if len(bank) > 1 else torch.zeros(len(b), dtype=torch.long))
                    feats = bank[view, bt].to(device, non_blocking=True)
                    loss = net(None, expr, pos, grp, features=feats)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(
                    f"loss became {lv} at epoch {epoch + 1}; lower lr (now {config.lr}) or "
                    "check the expression values for outliers")
            total += lv * len(b)
            seen += len(b)
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        secs = time.time() - t0
        rec = {"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": secs,
               "spots_per_s": seen * world / secs if secs > 0 else float("nan"),
               "lr": config.lr}
        history.append(rec)
        if progress and rank == 0:
            log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs, rec["loss"], secs)
        if ckpt_path is not None and rank == 0:
            _atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": model.config, "config": config.to_dict(),
                "epoch": epoch + 1, "history": history, "rng": _rng_state(),
                "genes": list(data.genes), "sections": list(data.sections),
                "preprocessing": model.preprocessing,
            }, ckpt_path)
            atomic_write_json(out / "history.json", history)
        if callback is not None:
            callback(epoch + 1, history)
    if world > 1:
        # gradients are all-reduced every step, but batch-norm running statistics are
        # updated from each rank's own last batch: take rank 0's so all ranks agree
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    model.eval()
    return TrainResult(model=model, history=history, out_dir=out, config=config)


def _comparable(config: TrainConfig) -> dict:
    d = config.to_dict()
    d.pop("epochs")  # a resumed run may extend the number of epochs
    d.pop("device")
    if d.get("image_size") is None:  # None means the encoder's own size: compare that
        try:
            d["image_size"] = input_size_of(config)
        except ValueError:
            pass
    return d


def input_size_of(config: TrainConfig) -> int:
    """The input size ``config`` trains at (its ``image_size``, else the encoder's own)."""
    from . import encoders

    if config.image_size is not None:
        return int(config.image_size)
    if config.model.get("image_size") is not None:
        return int(config.model["image_size"])
    return encoders.get_spec(config.model.get("image_arch", "densenet121")).input_size


# ========================================================================= inference
@torch.no_grad()
def embed_images(model: mdl.MclSTExp, data: SpotData, *, config: TrainConfig | None = None,
                 device=None, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Image embeddings ``(N, proj_dim)`` of every patch (no augmentation), float32.

    The input size and normalisation come from the model's image encoder
    (``model.preprocessing``), so the model and the data are all that is needed. A
    frozen encoder's features come from the feature cache (:mod:`mclstexp_lite.features`,
    view 0), computed there once; a trained encoder runs on the pixels.

    Parameters
    ----------
    config
        Optional: only its ``device``, ``amp`` and ``channels_last`` are read.
    """
    config = config or TrainConfig(device=str(device or "auto"))
    device = resolve_device(device or config.device)
    model = model.to(device).eval()
    if model.image_encoder.freeze:
        feats = fx.spot_features(model.image_encoder, data, views=1, device=device,
                                 amp=config.amp, progress=progress)[0]
        outs = [model.encode_features(feats[i:i + batch_size].to(device)).float().cpu()
                for i in range(0, len(feats), batch_size)]
        return (torch.cat(outs) if outs else torch.empty((0, model.config["proj_dim"]))).numpy()
    return _batched(model, data, config, device, batch_size, progress,
                    "embedding patches").numpy()


@torch.no_grad()
def embed_spots(model: mdl.MclSTExp, data: SpotData, *, device="auto",
                per_section: bool = True) -> np.ndarray:
    """Spot embeddings ``(N, proj_dim)``.

    The Transformer attends across the spots it is given at once; ``per_section=True``
    encodes each section as one sentence (all its spots together), which is how the
    reference bank is built for retrieval.
    """
    device = resolve_device(device)
    model = model.to(device).eval()
    expr = torch.from_numpy(data.expr)
    pos = torch.from_numpy(data.pos)
    grp = torch.from_numpy(data.groups)
    if not per_section:
        return model.encode_spot(expr.to(device), pos.to(device), grp.to(device)).float().cpu().numpy()
    outs = []
    for s in range(len(data.sections)):
        sel = torch.nonzero(grp == s).ravel()
        outs.append(model.encode_spot(expr[sel].to(device), pos[sel].to(device),
                                      grp[sel].to(device)).float().cpu())
    return torch.cat(outs).numpy()


@torch.no_grad()
def _batched(model: mdl.MclSTExp, data: SpotData, config: TrainConfig, device, batch_size,
             progress, desc):
    from tqdm.auto import tqdm

    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    amp_dtype = _amp_dtype(config, device)
    encoder = model.image_encoder
    outs = []
    idx = np.arange(len(data))
    for i in tqdm(range(0, len(idx), batch_size), desc=desc, disable=not progress, leave=False):
        b = idx[i:i + batch_size]
        x = _prepare_images(_batch_images(data, b, encoder.image_size, device,
                                          memory_format=torch.channels_last),
                            encoder, config, train=False, generator=None,
                            channels_last=channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            outs.append(model.encode_image(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty((0, model.config["proj_dim"]))


# ============================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Train one fold from the command line; works under ``torchrun`` for several GPUs.

    One GPU or CPU::

        python -m mclstexp_lite.train --sections B4 C2 C3 C4 C5 C6 --test C3 \\
            --profile quick --out runs/quick_C3

    Several GPUs on one machine (one process per GPU; gradients are averaged)::

        torchrun --nproc_per_node 4 -m mclstexp_lite.train --profile paper \\
            --sections A2 A3 ... G3 --test B1 --out runs/paper_B1
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mclstexp_lite.train",
                                 description="Train mclSTExp on all sections except --test.")
    ap.add_argument("--dataset", default="her2st")
    ap.add_argument("--sections", nargs="+", required=True)
    ap.add_argument("--test", default=None, help="section left out of training")
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="output folder (checkpoint, history)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    from . import datasets as ds
    from . import pp

    over = {"seed": args.seed, "device": device}
    if args.epochs is not None:
        over["epochs"] = args.epochs
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    config = TrainConfig.profile(args.profile, **over)
    genes = pp.published_panel(args.dataset)
    names = [s for s in args.sections if s != args.test]
    adatas = {s: pp.prepare(ds.load(args.dataset, s, progress=False), genes) for s in names}
    data = SpotData.from_anndata(adatas, progress=_dist_info()[0] == 0)
    res = train(data, config, out_dir=args.out, resume=args.resume)
    if _dist_info()[0] == 0:
        print(json.dumps(res.history[-1]))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
