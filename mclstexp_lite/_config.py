"""The training configuration: :class:`TrainConfig`, the profile table, the device.

A :class:`TrainConfig` defines a training run (the paper's defaults); :data:`PROFILES`
is the one table of named profiles (``paper``, ``quick``, ``densenet_frozen``): overrides
of the same dataclass, not second code paths. The notebooks' YAML files name a profile
and never repeat its numbers. :func:`resolve_device` is the one place a device setting
(``"auto"``, ``"cpu"``, ``"cuda:1"``...) becomes a ``torch.device`` (it and
:func:`autocast_dtype` live in the private ``_device`` module, below the feature cache,
which needs them too).

Everything here is re-exported by :mod:`mclstexp_lite.train`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping

from . import _encoders as encoders
from . import features as fx
from ._device import autocast_dtype, resolve_device  # noqa: F401 - re-exported here
from ._util import positive_int
from .models import INPUT_OPTIONS  # the input options TrainConfig passes to the model

__all__ = ["TrainConfig", "PROFILES", "INPUT_OPTIONS", "resolve_device", "autocast_dtype",
           "input_size_of"]


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
        (224 px for the built-in encoders, :mod:`mclstexp_lite._encoders`). Cached patches
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
    feature_norm
        ``"frozen"`` only. ``None`` (default, the paper): the encoder's features as they
        are. ``"section"``: every feature standardised to mean 0 and sd 1 *within each
        section*, training, reference and held-out sections alike, each with the
        statistics of its own spots (for a new slide: of its own spots, no expression
        needed). Removes slide-level shifts (stain, scanner, resolution) that a new
        patient brings; the idea of adaptive batch normalisation (Li et al. 2016,
        arXiv 1603.04779) applied to frozen features. :mod:`mclstexp_lite._inputs`.
    expr_norm
        ``None`` (default, the paper): the model reads and retrieval averages the
        prepared expression. ``"center"``: every gene is centred within each section and
        shifted to its mean over all the sections given (``expr - section mean +
        overall mean``), in what the spot encoder reads and in what retrieval averages.
        A section's own level (sequencing depth, patient) is then not what the
        contrastive model matches, and predictions vary around the reference's overall
        level. :mod:`mclstexp_lite._inputs`.
    context, context_um
        ``"frozen"`` only. ``context="mean"`` appends to each spot's features the mean
        features of the spots of its section within ``context_um`` microns (its own
        included): the spot's neighbourhood, as TRIPLEX (Chung et al., CVPR 2024) and
        Hist2ST read it. ``None`` (default): off. 300 um takes the 8 neighbours of a
        legacy-ST spot (200 um pitch) and the 2 rings of a Visium spot (100 um).
    wide_view
        ``"frozen"`` only. A factor ``f > 1``: appends the features of a second crop
        ``f`` times as wide (same centre), resized to the encoder's input, i.e. a wider
        field of view at lower resolution (TRIPLEX's neighbour view); cached like the
        patch's own features. ``None`` (default): off.
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
    feature_norm: str | None = None
    expr_norm: str | None = None
    context: str | None = None
    context_um: float = 300.0
    wide_view: float | None = None
    model: dict = field(default_factory=lambda: {"image_arch": "densenet121",
                                                 "weights": "imagenet"})

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "batch_size", "image_size", "min_batch", "feature_views"):
            v = getattr(self, name)
            if v is None and name == "image_size":
                continue
            positive_int(v, f"TrainConfig.{name}")
        if self.feature_views > fx.N_VIEWS:
            raise ValueError(f"TrainConfig.feature_views must be at most {fx.N_VIEWS} (the "
                             f"dihedral views of a patch), got {self.feature_views}")
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
                   "mode": ("full", "frozen"), "rotation": ("90", "any", None),
                   "feature_norm": INPUT_OPTIONS["feature_norm"],
                   "expr_norm": INPUT_OPTIONS["expr_norm"],
                   "context": INPUT_OPTIONS["context"]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        self._validate_inputs()
        if "weights" not in self.model:
            raise ValueError("TrainConfig.model must say weights='imagenet', None or a path")
        if "image_size" in self.model and self.image_size is not None \
                and self.model["image_size"] != self.image_size:
            raise ValueError(f"TrainConfig.image_size={self.image_size} and "
                             f"model['image_size']={self.model['image_size']} disagree; set one")
        resolve_device(self.device)
        return self

    def _validate_inputs(self) -> None:
        """The input options (:data:`INPUT_OPTIONS`): values, and ``mode="frozen"`` for
        those that work on cached features."""
        cu = self.context_um
        if isinstance(cu, bool) or not isinstance(cu, (int, float)) or not (
                math.isfinite(cu) and cu > 0):
            raise ValueError(f"TrainConfig.context_um must be a positive number of microns, "
                             f"got {cu!r}")
        wv = self.wide_view
        if wv is not None and (isinstance(wv, bool) or not isinstance(wv, (int, float))
                               or not math.isfinite(wv) or wv <= 1):
            raise ValueError(f"TrainConfig.wide_view must be None (off) or a factor > 1 (the "
                             f"wide crop's width over the patch's), got {wv!r}")
        if self.mode == "full":
            on = [n for n in ("feature_norm", "context", "wide_view")
                  if getattr(self, n) is not None]
            if on:
                raise ValueError(f"TrainConfig.{on[0]}={getattr(self, on[0])!r} works on the "
                                 "frozen encoder's cached features: use mode='frozen' (or "
                                 f"{on[0]}=None with mode='full')")
        both = [n for n in INPUT_OPTIONS if n in self.model]
        if both:
            raise ValueError(f"TrainConfig.model must not hold {both}: set them as TrainConfig "
                             f"fields (TrainConfig.{both[0]}=...), which build the model")

    def model_inputs(self) -> dict:
        """The input options as the model stores them (:func:`build_model` passes them)."""
        return {n: getattr(self, n) for n in INPUT_OPTIONS}

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
    # lr and epochs from the sweep in docs/architecture.md ("Choosing the quick profile");
    # expr_norm="center" from the study across patients (docs/results.md, "What helps
    # across patients": patient-scheme PCC-HEG +0.024 [+0.009, +0.036], MSE -0.064, at
    # no cost in time).
    "quick": {"mode": "frozen", "epochs": 20, "batch_size": 128, "lr": 1e-4,
              "expr_norm": "center",
              "model": {"image_arch": "efficientnet_lite0", "weights": "imagenet"}},
    # A CPU with internet: the paper's DenseNet-121 (ImageNet weights from torchvision),
    # frozen, the same cached-feature path and numbers as "quick".
    "densenet_frozen": {"mode": "frozen", "epochs": 20, "batch_size": 128, "lr": 1e-4,
                        "model": {"image_arch": "densenet121", "weights": "imagenet"}},
}


def input_size_of(config: TrainConfig) -> int:
    """The input size ``config`` trains at (its ``image_size``, else the encoder's own)."""
    if config.image_size is not None:
        return int(config.image_size)
    if config.model.get("image_size") is not None:
        return int(config.model["image_size"])
    return encoders.get_spec(config.model.get("image_arch", "densenet121")).input_size
