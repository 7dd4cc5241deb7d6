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

The two encoders live in :mod:`mclstexp_lite._image_encoder` and
:mod:`mclstexp_lite._spot_encoder` and are re-exported here with everything else, so
``from mclstexp_lite.models import ...`` is the one import.

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

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ._util import check_dropout, positive_int
from ._encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD
from ._image_encoder import ImageEncoder, normalize_uint8
from ._spot_encoder import Attention, FeedForward, SpotEncoder, TransformerBlock

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_ARCHS",
    "INPUT_OPTIONS",
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
#: weights and preprocessing, is :data:`mclstexp_lite._encoders.ENCODERS`; any timm model
#: is available as ``"timm:<name>"``).
IMAGE_ARCHS = {name: spec.feature_dim for name, spec in ENCODERS.items()}


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
        in_dim = positive_int(in_dim, "in_dim")
        out_dim = positive_int(out_dim, "out_dim")
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(check_dropout(dropout))
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


#: The input options a model records in its ``config`` (set through
#: :class:`mclstexp_lite.train.TrainConfig`, built by :mod:`mclstexp_lite._inputs`), with
#: their allowed values; ``context_um`` and ``wide_view`` are numbers.
INPUT_OPTIONS: dict[str, tuple] = {
    "feature_norm": (None, "section"),
    "expr_norm": (None, "center"),
    "context": (None, "mean"),
    "context_um": (),
    "wide_view": (),
}


def _check_inputs(*, feature_norm, expr_norm, context, context_um, wide_view) -> dict:
    """The model's input options, validated (see :class:`mclstexp_lite.train.TrainConfig`)."""
    given = {"feature_norm": feature_norm, "expr_norm": expr_norm, "context": context}
    for name, value in given.items():
        if value not in INPUT_OPTIONS[name]:
            raise ValueError(f"{name} must be one of {INPUT_OPTIONS[name]}, got {value!r}.")
    if isinstance(context_um, bool) or not isinstance(context_um, (int, float)) or not (
            math.isfinite(context_um) and context_um > 0):
        raise ValueError(f"context_um must be a positive number of microns, got {context_um!r}.")
    if wide_view is not None and (isinstance(wide_view, bool)
                                  or not isinstance(wide_view, (int, float))
                                  or not math.isfinite(wide_view) or wide_view <= 1):
        raise ValueError(f"wide_view must be None or a factor > 1, got {wide_view!r}.")
    return {**given, "context_um": float(context_um),
            "wide_view": None if wide_view is None else float(wide_view)}


def _check_model_settings(n_genes, *, weights, spot_encoder, sentence, learn_temperature,
                          normalize_embeddings, temperature, dropout):
    """:class:`MclSTExp`'s architecture arguments checked; returns ``n_genes``, the
    temperature (its default filled in) and the dropout as the model uses them."""
    if weights is _REQUIRED:
        raise TypeError(
            "MclSTExp needs the image weights chosen explicitly: pass weights='imagenet' "
            "(the paper: ImageNet-pretrained backbone) or weights=None (random "
            "initialisation, for offline use and tests), or a path to a state-dict file."
        )
    n_genes = positive_int(n_genes, "n_genes")
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
    dropout = check_dropout(dropout)
    return n_genes, temperature, dropout


class MclSTExp(nn.Module):
    """The mclSTExp model: image and spot encoders with projection heads.

    Parameters
    ----------
    n_genes
        Genes per spot (785 for the published HER2+ panel).
    image_arch
        Image backbone: a name of :data:`mclstexp_lite._encoders.ENCODERS` (paper:
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
    feature_norm, expr_norm, context, context_um, wide_view
        What the model reads (default: the paper's inputs), set through
        :class:`mclstexp_lite.train.TrainConfig` and recorded here so that a checkpoint
        or predictor embeds new data the way it was trained; the inputs themselves are
        built by :mod:`mclstexp_lite._inputs`. With ``context="mean"`` and/or a
        ``wide_view`` factor the image projection reads 2 or 3 blocks of backbone
        features (the patch, its neighbourhood, the wide crop), ``image_input_dim``
        numbers; only cached features (:meth:`encode_features`) can provide them.

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
        feature_norm: str | None = None,
        expr_norm: str | None = None,
        context: str | None = None,
        context_um: float = 300.0,
        wide_view: float | None = None,
    ) -> None:
        super().__init__()
        n_genes, temperature, dropout = _check_model_settings(
            n_genes, weights=weights, spot_encoder=spot_encoder, sentence=sentence,
            learn_temperature=learn_temperature, normalize_embeddings=normalize_embeddings,
            temperature=temperature, dropout=dropout)
        inputs = _check_inputs(feature_norm=feature_norm, expr_norm=expr_norm, context=context,
                               context_um=context_um, wide_view=wide_view)

        self.config: dict[str, Any] = {
            "n_genes": n_genes,
            "image_arch": image_arch,
            "weights": None if weights is None else str(weights),
            "freeze_image": bool(freeze_image),
            "image_relu": bool(image_relu),
            "n_pos": positive_int(n_pos, "n_pos"),
            "depth": positive_int(depth, "depth"),
            "heads": positive_int(heads, "heads"),
            "dim_head": positive_int(dim_head, "dim_head"),
            "dropout": dropout,
            "proj_dim": positive_int(proj_dim, "proj_dim"),
            "normalize_embeddings": bool(normalize_embeddings),
            "temperature": float(temperature),
            "learn_temperature": bool(learn_temperature),
            "sentence": sentence,
            "spot_encoder": spot_encoder,
            "image_size": None if image_size is None else positive_int(image_size, "image_size"),
            "encoder_kwargs": None if encoder_kwargs is None else dict(encoder_kwargs),
            **inputs,
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
        self.image_projection = ProjectionHead(self.image_input_dim, proj_dim, dropout=dropout)
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

    @property
    def image_blocks(self) -> int:
        """Blocks of backbone features the image projection reads: 1 (the patch), plus 1
        for ``context``, plus 1 for ``wide_view``."""
        return 1 + (self.config["context"] is not None) + (self.config["wide_view"] is not None)

    @property
    def image_input_dim(self) -> int:
        """Width of the image projection's input: ``image_blocks * image_encoder.out_dim``."""
        return self.image_blocks * self.image_encoder.out_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Project normalised image patches ``(B, 3, H, W)`` into the shared space ``(B, proj_dim)``."""
        if self.image_blocks > 1:
            raise ValueError(
                "this model reads the patch together with its neighbourhood or a wide crop "
                f"(context={self.config['context']!r}, wide_view={self.config['wide_view']!r}); "
                "build its input with mclstexp_lite._inputs.image_inputs and call "
                "encode_features (embed.embed_images does both).")
        return self.encode_features(self.image_encoder(images))

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Project pooled backbone features ``(B, out_dim)`` into the shared space.

        The image path after the backbone: ``encode_image(x) == encode_features(
        image_encoder(x))``. Used with cached frozen features
        (:mod:`mclstexp_lite.features`).
        """
        if features.ndim != 2 or features.shape[1] != self.image_input_dim:
            what = (f"pooled {self.config['image_arch']} features" if self.image_blocks == 1 else
                    f"{self.image_blocks} blocks of {self.image_encoder.out_dim} pooled "
                    f"{self.config['image_arch']} features, mclstexp_lite._inputs.image_inputs")
            raise ValueError(
                f"features must have shape (B, {self.image_input_dim}) ({what}), got "
                f"{tuple(features.shape)}."
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

    def parameter_table(self, *, trainable: bool = False) -> pd.DataFrame:
        """Parameters per part, next to the published implementation's.

        Parameters
        ----------
        trainable
            Also count, per part, the parameters that training updates (``trainable``:
            ``requires_grad``) and those it leaves as they are (``frozen``; e.g. the
            whole image encoder with ``freeze_image=True``).

        Returns
        -------
        pandas.DataFrame
            Index ``image_encoder``, ``spot_encoder`` (Transformer blocks only),
            ``position_embeddings``, ``image_projection``, ``spot_projection``, ``total``
            (includes a learned temperature if any); columns ``parameters`` (int), with
            ``trainable=True`` then ``trainable`` and ``frozen`` (int), and ``published``
            (the published code's counts, filled only when this model has the published
            architecture: 785 genes, DenseNet-121, Transformer of depth 2 with 8 x 64
            heads, 256-d projections; NaN otherwise).
        """
        enc = self.spot_encoder
        parts = {
            "image_encoder": [self.image_encoder],
            "spot_encoder": [] if enc is None else [enc.blocks],
            "position_embeddings": [] if enc is None else [enc.x_embed, enc.y_embed],
            "image_projection": [self.image_projection],
            "spot_projection": [self.spot_projection],
            "total": [self],
        }
        counts = {k: sum(count_parameters(m) for m in v) for k, v in parts.items()}
        columns = {"parameters": pd.Series(counts, dtype="int64")}
        if trainable:
            train = {k: sum(count_parameters(m, trainable_only=True) for m in v)
                     for k, v in parts.items()}
            columns["trainable"] = pd.Series(train, dtype="int64")
            columns["frozen"] = pd.Series({k: counts[k] - train[k] for k in counts},
                                          dtype="int64")
        published = self._is_published_architecture()
        columns["published"] = pd.Series(
            {k: float(PUBLISHED_PARAMETERS[k]) if published else np.nan for k in counts},
            dtype="float64")
        return pd.DataFrame(columns)
