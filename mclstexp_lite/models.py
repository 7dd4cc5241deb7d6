"""Encoders, the mclSTExp model and its contrastive loss.

mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024) learns one embedding space
for two views of a spatial-transcriptomics spot:

- the **image view**: the H&E patch under the spot goes through a CNN
  (DenseNet-121 in the paper, :class:`ImageEncoder`) and a projection head;
- the **spot view**: the spot's expression vector plus learnable x and y position
  embeddings goes through a small pre-norm Transformer that treats the spots of a
  batch as the words of one sentence (:class:`SpotEncoder`), then a projection head.

Both heads (:class:`ProjectionHead`) end in 256 dimensions, and training pulls the two
views of the same spot together with a symmetric cross-entropy over the batch's
similarity matrix (:func:`contrastive_loss`). :class:`MclSTExp` ties the parts
together; ``MclSTExp(..., spot_encoder="none")`` gives the BLEEP-style baseline whose
spot view is only the projection head on the expression.

The defaults follow the published mclSTExp code except where ``docs/architecture.md``
lists a deviation (position-table size, optional section sentences, optional
normalised embeddings with a learnable temperature, dropout, explicit weights).

Examples
--------
>>> import torch
>>> from mclstexp_lite.models import MclSTExp, normalize_uint8
>>> model = MclSTExp(50, weights=None)  # random init; weights="imagenet" is the paper
>>> patches = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
>>> out = model(normalize_uint8(patches), torch.rand(4, 50), torch.randint(0, 30, (4, 2)))
>>> sorted(out)
['image_emb', 'logits', 'loss', 'spot_emb', 'temperature']
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import encoders as enc
from .encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_ARCHS",
    "PUBLISHED_PARAMETERS",
    "ImageEncoder",
    "SpotEncoder",
    "TransformerBlock",
    "Attention",
    "FeedForward",
    "ProjectionHead",
    "MclSTExp",
    "contrastive_loss",
    "count_parameters",
    "normalize_uint8",
]

#: Built-in image backbones and their pooled feature sizes (the full registry, with
#: weights and preprocessing, is :data:`mclstexp_lite.encoders.ENCODERS`; any timm model
#: is available as ``"timm:<name>"``).
IMAGE_ARCHS = {name: spec.feature_dim for name, spec in ENCODERS.items()}

_WEIGHT_CHOICES = ("None", "'imagenet'", "'pretrained'", "a path to a state-dict file")

#: Parameter counts of the published mclSTExp implementation (``model.py``,
#: ``mclSTExp_Attention`` with DenseNet-121 and 785 genes, as built by its ``train.py``).
PUBLISHED_PARAMETERS = {
    "image_encoder": 6_953_856,
    "spot_encoder": 5_691_250,
    "position_embeddings": 2 * 65_536 * 785,
    "image_projection": 328_704,
    "spot_projection": 267_520,
}
PUBLISHED_PARAMETERS["total"] = sum(PUBLISHED_PARAMETERS.values())


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


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
        A name of :data:`mclstexp_lite.encoders.ENCODERS` or ``"timm:<model>"``.
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
    spec : mclstexp_lite.encoders.EncoderSpec
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
        self.image_size = spec.input_size if image_size is None else _positive_int(image_size, "image_size")
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
        """sha256 of the backbone's weights (:func:`mclstexp_lite.encoders.state_fingerprint`)."""
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


# --------------------------------------------------------------------------------------
# Spots
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention as in the published spot encoder.

    ``q, k, v`` come from one bias-free linear layer ``dim -> 3 * heads * dim_head``;
    weights are ``softmax(q k^T * dim_head**-0.5)`` (positions outside ``mask`` get
    zero weight), followed by dropout; the heads are concatenated and mapped back by a
    linear layer ``heads * dim_head -> dim`` with bias, then dropout.

    Parameters
    ----------
    dim
        Token size (number of genes).
    heads, dim_head
        Number of heads and size of each.
    dropout
        Dropout probability on the attention weights and on the output.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.dropout = float(dropout)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence axis.

        Parameters
        ----------
        x
            ``(N, L, dim)`` sequences.
        mask
            Optional boolean ``(L, L)``; ``mask[i, j]`` True lets token ``i`` attend to ``j``.

        Returns
        -------
        torch.Tensor
            ``(N, L, dim)``.
        """
        n, length, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # (N, L, H*D) -> (N, H, L, D)
        q, k, v = (t.reshape(n, length, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(
        self, dim: int, *, heads: int, dim_head: int, mlp_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.ff(self.ff_norm(x))


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_dropout(value: Any, name: str = "dropout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}.")
    return float(value)


class SpotEncoder(nn.Module):
    """Expression plus x/y position embeddings through a small Transformer.

    Each spot is a "word" of ``n_genes`` numbers. Its integer array position adds
    ``x_embed[x] + y_embed[y]`` (two learnable tables of ``n_pos`` rows, one per axis),
    then ``depth`` pre-norm :class:`TransformerBlock` s run over a "sentence" of spots.

    Parameters
    ----------
    n_genes
        Genes per spot; also the token size of the Transformer.
    n_pos
        Rows of each position table; array coordinates must lie in ``[0, n_pos)``.
        64 covers HER2+ (array coordinates up to about 35); Visium arrays need 128.
        The published code uses 65,536 rows per table.
    depth
        Number of Transformer blocks (published: 2).
    heads, dim_head
        Attention heads and their size (published: 8 x 64).
    mlp_dim
        Hidden size of the MLP; ``None`` means ``n_genes`` (published).
    dropout
        Dropout probability in the attention and MLP.
    sentence
        ``"batch"`` (published): all spots of the batch form one sequence, so every spot
        attends to every other spot of the batch, whatever section it comes from.
        ``"section"``: pass ``groups`` (section id per spot) and each spot attends only to
        spots of its own section (block-diagonal attention mask).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_pos: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        sentence: str = "batch",
    ) -> None:
        super().__init__()
        self.n_genes = _positive_int(n_genes, "n_genes")
        self.n_pos = _positive_int(n_pos, "n_pos")
        depth = _positive_int(depth, "depth")
        heads = _positive_int(heads, "heads")
        dim_head = _positive_int(dim_head, "dim_head")
        mlp_dim = self.n_genes if mlp_dim is None else _positive_int(mlp_dim, "mlp_dim")
        dropout = _check_dropout(dropout)
        if sentence not in ("batch", "section"):
            raise ValueError(f"sentence must be 'batch' or 'section', got {sentence!r}.")
        self.sentence = sentence
        self.x_embed = nn.Embedding(self.n_pos, self.n_genes)
        self.y_embed = nn.Embedding(self.n_pos, self.n_genes)
        self.blocks = nn.ModuleList(
            TransformerBlock(self.n_genes, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout)
            for _ in range(depth)
        )

    def _check_pos(self, pos: torch.Tensor, n_spots: int) -> torch.Tensor:
        if not isinstance(pos, torch.Tensor):
            pos = torch.as_tensor(np.asarray(pos))
        if pos.ndim != 2 or pos.shape != (n_spots, 2):
            raise ValueError(f"pos must have shape ({n_spots}, 2) (x, y per spot), got {tuple(pos.shape)}.")
        if pos.is_floating_point():
            if not torch.equal(pos, pos.round()):
                raise ValueError("pos must hold integer array coordinates; got non-integral floats.")
        elif pos.dtype == torch.bool or pos.is_complex():
            raise TypeError(f"pos must be an integer tensor, got {pos.dtype}.")
        pos = pos.long()
        if n_spots:
            low, high = int(pos.min()), int(pos.max())
            if low < 0 or high >= self.n_pos:
                raise ValueError(
                    f"Array positions must lie in [0, n_pos) = [0, {self.n_pos}); got values from "
                    f"{low} to {high}. Raise n_pos (to at least {high + 1}) when building the model, "
                    "or shift the coordinates so that they start at 0."
                )
        return pos

    def embed(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Return ``expr + x_embed(pos[:, 0]) + y_embed(pos[:, 1])`` after validating inputs."""
        if expr.ndim != 2 or expr.shape[1] != self.n_genes:
            raise ValueError(
                f"expr must have shape (B, n_genes={self.n_genes}), got {tuple(expr.shape)}."
            )
        if not expr.is_floating_point():
            raise TypeError(f"expr must be a float tensor, got {expr.dtype}.")
        pos = self._check_pos(pos, expr.shape[0]).to(expr.device)
        return expr + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])

    def attention_mask(self, groups: Any, n_spots: int, device: torch.device) -> torch.Tensor | None:
        """Block-diagonal boolean mask for ``sentence="section"``; ``None`` for ``"batch"``."""
        if self.sentence == "batch":
            return None
        if groups is None:
            raise ValueError(
                "sentence='section' needs groups: one section id (integer) per spot, shape (B,)."
            )
        if not isinstance(groups, torch.Tensor):
            groups = torch.as_tensor(np.asarray(groups))
        if groups.shape != (n_spots,):
            raise ValueError(f"groups must have shape ({n_spots},), got {tuple(groups.shape)}.")
        if groups.is_floating_point() or groups.is_complex():
            raise TypeError(
                f"groups must hold integer section ids, got {groups.dtype}; "
                "use e.g. adata.obs['section'].cat.codes."
            )
        groups = groups.to(device)
        return groups[:, None] == groups[None, :]

    def forward(self, expr: torch.Tensor, pos: torch.Tensor, groups: Any = None) -> torch.Tensor:
        """Encode a batch of spots.

        Parameters
        ----------
        expr
            ``(B, n_genes)`` float expression.
        pos
            ``(B, 2)`` integer array positions ``(x, y)`` in ``[0, n_pos)``.
        groups
            ``(B,)`` integer section ids; required for ``sentence="section"``, ignored for
            ``sentence="batch"`` (where the whole batch is one sentence by definition).

        Returns
        -------
        torch.Tensor
            ``(B, n_genes)``.
        """
        x = self.embed(expr, pos)
        mask = self.attention_mask(groups, x.shape[0], x.device)
        x = x.unsqueeze(0)  # the batch is one sentence: (1, B, n_genes)
        for block in self.blocks:
            x = block(x, mask)
        return x.squeeze(0)


# --------------------------------------------------------------------------------------
# Heads, loss, model
# --------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """Residual two-layer projection into the shared embedding space.

    ``p = Linear(in_dim, out_dim)(x)``; ``h = Dropout(Linear(out_dim, out_dim)(GELU(p)))``;
    returns ``LayerNorm(p + h)``.

    Parameters
    ----------
    in_dim
        Input feature size.
    out_dim
        Embedding size (256 in the paper).
    dropout
        Dropout probability after the second linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, *, dropout: float = 0.0) -> None:
        super().__init__()
        in_dim = _positive_int(in_dim, "in_dim")
        out_dim = _positive_int(out_dim, "out_dim")
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


def _symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def contrastive_loss(
    spot_emb: torch.Tensor,
    image_emb: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Symmetric (CLIP-style) contrastive loss over a batch of paired embeddings.

    ``logits = spot_emb @ image_emb.T / temperature``; the matching pair of row ``i`` is
    column ``i``; the loss is the mean of the cross-entropy over rows (spot -> image)
    and over columns (image -> spot).

    Parameters
    ----------
    spot_emb, image_emb
        ``(B, D)`` embeddings; row ``i`` of both belongs to the same spot.
    temperature
        Positive scalar dividing the logits (published mclSTExp: 1.0).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if spot_emb.ndim != 2 or spot_emb.shape != image_emb.shape:
        raise ValueError(
            "spot_emb and image_emb must both be (B, D) with the same shape; got "
            f"{tuple(spot_emb.shape)} and {tuple(image_emb.shape)}."
        )
    if spot_emb.shape[0] == 0:
        raise ValueError("contrastive_loss needs at least one pair (B >= 1).")
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")
    return _symmetric_cross_entropy(spot_emb @ image_emb.T / temperature)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (each shared tensor counted once).

    Parameters
    ----------
    module
        Any :class:`torch.nn.Module`.
    trainable_only
        Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class _Required:
    """Sentinel default for arguments that must be given explicitly."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()

_MAX_LOGIT_SCALE = 100.0
_LEARNED_TEMPERATURE_INIT = 0.07


class MclSTExp(nn.Module):
    """The mclSTExp model: image and spot encoders with projection heads.

    Parameters
    ----------
    n_genes
        Genes per spot (785 for the published HER2+ panel).
    image_arch
        Image backbone: a name of :data:`mclstexp_lite.encoders.ENCODERS` (paper:
        ``"densenet121"``; offline with ImageNet weights: ``"efficientnet_lite0"``) or
        ``"timm:<model>"``.
    weights
        **Required keyword.** ``"imagenet"`` (paper) / ``"pretrained"``, ``None`` (random
        init) or a path to a state-dict file; see :class:`ImageEncoder`.
    image_size
        Input side of the image encoder; ``None``: the encoder's own (224 for the
        built-in ones). Stored in :attr:`config`, so a checkpoint says how to feed it.
    encoder_kwargs
        Extra ``timm.create_model`` arguments (timm encoders only).
    freeze_image
        Freeze the image backbone (parameters and batch-norm statistics).
    image_relu
        DenseNet only: apply a ReLU before pooling (torchvision's path). Default False,
        as the published code, which pools the pre-ReLU features.
    n_pos, depth, heads, dim_head
        Spot-encoder settings; see :class:`SpotEncoder`.
    dropout
        Dropout in the spot Transformer and in both projection heads. Default 0, as the
        published training runs.
    proj_dim
        Size of the shared embedding space (256).
    normalize_embeddings
        L2-normalise both embeddings before the similarity (CLIP style). The paper uses
        the raw projected embeddings (False).
    temperature
        Fixed temperature dividing the logits, or the initial value of the learned one.
        ``None`` means 1.0 (paper) when fixed and 0.07 (CLIP) when learned.
    learn_temperature
        Learn ``log(1 / temperature)``; the logit scale is capped at 100. Requires
        ``normalize_embeddings=True``.
    sentence
        ``"batch"`` (paper) or ``"section"``; see :class:`SpotEncoder`.
    spot_encoder
        ``"transformer"`` (mclSTExp) or ``"none"``: the BLEEP-style baseline, whose spot
        view is only the projection head on the raw expression (no position embeddings,
        no Transformer); ``pos`` and ``groups`` are then ignored.

    Attributes
    ----------
    config : dict
        Every constructor argument (JSON-serialisable); :meth:`from_config` rebuilds
        the architecture from it.
    image_encoder : ImageEncoder
    spot_encoder : SpotEncoder or None
    image_projection, spot_projection : ProjectionHead
    logit_scale : torch.nn.Parameter or None
        ``log(1 / temperature)`` when ``learn_temperature``.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        image_arch: str = "densenet121",
        weights: str | os.PathLike | None = _REQUIRED,
        freeze_image: bool = False,
        image_relu: bool = False,
        n_pos: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        proj_dim: int = 256,
        normalize_embeddings: bool = False,
        temperature: float | None = None,
        learn_temperature: bool = False,
        sentence: str = "batch",
        spot_encoder: str = "transformer",
        image_size: int | None = None,
        encoder_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if weights is _REQUIRED:
            raise TypeError(
                "MclSTExp needs the image weights chosen explicitly: pass weights='imagenet' "
                "(the paper: ImageNet-pretrained backbone) or weights=None (random "
                "initialisation, for offline use and tests), or a path to a state-dict file."
            )
        n_genes = _positive_int(n_genes, "n_genes")
        if spot_encoder not in ("transformer", "none"):
            raise ValueError(f"spot_encoder must be 'transformer' or 'none', got {spot_encoder!r}.")
        if sentence not in ("batch", "section"):
            raise ValueError(f"sentence must be 'batch' or 'section', got {sentence!r}.")
        if spot_encoder == "none" and sentence != "batch":
            raise ValueError(
                "sentence='section' only applies to spot_encoder='transformer'; the "
                "spot_encoder='none' baseline encodes each spot on its own."
            )
        if learn_temperature and not normalize_embeddings:
            raise ValueError(
                "learn_temperature=True needs normalize_embeddings=True (a learned CLIP-style "
                "temperature on unnormalised embeddings saturates the softmax)."
            )
        if temperature is None:
            temperature = _LEARNED_TEMPERATURE_INIT if learn_temperature else 1.0
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
        if learn_temperature and 1.0 / temperature > _MAX_LOGIT_SCALE:
            raise ValueError(
                f"temperature must be at least {1 / _MAX_LOGIT_SCALE} when learned "
                f"(logit scale is capped at {_MAX_LOGIT_SCALE}), got {temperature}."
            )
        dropout = _check_dropout(dropout)

        self.config: dict[str, Any] = {
            "n_genes": n_genes,
            "image_arch": image_arch,
            "weights": None if weights is None else str(weights),
            "freeze_image": bool(freeze_image),
            "image_relu": bool(image_relu),
            "n_pos": _positive_int(n_pos, "n_pos"),
            "depth": _positive_int(depth, "depth"),
            "heads": _positive_int(heads, "heads"),
            "dim_head": _positive_int(dim_head, "dim_head"),
            "dropout": dropout,
            "proj_dim": _positive_int(proj_dim, "proj_dim"),
            "normalize_embeddings": bool(normalize_embeddings),
            "temperature": float(temperature),
            "learn_temperature": bool(learn_temperature),
            "sentence": sentence,
            "spot_encoder": spot_encoder,
            "image_size": None if image_size is None else _positive_int(image_size, "image_size"),
            "encoder_kwargs": None if encoder_kwargs is None else dict(encoder_kwargs),
        }

        self.image_encoder = ImageEncoder(
            image_arch, weights=weights, freeze=freeze_image, pre_pool_relu=image_relu,
            image_size=image_size, encoder_kwargs=encoder_kwargs,
        )
        if spot_encoder == "transformer":
            self.spot_encoder: SpotEncoder | None = SpotEncoder(
                n_genes,
                n_pos=n_pos,
                depth=depth,
                heads=heads,
                dim_head=dim_head,
                dropout=dropout,
                sentence=sentence,
            )
        else:
            self.spot_encoder = None
        self.image_projection = ProjectionHead(self.image_encoder.out_dim, proj_dim, dropout=dropout)
        self.spot_projection = ProjectionHead(n_genes, proj_dim, dropout=dropout)
        self.normalize_embeddings = bool(normalize_embeddings)
        if learn_temperature:
            self.logit_scale: nn.Parameter | None = nn.Parameter(
                torch.tensor(math.log(1.0 / temperature))
            )
        else:
            self.logit_scale = None
            self.register_buffer("_fixed_temperature", torch.tensor(float(temperature)), persistent=False)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any], *, load_image_weights: bool = False) -> "MclSTExp":
        """Rebuild a model from :attr:`config` (e.g. stored in a checkpoint).

        Parameters
        ----------
        config
            A dict as produced by :attr:`config`.
        load_image_weights
            By default the image backbone starts randomly initialised, because the
            usual next step is ``model.load_state_dict(checkpoint["model"])``, which
            overwrites it; nothing is downloaded. True fetches/loads ``config["weights"]``.
            Either way the rebuilt model's ``config`` equals ``config``.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}.")
        cfg = dict(config)
        if "n_genes" not in cfg or "weights" not in cfg:
            raise ValueError("config must contain at least 'n_genes' and 'weights' (see MclSTExp.config).")
        n_genes = cfg.pop("n_genes")
        weights = cfg.pop("weights")
        model = cls(n_genes, weights=weights if load_image_weights else None, **cfg)
        model.config["weights"] = weights
        return model

    # -- encoders ----------------------------------------------------------------------

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(emb, dim=-1) if self.normalize_embeddings else emb

    @property
    def preprocessing(self) -> dict:
        """How patches must be fed to the image encoder (size, mean, std)."""
        return self.image_encoder.preprocessing

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Project normalised image patches ``(B, 3, H, W)`` into the shared space ``(B, proj_dim)``."""
        return self.encode_features(self.image_encoder(images))

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project pooled backbone features ``(B, out_dim)`` into the shared space.

        The image path after the backbone: ``encode_image(x) == encode_features(
        image_encoder(x))``. Used with cached frozen features
        (:mod:`mclstexp_lite.features`).
        """
        if features.ndim != 2 or features.shape[1] != self.image_encoder.out_dim:
            raise ValueError(
                f"features must have shape (B, {self.image_encoder.out_dim}) (pooled "
                f"{self.config['image_arch']} features), got {tuple(features.shape)}."
            )
        return self._finish(self.image_projection(features))

    def encode_spot(
        self, expr: torch.Tensor, pos: torch.Tensor | None = None, groups: Any = None
    ) -> torch.Tensor:
        """Project spots into the shared space.

        Parameters
        ----------
        expr
            ``(B, n_genes)`` float expression.
        pos
            ``(B, 2)`` integer array positions; required unless ``spot_encoder="none"``.
        groups
            ``(B,)`` section ids, required for ``sentence="section"``.

        Returns
        -------
        torch.Tensor
            ``(B, proj_dim)``.
        """
        if self.spot_encoder is None:
            if expr.ndim != 2 or expr.shape[1] != self.config["n_genes"]:
                raise ValueError(
                    f"expr must have shape (B, n_genes={self.config['n_genes']}), got {tuple(expr.shape)}."
                )
            return self._finish(self.spot_projection(expr))
        if pos is None:
            raise ValueError("pos (B, 2 integer array positions) is required by the Transformer spot encoder.")
        return self._finish(self.spot_projection(self.spot_encoder(expr, pos, groups)))

    @property
    def temperature(self) -> torch.Tensor:
        """Current temperature (learned: ``1 / min(exp(logit_scale), 100)``)."""
        if self.logit_scale is None:
            return self._fixed_temperature
        return 1.0 / self.logit_scale.clamp(max=math.log(_MAX_LOGIT_SCALE)).exp()

    def forward(
        self,
        images: torch.Tensor | None,
        expr: torch.Tensor,
        pos: torch.Tensor | None = None,
        groups: Any = None,
        *,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch of paired patches and spots and compute the loss.

        Pass ``images`` (normalised patches), or ``images=None`` and ``features`` (the
        frozen backbone's pooled features of the same patches, e.g. from the feature
        cache): the rest of the computation is the same.

        Returns
        -------
        dict
            ``loss`` (scalar), ``image_emb`` and ``spot_emb`` (``(B, proj_dim)``),
            ``logits`` (``(B, B)``, rows = spots, columns = images:
            ``spot_emb @ image_emb.T / temperature``) and ``temperature`` (scalar).
        """
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images (normalised patches) and features "
                             "(pooled backbone features).")
        x = images if images is not None else features
        if x.shape[0] != expr.shape[0]:
            raise ValueError(
                f"images and expr must have the same batch size, got {x.shape[0]} and {expr.shape[0]}."
            )
        image_emb = self.encode_image(images) if images is not None else self.encode_features(features)
        spot_emb = self.encode_spot(expr, pos, groups)
        temperature = self.temperature
        logits = spot_emb @ image_emb.T / temperature
        return {
            "loss": _symmetric_cross_entropy(logits),
            "image_emb": image_emb,
            "spot_emb": spot_emb,
            "logits": logits,
            "temperature": temperature.detach(),
        }

    # -- reporting ---------------------------------------------------------------------

    def _is_published_architecture(self) -> bool:
        c = self.config
        return (
            c["n_genes"] == 785
            and c["image_arch"] == "densenet121"
            and c["spot_encoder"] == "transformer"
            and (c["depth"], c["heads"], c["dim_head"], c["proj_dim"]) == (2, 8, 64, 256)
        )

    def parameter_table(self) -> pd.DataFrame:
        """Parameters per part, next to the published implementation's.

        Returns
        -------
        pandas.DataFrame
            Index ``image_encoder``, ``spot_encoder`` (Transformer blocks only),
            ``position_embeddings``, ``image_projection``, ``spot_projection``, ``total``
            (includes a learned temperature if any); columns ``parameters`` (int) and
            ``published`` (the published code's counts, filled only when this model has
            the published architecture: 785 genes, DenseNet-121, Transformer of depth 2
            with 8 x 64 heads, 256-d projections; NaN otherwise).
        """
        enc = self.spot_encoder
        counts = {
            "image_encoder": count_parameters(self.image_encoder),
            "spot_encoder": 0 if enc is None else count_parameters(enc.blocks),
            "position_embeddings": 0
            if enc is None
            else count_parameters(enc.x_embed) + count_parameters(enc.y_embed),
            "image_projection": count_parameters(self.image_projection),
            "spot_projection": count_parameters(self.spot_projection),
            "total": count_parameters(self),
        }
        published = self._is_published_architecture()
        return pd.DataFrame(
            {
                "parameters": pd.Series(counts, dtype="int64"),
                "published": pd.Series(
                    {k: float(PUBLISHED_PARAMETERS[k]) if published else np.nan for k in counts},
                    dtype="float64",
                ),
            }
        )
