"""What a model reads: the image inputs of a frozen encoder and the expression it sees.

The paper's model reads, per spot, the backbone features of the patch under it and the
spot's prepared expression. :class:`mclstexp_lite.train.TrainConfig` has options that
change these inputs (all off in the ``paper`` profile); the model records them in its
``config``, so that training, embedding, retrieval, the linear probe and a saved
predictor build exactly the same inputs from a :class:`~mclstexp_lite.train.SpotData`:

``feature_norm="section"``
    every backbone feature standardised within each section (:func:`standardize_sections`),
    with the statistics of that section's own spots: a slide-level shift (stain, scanner,
    resolution) is taken out before the model sees the features. Adaptive batch
    normalisation (Li et al. 2016, arXiv 1603.04779) does the same inside a network for a
    new domain; a new slide here uses its own spots' statistics, no expression needed.
``context="mean"``, ``context_um``
    a second block of features: the mean features of the spots of the same section within
    ``context_um`` microns of the spot, itself included (:func:`neighbour_mean`), i.e. the
    spot's neighbourhood, as TRIPLEX (Chung et al., CVPR 2024) and Hist2ST read it.
``wide_view=f``
    a further block: the features of a crop ``f`` times as wide around the same centre,
    resized to the encoder's input (a wider field of view at lower resolution; TRIPLEX's
    neighbour view), cut and cached like the patches
    (:meth:`~mclstexp_lite.train.SpotData.wide_patches`).
``expr_norm="center"``
    the expression the spot encoder reads and retrieval averages, centred per gene within
    each section and shifted to the overall mean (:func:`center_expression`).

Blocks are concatenated as ``[patch, neighbourhood, wide crop]``; with ``feature_norm``
each block is built from standardised features (the wide crop's standardised on its own).
Virtual spots of an image-only section (:func:`mclstexp_lite.datasets.from_image`) get the
same treatment from their own positions and image.
"""

from __future__ import annotations

import logging
import warnings
from typing import Mapping

import numpy as np
import torch

from . import features as fx

__all__ = ["options_of", "image_inputs", "model_expression", "center_expression",
           "standardize_sections", "neighbour_matrix", "neighbour_mean",
           "MIN_SECTION_SPOTS"]

log = logging.getLogger(__name__)

#: Below this many spots, per-section statistics (``feature_norm="section"``) are noisy
#: and a warning says so.
MIN_SECTION_SPOTS = 20

_DEFAULTS = {"feature_norm": None, "expr_norm": None, "context": None, "context_um": 300.0,
             "wide_view": None}


def options_of(source) -> dict:
    """The input options of a model (its ``config``), a ``TrainConfig`` or a dict of either.

    Keys absent (a model or config written before the options existed) mean off.
    """
    if hasattr(source, "model_inputs"):  # TrainConfig
        return dict(source.model_inputs())
    cfg = getattr(source, "config", source)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a model, a TrainConfig or a dict, got {type(source).__name__}")
    return {k: cfg.get(k, v) for k, v in _DEFAULTS.items()}


# ------------------------------------------------------------------ expression
def center_expression(expr, groups) -> np.ndarray:
    """``expr - (its section's mean) + (the overall mean)``, per gene, float32.

    Parameters
    ----------
    expr
        ``(N, G)`` expression of all spots, sections stacked.
    groups
        ``(N,)`` section index of each spot.

    Returns
    -------
    numpy.ndarray
        ``(N, G)`` float32: within every section each gene has the overall mean of the
        spots given; its variation around the section mean is unchanged.
    """
    x = np.asarray(expr, dtype=np.float64)
    g = np.asarray(groups)
    if x.ndim != 2 or g.shape != (len(x),):
        raise ValueError(f"center_expression: expr must be (N, G) and groups (N,), got "
                         f"{x.shape} and {g.shape}")
    if not len(x):
        return x.astype(np.float32)
    overall = x.mean(axis=0)
    out = x.copy()
    for s in np.unique(g):
        sel = g == s
        out[sel] -= x[sel].mean(axis=0)
    out += overall
    return out.astype(np.float32)


def model_expression(source, data) -> np.ndarray:
    """The expression ``source`` (a model, TrainConfig or config dict) reads for ``data``.

    ``data.expr`` itself unless ``expr_norm="center"`` (:func:`center_expression` over
    ``data``'s sections). What the spot encoder reads in training and embedding, and what
    retrieval averages (the reference bank of :func:`mclstexp_lite.tl.predict_section`
    and of a predictor).
    """
    if options_of(source)["expr_norm"] == "center":
        return center_expression(data.expr, data.groups)
    return data.expr


# ---------------------------------------------------------------- image inputs
def standardize_sections(x: torch.Tensor, groups, *, names=None) -> torch.Tensor:
    """Each feature standardised to mean 0 and sd 1 within each section.

    Parameters
    ----------
    x
        ``(..., N, F)`` features (e.g. ``(n_views, N, F)``); statistics over the spots of
        a section, separately for every leading index (view).
    groups
        ``(N,)`` section index of each spot.
    names
        Section names for the warning about small sections.

    Returns
    -------
    torch.Tensor
        float32, same shape. A feature constant within a section becomes 0 there.
    """
    g = torch.as_tensor(np.asarray(groups))
    out = torch.empty_like(x, dtype=torch.float32)
    for s in torch.unique(g).tolist():
        sel = torch.nonzero(g == s).ravel()
        if len(sel) < MIN_SECTION_SPOTS:
            label = names[s] if names is not None else s
            warnings.warn(f"feature_norm='section': section {label} has {len(sel)} spots; "
                          f"statistics of fewer than {MIN_SECTION_SPOTS} spots are noisy "
                          "(predict the whole section at once)", RuntimeWarning, stacklevel=3)
        part = x.index_select(-2, sel).double()
        mean = part.mean(dim=-2, keepdim=True)
        sd = part.std(dim=-2, keepdim=True, unbiased=False)
        z = torch.where(sd > 1e-12, (part - mean) / sd.clamp_min(1e-12), torch.zeros_like(part))
        out.index_copy_(-2, sel, z.float())
    return out


def neighbour_matrix(coords_um, groups, radius_um: float):
    """Row-normalised ``(N, N)`` sparse matrix averaging each spot's neighbourhood.

    Row ``i`` has weight ``1 / m`` on each of the ``m`` spots of ``i``'s section within
    ``radius_um`` microns of it (``i`` itself included), so ``W @ x`` is the
    neighbourhood mean of ``x``.
    """
    from scipy import sparse
    from scipy.spatial import cKDTree

    if coords_um is None:
        raise ValueError("context='mean' needs the spots' positions in microns, which this "
                         "SpotData does not have; build it with SpotData.from_anndata from "
                         "sections with obsm['spatial'] and uns['spatial'][...]['metadata']"
                         "['um_per_px'] (every mclstexp_lite.datasets loader records them)")
    c = np.asarray(coords_um, dtype=np.float64)
    g = np.asarray(groups)
    rows, cols, vals = [], [], []
    for s in np.unique(g):
        idx = np.nonzero(g == s)[0]
        found = cKDTree(c[idx]).query_ball_point(c[idx], r=float(radius_um))
        for i, nb in zip(idx, found):
            rows.extend([i] * len(nb))
            cols.extend(idx[nb])
            vals.extend([1.0 / len(nb)] * len(nb))
    n = len(c)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))


def neighbour_mean(x: torch.Tensor, coords_um, groups, radius_um: float) -> torch.Tensor:
    """The mean of ``x`` over each spot's neighbourhood (:func:`neighbour_matrix`).

    ``x`` is ``(..., N, F)``; every leading index (view) is averaged on its own.
    """
    w = neighbour_matrix(coords_um, groups, radius_um).astype(np.float32)
    flat = x.reshape(-1, x.shape[-2], x.shape[-1])
    out = torch.stack([torch.from_numpy(np.asarray(w @ v.numpy(), dtype=np.float32))
                       for v in flat.float().cpu()])
    return out.reshape(x.shape)


def _wide_features(encoder, data, factor: float, views, device, amp, progress) -> torch.Tensor:
    wide = data.wide_patches(factor, progress=progress)
    out = torch.empty((len(views), len(data), encoder.out_dim), dtype=torch.float32)
    offset = 0
    for s, patches in enumerate(wide):
        n = len(patches)
        for vi, view in enumerate(views):
            out[vi, offset:offset + n].numpy()[...] = fx.section_features(
                encoder, patches, view=view, device=device, amp=amp, progress=progress,
                name=f"{data.sections[s]}_wide{factor:g}")
        offset += n
    return out


def image_inputs(model, data, *, views=1, device="auto", amp: str = "auto",
                 progress: bool = True) -> torch.Tensor:
    """The image projection's input for every spot of ``data``, from cached features.

    Parameters
    ----------
    model
        A :class:`mclstexp_lite.models.MclSTExp` with a frozen image encoder; its
        ``config`` says which blocks to build (module docstring).
    data
        :class:`mclstexp_lite.train.SpotData` (one or several whole sections:
        per-section statistics and neighbourhoods are taken over the spots given).
    views
        Dihedral views (a count or a list, :func:`mclstexp_lite.features.spot_features`);
        every block of a view is built from that view.
    device, amp, progress
        Where and how the backbone features are computed when not yet cached.

    Returns
    -------
    torch.Tensor
        float32 ``(n_views, len(data), model.image_input_dim)`` on the CPU.
    """
    opts = options_of(model)
    encoder = model.image_encoder
    view_ids = fx._views(views)
    base = fx.spot_features(encoder, data, views=view_ids, device=device, amp=amp,
                            progress=progress)
    if opts["feature_norm"] == "section":
        base = standardize_sections(base, data.groups, names=data.sections)
    blocks = [base]
    if opts["context"] == "mean":
        blocks.append(neighbour_mean(base, data.coords_um, data.groups, opts["context_um"]))
    if opts["wide_view"] is not None:
        wide = _wide_features(encoder, data, opts["wide_view"], view_ids, device, amp, progress)
        if opts["feature_norm"] == "section":
            wide = standardize_sections(wide, data.groups, names=data.sections)
        blocks.append(wide)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
