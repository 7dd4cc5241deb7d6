"""The image view of mclSTExp: a registry backbone, without its classifier, pooled.

:class:`ImageEncoder` wraps a backbone of the encoder registry
(:mod:`mclstexp_lite._encoders`; DenseNet-121 in the paper) with its weights (``None``,
ImageNet, or a state-dict file) and its preprocessing (input size, mean, std);
:func:`normalize_uint8` turns cached uint8 patches into the float input it expects.
Both are re-exported by :mod:`mclstexp_lite.models`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _encoders as enc
from ._util import positive_int
from ._encoders import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageEncoder", "normalize_uint8"]

_WEIGHT_CHOICES = ("None", "'imagenet'", "'pretrained'", "a path to a state-dict file")


def normalize_uint8(
    batch: torch.Tensor | np.ndarray,
    *,
    layout: str = "auto",
    dtype: torch.dtype = torch.float32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """Turn a uint8 image batch into the float input the image encoders expect.

    Scales to [0, 1], then subtracts ``mean`` and divides by ``std`` per channel
    (default :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`; an encoder's own values are
    ``ImageEncoder.mean`` / ``.std``). The work happens on the device the batch is on.

    Parameters
    ----------
    batch
        uint8 images, ``(B, H, W, 3)`` (NHWC, as stored in the patch cache) or
        ``(B, 3, H, W)`` (NCHW). A NumPy array is converted with ``torch.from_numpy``.
    layout
        ``"auto"`` (default) picks the axis of length 3; ``"nhwc"`` or ``"nchw"`` say it
        explicitly, which is needed when both axis 1 and axis 3 have length 3.
    dtype
        Floating dtype of the result.

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` float tensor. NHWC input comes back as a permuted view of the
        same memory order, i.e. channels-last, which convolution kernels handle well.

    Raises
    ------
    TypeError
        If ``batch`` is not uint8 or ``dtype`` is not floating.
    ValueError
        If ``batch`` is not 4-D with a channel axis of length 3, or ``layout`` is unknown.
    """
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"batch must be a torch.Tensor or numpy.ndarray of uint8 images, got {type(batch).__name__}."
        )
    if batch.dtype != torch.uint8:
        raise TypeError(
            f"batch must have dtype uint8 (raw 0-255 pixels), got {batch.dtype}; "
            "float images are assumed to be normalised already and go straight to the encoder."
        )
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype}.")
    if batch.ndim != 4:
        raise ValueError(
            f"batch must be 4-D, (B, H, W, 3) or (B, 3, H, W); got shape {tuple(batch.shape)}. "
            "Add a batch axis with batch[None] for a single image."
        )
    if layout not in ("auto", "nhwc", "nchw"):
        raise ValueError(f"layout must be 'auto', 'nhwc' or 'nchw', got {layout!r}.")
    if layout == "auto":
        last3, first3 = batch.shape[3] == 3, batch.shape[1] == 3
        if last3 and first3:
            raise ValueError(
                f"batch shape {tuple(batch.shape)} is ambiguous (axis 1 and axis 3 both have "
                "length 3); pass layout='nhwc' or layout='nchw'."
            )
        if not (last3 or first3):
            raise ValueError(
                f"batch shape {tuple(batch.shape)} has no RGB axis of length 3 at position 1 or 3."
            )
        layout = "nhwc" if last3 else "nchw"
    if layout == "nhwc":
        if batch.shape[3] != 3:
            raise ValueError(f"layout='nhwc' needs shape (B, H, W, 3), got {tuple(batch.shape)}.")
        batch = batch.permute(0, 3, 1, 2)
    elif batch.shape[1] != 3:
        raise ValueError(f"layout='nchw' needs shape (B, 3, H, W), got {tuple(batch.shape)}.")
    mean = torch.tensor(tuple(mean), dtype=dtype, device=batch.device).reshape(1, 3, 1, 1)
    std = torch.tensor(tuple(std), dtype=dtype, device=batch.device).reshape(1, 3, 1, 1)
    return (batch.to(dtype) / 255.0 - mean) / std


# Old DenseNet checkpoints (including torchvision's own densenet121-a639ec97.pth) name
# the layers of a dense layer "norm.1", "conv.2", ...; current modules use "norm1", "conv2".
_OLD_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
#: Classifier parameter prefixes dropped when a full model's state dict is loaded.
_HEAD_PREFIXES = ("classifier.", "fc.", "head.", "_fc.")


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} [{shown}{more}]"


class ImageEncoder(nn.Module):
    """An image backbone from the encoder registry, without its classifier, pooled.

    - ``"densenet121"``: ``features`` -> (optional ReLU) -> global average pool -> 1024-d.
    - ``"resnet18"`` / ``"resnet50"``: everything up to the global average pool -> 512-d /
      2048-d.
    - ``"efficientnet_lite0"``: EfficientNet-Lite0 (timm) up to its pooled 1280-d head
      features; ImageNet weights from a pip package, offline.
    - ``"timm:<name>"``: any timm model, pooled features (``num_classes=0``).

    Parameters
    ----------
    arch
        A name of :data:`mclstexp_lite._encoders.ENCODERS` or ``"timm:<model>"``.
    weights
        ``None``: random initialisation. ``"imagenet"`` (or ``"pretrained"``): the
        registry's pretrained weights (torchvision's ``IMAGENET1K_V1``, fetched and cached
        by torchvision; the pip package's for ``efficientnet_lite0``; timm's default for
        timm models). Weights that are neither cached nor downloadable raise a
        :class:`RuntimeError` that says which file to place where; a missing weights
        package raises :class:`ImportError` naming it. Never a silent fallback.
        A ``str`` or :class:`~pathlib.Path`: a file holding a state dict, either of the
        full model of this ``arch`` (classifier keys are dropped; old ``norm.1``-style
        DenseNet keys and ``efficientnet_pytorch``-style Lite keys are renamed) or of this
        encoder (keys starting with ``backbone.``). Loaded with ``weights_only=True``.
    freeze
        If True the backbone gets ``requires_grad=False`` and stays in eval mode (batch-norm
        statistics frozen) even when a parent module calls ``.train()``.
    pre_pool_relu
        DenseNet only: apply a ReLU before pooling, as torchvision's own forward does.
        Default False: the published mclSTExp code pools the pre-ReLU ``norm5`` output,
        and we follow it.
    image_size
        Side of the input in pixels; ``None``: the encoder's own (:attr:`EncoderSpec.
        input_size`, 224 for the built-in ones). Cached patches are resized to it.
    encoder_kwargs
        Extra keyword arguments for ``timm.create_model`` (timm encoders only).

    Attributes
    ----------
    out_dim : int
        Size of the pooled feature vector.
    spec : mclstexp_lite.features.EncoderSpec
        The registry row.
    image_size : int
        Input side in pixels.
    mean, std : tuple of float
        Per-channel normalisation of pixels scaled to [0, 1].
    backbone : torch.nn.Module
        The network with its classifier removed.

    Notes
    -----
    Input is a float tensor ``(B, 3, H, W)`` already normalised with :attr:`mean` and
    :attr:`std` (see :func:`normalize_uint8`). Channels-last input is fine.
    """

    def __init__(
        self,
        arch: str = "densenet121",
        *,
        weights: str | os.PathLike | None = None,
        freeze: bool = False,
        pre_pool_relu: bool = False,
        image_size: int | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        spec = enc.get_spec(arch)
        if isinstance(weights, str) and weights in ("imagenet", "pretrained"):
            mode = "pretrained"
        elif weights is None:
            mode = "random"
        elif isinstance(weights, (str, os.PathLike)):
            path = Path(weights)
            if not path.is_file():
                raise ValueError(
                    f"weights={str(weights)!r} is neither 'imagenet'/'pretrained' nor an existing "
                    f"file. Valid values: {', '.join(_WEIGHT_CHOICES)}."
                )
            mode = "file"
        else:
            raise TypeError(
                f"weights must be one of {', '.join(_WEIGHT_CHOICES)}; got {type(weights).__name__}."
            )
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze must be a bool, got {type(freeze).__name__}.")
        if encoder_kwargs is not None:
            if not isinstance(encoder_kwargs, dict):
                raise TypeError(f"encoder_kwargs must be a dict, got {type(encoder_kwargs).__name__}.")
            try:  # stored in the model config, the checkpoint and the feature-cache key
                json.dumps(encoder_kwargs, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"encoder_kwargs must hold JSON values only (numbers, strings, lists, "
                    f"dicts), got {encoder_kwargs!r}: {err}") from err

        self.arch = arch
        self.spec = spec
        self.encoder_kwargs = dict(encoder_kwargs) if encoder_kwargs else None
        self.freeze = freeze
        self.pre_pool_relu = bool(pre_pool_relu)
        self.image_size = spec.input_size if image_size is None else positive_int(image_size, "image_size")
        self.mean = tuple(float(v) for v in spec.mean)
        self.std = tuple(float(v) for v in spec.std)
        self.backbone = enc.build_backbone(
            arch, "pretrained" if mode == "pretrained" else None, encoder_kwargs=encoder_kwargs
        )
        self.out_dim = int(spec.feature_dim or self.backbone.num_features)
        if spec.family == "timm":
            # timm's own description of the model (for hub models read from the hub's
            # config): input size and normalisation as it was trained
            cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
            if image_size is None and cfg.get("input_size"):
                self.image_size = int(cfg["input_size"][-1])
            if cfg.get("mean") and cfg.get("std"):
                self.mean = tuple(float(v) for v in cfg["mean"])
                self.std = tuple(float(v) for v in cfg["std"])
        if mode == "file":
            self._load_file(path)

        if freeze:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    @property
    def preprocessing(self) -> dict:
        """Input size and normalisation, as stored in checkpoints."""
        return {"arch": self.arch, "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std), "scale": "pixels / 255",
                "resize": "bilinear, antialiased, from the cached patch"}

    def fingerprint(self) -> str:
        """sha256 of the backbone's weights (:func:`mclstexp_lite._encoders.state_fingerprint`)."""
        return enc.state_fingerprint(self.backbone)

    def _load_file(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(
                f"{path} does not hold a state dict (a mapping of parameter names to tensors); "
                f"got {type(state).__name__}."
            )
        keys = list(state)
        if keys and all(k.startswith("backbone.") for k in keys):
            converted = dict(state)  # already this encoder's layout
        else:
            if self.arch == "efficientnet_lite0" and any(k.startswith("_blocks.") for k in keys):
                import timm

                full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
                full.reset_classifier(0)
                state = enc.lite_state_dict_to_timm(
                    {k: v for k, v in state.items() if not k.startswith("_fc.")}, full)
            converted = {}
            for key, value in state.items():
                if key.startswith(_HEAD_PREFIXES) and "backbone." + key not in self.state_dict():
                    continue
                if self.arch == "densenet121":
                    key = _OLD_DENSENET_KEY.sub(r"\1\2.", key)
                converted["backbone." + key] = value
        expected = self.state_dict()
        # Old checkpoints lack batch-norm "num_batches_tracked" counters; torch fills them in.
        missing = sorted(k for k in expected.keys() - converted.keys() if not k.endswith("num_batches_tracked"))
        unexpected = sorted(converted.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"The state dict in {path} does not fit ImageEncoder(arch={self.arch!r}). "
                f"Missing keys: {_format_keys(missing)}. "
                f"Unexpected keys: {_format_keys(unexpected)}. "
                "Expected a full model state dict for this arch, or the "
                "state_dict() of an ImageEncoder with the same arch."
            )
        wrong_shape = [
            f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
            for k, v in converted.items()
            if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape
        ]
        if wrong_shape:
            raise ValueError(
                f"The state dict in {path} has tensors of the wrong shape for "
                f"ImageEncoder(arch={self.arch!r}): {_format_keys(wrong_shape, limit=5)}."
            )
        self.load_state_dict(converted, strict=True)

    def train(self, mode: bool = True) -> "ImageEncoder":
        """Set training mode; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode normalised images.

        Parameters
        ----------
        images
            Float tensor ``(B, 3, H, W)``, normalised with :attr:`mean` and :attr:`std`.

        Returns
        -------
        torch.Tensor
            ``(B, out_dim)`` pooled features.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must have shape (B, 3, H, W), got {tuple(images.shape)}; convert uint8 "
                "NHWC patches with normalize_uint8(x, mean=encoder.mean, std=encoder.std)."
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor, got {images.dtype}; use "
                "normalize_uint8(x, mean=encoder.mean, std=encoder.std) first."
            )
        if self.arch == "densenet121":
            fmap = self.backbone.features(images)
            if self.pre_pool_relu:
                fmap = F.relu(fmap)
            return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return self.backbone(images)  # ResNet / timm: pooled features, classifier removed
