"""New slide in, predicted expression out: a saved predictor and a command line.

A *predictor* is everything retrieval needs, in one file: the trained model (its image
encoder and projection head embed the new slide's patches), the reference bank (the
spot embeddings and expression of the training sections, the gene names), how patches
were cut (``patch_um``, ``patch_size``), the spot layout to lay over a new slide (pitch,
diameter, grid), and the retrieval settings (``top_k``, ``metric``). It is written with
``torch.save`` as a dict of tensors and plain values and read with
``torch.load(weights_only=True)``: no pickled code runs when it is loaded, and the
training data folders are not needed.

Library::

    from mclstexp_lite import predict
    p = predict.build_predictor(model, reference)        # after training
    predict.save_predictor(p, "her2st_quick.predictor.pt")
    pred = predict.predict_image("her2st_quick.predictor.pt", "slide.tif",
                                 um_per_px=0.5, out="slide_pred.h5ad")

Command line (same thing, with a figure of the predicted maps beside the ``.h5ad``)::

    python -m mclstexp_lite.predict --model her2st_quick.predictor.pt \\
        --image slide.tif --um-per-px 0.5 --out slide_pred.h5ad
"""

from __future__ import annotations

import argparse
import datetime
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__, _util
from . import datasets as ds
from . import patches as pt
from . import tl
from ._util import atomic_write, atomic_write_h5ad
from ._checkpoint import load_model
from ._config import resolve_device
from ._embed import embed_images
from ._inputs import model_expression
from .pl import prediction_maps
from ._slides import GRIDS
from ._spotdata import SpotData

__all__ = ["Predictor", "build_predictor", "save_predictor", "load_predictor",
           "predict_image", "nearest_spots", "FORMAT", "PREDICTOR_KEYS", "main"]

#: Format tag stored in every predictor file.
FORMAT = "mclstexp_lite.predictor/1"
#: Out-of-distribution check: at most this many reference spots' image embeddings are kept
#: in the predictor (a seeded sample) to compare a new slide's patches with.
OOD_BANK = 3000
#: Neighbours averaged for a patch's distance to the reference images.
OOD_K = 10
#: A slide whose median patch distance to the reference images (cosine, mean over the
#: ``OOD_K`` nearest) is more than this many times the reference's own (each reference
#: spot to the spots of the other reference sections) gets a warning. Calibrated on the
#: offline data (docs/results.md, "Slides unlike the training data").
OOD_THRESHOLD = 1.75
#: Keys a predictor's prediction records in ``uns['mclstexp_prediction']`` beyond those of
#: :func:`mclstexp_lite.tl.predict_section` (the out-of-distribution pair only when the
#: predictor holds reference image embeddings).
PREDICTOR_KEYS = ("predictor_created", "ood_score", "ood_threshold")
_REQUIRED = ("format", "model", "model_config", "preprocessing", "encoder_fingerprint",
             "reference_emb", "reference_expr", "genes", "info")


@dataclass
class Predictor:
    """A trained model and its reference bank, ready to predict new slides.

    Attributes
    ----------
    model
        The :class:`mclstexp_lite.models.MclSTExp` (eval mode).
    reference_emb
        ``(N, D)`` float32 spot embeddings of the reference (training) spots.
    reference_expr
        ``(N, G)`` float32 normalised expression of the same spots, as the model reads it
        (centred per section for ``expr_norm="center"``,
        :func:`mclstexp_lite._inputs.model_expression`): what retrieval averages.
    genes
        The ``G`` gene names, in column order.
    info
        Plain values: ``reference_sections``, ``reference_n_spots``, ``top_k``,
        ``metric``, ``patch_um``, ``patch_size``, ``spot_pitch_um``,
        ``spot_diameter_um``, ``grid``, ``array``, ``layout_from`` (the training data's
        spot layout, laid over new slides), ``train_config`` (dict or ``None``),
        ``created``, ``package_version``, and for the out-of-distribution check
        ``ood_k``, ``ood_reference_distance``, ``ood_calibration``, ``ood_threshold``.
    reference_image_emb
        ``(M, D)`` float32 image embeddings of up to :data:`OOD_BANK` reference spots
        (a seeded sample), or ``None``: what a new slide's patches are compared with.
    """

    model: object
    reference_emb: np.ndarray
    reference_expr: np.ndarray
    genes: list[str]
    info: dict = field(default_factory=dict)
    reference_image_emb: np.ndarray | None = None

    def __post_init__(self):
        n, g = len(self.reference_emb), len(self.genes)
        if self.reference_expr.shape != (n, g):
            raise ValueError(f"predictor: reference expression has shape "
                             f"{self.reference_expr.shape}, expected ({n}, {g}) (spots, genes)")
        dim = self.model.config.get("proj_dim")
        if self.reference_emb.ndim != 2 or (dim is not None and self.reference_emb.shape[1] != dim):
            raise ValueError(f"predictor: reference embeddings have shape "
                             f"{self.reference_emb.shape} but the model embeds into {dim} "
                             "dimensions; they come from another model")
        if int(self.model.config.get("n_genes", g)) != g:
            raise ValueError(f"predictor: the model was trained on "
                             f"{self.model.config['n_genes']} genes but the reference has {g}; "
                             "build it from the model's own training sections")
        tl.check_gene_order(getattr(self.model, "genes", None), self.genes,
                            "predictor: the model was trained on", "the reference bank")
        self.model.genes = [str(x) for x in self.genes]

    def predict(self, section, *, um_per_px: float | None = None, tissue_mask=None,
                name: str | None = None, device="auto", progress: bool = True,
                cache_dir=None, max_spots: int | None = None,
                max_tissue_mm: float | None = None):
        """Predict the expression of a slide.

        Parameters
        ----------
        section
            An H&E image path or ``(H, W, 3)`` uint8 array (virtual spots are laid over
            its tissue with :func:`mclstexp_lite.datasets.from_image`, at the predictor's
            spot layout, i.e. its training data's), or an AnnData from a loader (its spots
            are used; its counts are not read).
        um_per_px, tissue_mask, name, max_spots, max_tissue_mm
            Passed to :func:`~mclstexp_lite.datasets.from_image` for an image.
        cache_dir
            Patch cache directory (default: the package's).

        A model trained with input options (:mod:`mclstexp_lite._inputs`) gets them here
        too: per-section feature statistics and neighbourhoods come from the spots of
        ``section`` (all of them, so predict a whole slide at once), a wide view is cut
        from its image.

        Returns
        -------
        anndata.AnnData
            Predicted expression (float32, the predictor's genes), the section's spots,
            ``obsm['spatial']`` and ``uns['spatial']`` (plots on the H&E with
            ``ml.pl.spots_on_tissue``), ``uns['mclstexp_prediction']`` (how it was made: the
            keys :func:`mclstexp_lite.tl.predict_section` records, through the same path
            :func:`mclstexp_lite.tl.predict_spots`, plus :data:`PREDICTOR_KEYS`:
            ``predictor_created`` and ``ood_score``: the slide's patches' distance to the
            reference images over
            the reference's own; above ``ood_threshold`` a warning says that the slide is
            unlike the training data, e.g. another tissue, species or stain, and the
            prediction is not to be trusted).
        """
        import anndata as ad

        if isinstance(section, ad.AnnData):
            adata = section
            if um_per_px is not None or tissue_mask is not None:
                raise ValueError("um_per_px= and tissue_mask= apply to an image path; an "
                                 "AnnData section already has its scale and spots")
        else:
            limits = {k: v for k, v in (("max_spots", max_spots),
                                        ("max_tissue_mm", max_tissue_mm)) if v is not None}
            adata = ds.from_image(section, um_per_px=um_per_px, tissue_mask=tissue_mask,
                                  section=name, spot_pitch_um=self.info["spot_pitch_um"],
                                  spot_diameter_um=self.info["spot_diameter_um"],
                                  grid=self.info["grid"], **limits)
        spatial = adata.uns.get("spatial") or {}
        if len(spatial) != 1:
            raise ValueError(f"the section must hold one library in uns['spatial'], found "
                             f"{len(spatial)}; load it with mclstexp_lite.datasets")
        lib = str(next(iter(spatial)))
        data = SpotData.from_anndata({lib: adata[:, []] if adata.n_vars else adata},
                                     patch_um=self.info["patch_um"],
                                     patch_size=self.info["patch_size"],
                                     cache_dir=cache_dir, progress=progress)
        out, emb = tl.predict_spots(
            self.model, self.bank, adata, test_data=data, top_k=int(self.info["top_k"]),
            metric=str(self.info["metric"]), device=device, progress=progress,
            info={"predictor_created": str(self.info.get("created", ""))},
            return_image_emb=True)
        record = out.uns[tl.PREDICTION_KEY]
        score = self.ood_score(emb)
        if score is not None:
            threshold = float(self.info.get("ood_threshold", OOD_THRESHOLD))
            record.update(ood_score=round(score, 4), ood_threshold=threshold)
            if score > threshold:
                warnings.warn(
                    f"{lib}: this slide looks unlike the predictor's training data: its "
                    f"patches lie {score:.2f} times as far from the reference images as the "
                    f"reference sections lie from each other (above {threshold:g}; "
                    f"{', '.join(self.info['reference_sections'])}). Another tissue, "
                    "species, stain or scanner, or a wrong um_per_px, gives this; the "
                    "predicted expression is then not to be trusted. Check the slide, its "
                    "scale, and try ml.stain to match its colours to the training sections.",
                    UserWarning, stacklevel=2)
        return out

    @property
    def bank(self) -> tl.ReferenceBank:
        """The reference bank retrieval looks up (:class:`mclstexp_lite.tl.ReferenceBank`)."""
        return tl.ReferenceBank(emb=self.reference_emb, expr=self.reference_expr,
                                genes=list(self.genes),
                                sections=list(self.info["reference_sections"]),
                                n_spots=list(self.info["reference_n_spots"]))

    def ood_score(self, image_emb) -> float | None:
        """How unlike the training data a slide's patches are: the median over its
        patches of the mean cosine distance to their :data:`OOD_K` nearest reference
        image embeddings, over the same measure of the reference sections to each other
        (``info['ood_reference_distance']``). About 1 for a slide like the training
        sections; ``None`` for a predictor built without the reference images."""
        bank = self.reference_image_emb
        ref = self.info.get("ood_reference_distance")
        if bank is None or not ref:
            return None
        d = _knn_cosine_distance(np.asarray(image_emb, dtype=np.float32), bank,
                                 int(self.info.get("ood_k", OOD_K)))
        return float(np.median(d) / float(ref))


def _knn_cosine_distance(query: np.ndarray, bank: np.ndarray, k: int,
                         exclude: np.ndarray | None = None, groups_q=None, groups_b=None
                         ) -> np.ndarray:
    """Mean cosine distance of each query row to its ``k`` nearest rows of ``bank``;
    with ``groups_q``/``groups_b`` only bank rows of another group count."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    b = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), 1024):
        sim = q[start:start + 1024] @ b.T
        if groups_q is not None:
            sim[groups_q[start:start + 1024, None] == groups_b[None, :]] = -np.inf
        kk = min(k, sim.shape[1])
        top = -np.partition(-sim, kk - 1, axis=1)[:, :kk]
        top = np.where(np.isfinite(top), top, np.nan)
        out[start:start + 1024] = 1.0 - np.nanmean(top, axis=1)
    return out


def _reference_layout(reference, spot_pitch_um, spot_diameter_um, grid):
    """The spot layout to lay over new slides: the arguments given, else the training
    sections' (``SpotData.layouts``), else legacy ST 1k."""
    given = {k: v for k, v in (("spot_pitch_um", spot_pitch_um),
                               ("spot_diameter_um", spot_diameter_um), ("grid", grid))
             if v is not None}
    layouts = [dict(x) for x in (getattr(reference, "layouts", None) or [])]
    if len(given) == 3 or not layouts:
        out = {"spot_pitch_um": ds.LEGACY_ST_PITCH_UM,
               "spot_diameter_um": ds.LEGACY_ST_SPOT_DIAMETER_UM, "grid": "square", "array": ""}
        out.update(given)
        out["layout_from"] = ("given" if len(given) == 3 else
                              "legacy ST 1k (default; the reference records no layout)")
        return out
    keys = ("spot_pitch_um", "spot_diameter_um", "grid")
    distinct = {tuple(x[k] for k in keys) for x in layouts}
    if len(distinct) > 1 and len(given) < 3:
        names = ", ".join(f"{s}: {x['grid']} {x['spot_pitch_um']:g} um"
                          for s, x in zip(reference.sections, layouts))
        raise ValueError(
            f"the reference sections have different spot layouts ({names}); a predictor "
            "lays one layout over new slides: pass spot_pitch_um=, spot_diameter_um= and "
            "grid= (e.g. the layout of the slides you will predict).")
    out = dict(layouts[0])
    out.update(given)
    out["layout_from"] = "the reference sections' metadata" + (
        f" (overridden: {', '.join(given)})" if given else "")
    return out


def build_predictor(model, reference, *, top_k: int = 50, metric: str = "l1",
                    patch_um: float = pt.DEFAULT_PATCH_UM, patch_size: int = 224,
                    spot_pitch_um: float | None = None,
                    spot_diameter_um: float | None = None,
                    grid: str | None = None, train_config=None, reference_emb=None,
                    reference_image_emb=None, device="auto") -> Predictor:
    """Bundle a trained model with its reference bank.

    Parameters
    ----------
    model
        The trained :class:`mclstexp_lite.models.MclSTExp`.
    reference
        :class:`mclstexp_lite.train.SpotData` of the sections it was trained on (their
        expression is what predictions average).
    top_k, metric
        Retrieval settings used by :meth:`Predictor.predict` (the tutorials' quick
        profile: 50, ``"l1"``; the paper: 200).
    patch_um, patch_size
        How patches were cut for training (the defaults are the package's).
    spot_pitch_um, spot_diameter_um, grid
        The spot layout laid over new slides. Default: the training data's, from the
        reference sections' metadata (``SpotData.layouts``: a 2k array's checkerboard, a
        Visium slide's hexagons, ...); legacy ST 1k (200, 100, ``"square"``) when the
        reference records none. Sections of different layouts need them given.
    train_config
        Optional :class:`mclstexp_lite.train.TrainConfig`, stored for provenance.
    reference_emb
        Precomputed reference embeddings (e.g. from a cross-validation fold); default
        computed with :func:`mclstexp_lite.tl.embed_reference`.
    reference_image_emb
        Precomputed image embeddings of the reference spots (for the out-of-distribution
        check); default computed with :func:`mclstexp_lite.train.embed_images` (the
        frozen encoder's cached features, or the pixels). ``False`` leaves the check out.

    Raises
    ------
    ValueError
        The model and the reference do not belong together: another number of genes, or
        (when the model knows its genes, e.g. read from a checkpoint) other genes or the
        same genes in another order; sections of different spot layouts without a
        layout given; an unknown grid.
    """
    if not isinstance(reference, SpotData):
        raise TypeError(f"reference must be a mclstexp_lite.train.SpotData, got "
                        f"{type(reference).__name__}; build it with SpotData.from_anndata")
    tl.check_model_reference(model, reference)
    layout = _reference_layout(reference, spot_pitch_um, spot_diameter_um, grid)
    if layout["grid"] not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS} (legacy ST 1k, legacy ST 2k, Visium), "
                         f"got {layout['grid']!r}")
    if reference_emb is None:
        reference_emb = tl.embed_reference(model, reference, device=device)
    ood = {}
    if reference_image_emb is not False:
        if reference_image_emb is None:
            reference_image_emb = embed_images(model, reference, device=resolve_device(device),
                                               progress=False)
        img = np.asarray(reference_image_emb, dtype=np.float32)
        if img.shape != (len(reference), np.asarray(reference_emb).shape[1]):
            raise ValueError(f"reference_image_emb must have shape ({len(reference)}, "
                             f"{np.asarray(reference_emb).shape[1]}), got {img.shape}")
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(img), size=min(OOD_BANK, len(img)), replace=False))
        bank, groups = img[pick], np.asarray(reference.groups)[pick]
        several = len(np.unique(groups)) > 1
        d = _knn_cosine_distance(bank, bank, OOD_K + (0 if several else 1),
                                 groups_q=groups if several else None,
                                 groups_b=groups if several else None)
        ood = {"ood_k": OOD_K, "ood_reference_distance": float(np.median(d)),
               "ood_calibration": "each reference spot to the other sections' spots"
               if several else "each reference spot to its own section (one section)",
               "ood_threshold": OOD_THRESHOLD}
        reference_image_emb = bank
    else:
        reference_image_emb = None
    sizes = np.bincount(reference.groups, minlength=len(reference.sections))
    info = {
        "reference_sections": [str(s) for s in reference.sections],
        "reference_n_spots": [int(n) for n in sizes],
        "top_k": int(top_k),
        "metric": str(metric),
        "patch_um": float(patch_um),
        "patch_size": int(patch_size),
        "spot_pitch_um": float(layout["spot_pitch_um"]),
        "spot_diameter_um": float(layout["spot_diameter_um"]),
        "grid": str(layout["grid"]),
        "array": str(layout.get("array", "")),
        "layout_from": str(layout["layout_from"]),
        **ood,
        "train_config": train_config.to_dict() if hasattr(train_config, "to_dict") else train_config,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    model = model.cpu().eval()
    # what retrieval averages: the expression the model reads (per-section centred for
    # expr_norm="center", mclstexp_lite._inputs), so the file needs nothing else
    bank = model_expression(model, reference)
    return Predictor(model=model, reference_emb=np.asarray(reference_emb, dtype=np.float32),
                     reference_expr=np.asarray(bank, dtype=np.float32),
                     genes=[str(g) for g in reference.genes], info=info,
                     reference_image_emb=reference_image_emb)


def save_predictor(predictor: Predictor, path, *, overwrite: bool = False) -> Path:
    """Write ``predictor`` to one file (atomically; an existing file needs ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace "
                              "it, or choose another name.")
    model = predictor.model
    payload = {
        "format": FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model.config),
        "preprocessing": model.preprocessing,
        "encoder_fingerprint": model.image_encoder.fingerprint(),
        "reference_emb": torch.from_numpy(np.ascontiguousarray(predictor.reference_emb)),
        "reference_expr": torch.from_numpy(np.ascontiguousarray(predictor.reference_expr)),
        "genes": list(predictor.genes),
        "info": dict(predictor.info),
    }
    if predictor.reference_image_emb is not None:
        payload["reference_image_emb"] = torch.from_numpy(
            np.ascontiguousarray(predictor.reference_image_emb, dtype=np.float32))
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_predictor(path, *, map_location="cpu") -> Predictor:
    """Read a predictor file safely (``weights_only=True``) and check it is whole.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a predictor (e.g. a training checkpoint: the message says how to turn one into
        a predictor), an unknown format, or parts that do not belong together (the image
        encoder's weights differ from those the reference was embedded with, gene or
        embedding counts differ).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no predictor file at {path}")
    obj = _util.torch_load_plain(path, what="predictor", map_location=map_location,
                                 fix="It is truncated or not a predictor file; write it again "
                                     "with predict.save_predictor (or copy it again)")
    if isinstance(obj, dict) and "format" not in obj and {"model", "config", "epoch"} <= set(obj):
        raise ValueError(
            f"{path} is a training checkpoint, not a predictor: it has no reference bank. "
            "Build one with predict.build_predictor(train.load_model(path), "
            "reference) and save it with predict.save_predictor.")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a {FORMAT} file (format: {found!r}); write it with "
                         "this package's predict.save_predictor")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"{path}: predictor file lacks {missing}; write it again")
    model = load_model(obj)
    fp = model.image_encoder.fingerprint()
    if fp != obj["encoder_fingerprint"]:
        raise ValueError(
            f"{path}: the image encoder's weights (sha256 {fp[:12]}...) are not those the "
            f"reference bank was embedded with ({str(obj['encoder_fingerprint'])[:12]}...); "
            "the file was edited or assembled from different models. Build it again with "
            "predict.build_predictor.")
    img = obj.get("reference_image_emb")
    return Predictor(model=model, reference_emb=obj["reference_emb"].numpy(),
                     reference_expr=obj["reference_expr"].numpy(),
                     genes=[str(g) for g in obj["genes"]], info=dict(obj["info"]),
                     reference_image_emb=img.numpy() if img is not None else None)


def nearest_spots(pred, target, *, max_distance_um: float | None = None):
    """Predictions of ``pred``'s spots at the spots of ``target`` (same image frame).

    Each spot of ``target`` (e.g. the measured spots of a section whose image was
    predicted on virtual spots) takes the prediction of the nearest spot of ``pred``;
    spots with none within ``max_distance_um`` (default: half the predicted spot pitch)
    are dropped.

    Returns
    -------
    anndata.AnnData
        ``pred``'s genes at the kept spots of ``target`` (``obs``, ``obsm`` and
        ``uns['spatial']`` of ``target``), ``obs['distance_um']`` to the spot used.
    """
    from scipy.spatial import cKDTree

    meta = next(iter(pred.uns["spatial"].values()))["metadata"]
    tmeta = next(iter(target.uns["spatial"].values()))["metadata"]
    if meta.get("source_image_sha256") and tmeta.get("source_image_sha256") and \
            meta["source_image_sha256"] != tmeta["source_image_sha256"]:
        raise ValueError("pred and target are on different images (source_image_sha256 "
                         "differs); their pixel coordinates cannot be matched")
    um = float(meta["um_per_px"])
    limit = float(max_distance_um if max_distance_um is not None
                  else float(meta.get("spot_pitch_um", ds.LEGACY_ST_PITCH_UM)) / 2)
    dist, idx = cKDTree(np.asarray(pred.obsm["spatial"])).query(np.asarray(target.obsm["spatial"]))
    dist_um = dist * um
    keep = dist_um <= limit
    out = tl.prediction_anndata(np.asarray(pred.X)[idx[keep]], target[keep],
                                info=dict(pred.uns.get(tl.PREDICTION_KEY, {})),
                                genes=list(pred.var_names))
    out.obs["distance_um"] = dist_um[keep].astype(np.float32)
    return out


def predict_image(predictor, image, *, um_per_px: float | None = None, out=None,
                  overwrite: bool = False, figure=None, genes: Sequence[str] | None = None,
                  tissue_mask=None, name: str | None = None, device="auto",
                  progress: bool = True, cache_dir=None, max_spots: int | None = None,
                  max_tissue_mm: float | None = None):
    """One call from an H&E image to predicted expression (and a figure).

    Parameters
    ----------
    predictor
        A :class:`Predictor` or the path of a predictor file.
    image, um_per_px, tissue_mask, name, max_spots, max_tissue_mm
        The slide (see :func:`mclstexp_lite.datasets.from_image`): a file path or an
        ``(H, W, 3)`` uint8 NumPy array (then ``um_per_px`` is needed).
    out
        Optional ``.h5ad`` path for the prediction (written atomically; an existing file
        needs ``overwrite``).
    figure, genes
        Optional ``.png`` path for :func:`mclstexp_lite.pl.prediction_maps` of ``genes``.

    Returns
    -------
    anndata.AnnData
        With ``uns['mclstexp_prediction']['ood_score']``: a warning fires when the slide
        is unlike the training data (:meth:`Predictor.predict`).
    """
    if isinstance(image, np.ndarray):
        if um_per_px is None:
            raise ValueError("an image given as a NumPy array states no pixel size; pass "
                             "um_per_px= (microns per pixel of the array).")
    elif not isinstance(image, (str, Path)) and not hasattr(image, "__fspath__"):
        raise TypeError(f"image must be a file path or an (H, W, 3) uint8 NumPy array, got "
                        f"{type(image).__name__}")
    for target in (out, figure):
        if target is not None and Path(target).exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) or "
                                  "choose another name.")
    if out is not None and not str(out).endswith(".h5ad"):
        raise ValueError(f"out must end in .h5ad, got {out}")
    if not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor)
    unknown = [g for g in (genes or []) if g not in set(predictor.genes)]
    if unknown:
        raise ValueError(f"genes {unknown} are not among the predictor's {len(predictor.genes)} "
                         f"genes (e.g. {predictor.genes[:5]}); choose genes of its panel")
    pred = predictor.predict(image, um_per_px=um_per_px, tissue_mask=tissue_mask, name=name,
                             device=device, progress=progress, cache_dir=cache_dir,
                             max_spots=max_spots, max_tissue_mm=max_tissue_mm)
    if figure is not None:
        import matplotlib.pyplot as plt

        fig = prediction_maps(pred, genes)
        atomic_write(figure, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"),
                        suffix=Path(figure).suffix or ".png")
        plt.close(fig)
    if out is not None:
        atomic_write_h5ad(pred, out)
    return pred


#: Python parameter names in messages, and the command-line flags that set them.
_CLI_FLAGS = {"um_per_px": "--um-per-px", "tissue_mask": "--mask", "max_spots": "--max-spots",
              "max_tissue_mm": "--max-tissue-mm"}


def _cli_message(text: str) -> str:
    """A library message with the Python parameters it names (``um_per_px=0.5``,
    ``pass tissue_mask=``, ``overwrite=True``) written as the flags that set them."""
    import re

    text = text.replace("overwrite=True (--overwrite)", "--overwrite").replace(
        "overwrite=True", "--overwrite")
    for py, flag in _CLI_FLAGS.items():
        text = re.sub(rf"\b{py}=(?=-?[0-9])", flag + " ", text)  # um_per_px=0.5
        text = re.sub(rf"\b{py}=?(?![A-Za-z_])", flag, text)      # pass um_per_px=
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mclstexp_lite.predict",
        description="Predict spatial gene expression from an H&E image with a saved "
                    "predictor (predict.save_predictor). Writes the prediction (.h5ad) and "
                    "a figure of predicted maps on the tissue (.png beside it). Virtual spots "
                    "are laid like the predictor's training data (its array layout). A slide "
                    "unlike the training data (another tissue, species or stain, or a wrong "
                    "--um-per-px) gets a warning: its patches lie far from the reference "
                    "images (ood_score in the .h5ad), and its prediction is not to be trusted.")
    ap.add_argument("--model", required=True, help="predictor file (.pt)")
    ap.add_argument("--image", required=True, help="H&E image: TIFF (pyramidal or not), JPEG, PNG")
    ap.add_argument("--um-per-px", type=float, default=None,
                    help="microns per pixel of the image (default: what the TIFF states)")
    ap.add_argument("--out", required=True, help="output .h5ad")
    ap.add_argument("--figure", default=None, help="output figure (default: OUT with .png)")
    ap.add_argument("--genes", nargs="*", default=None,
                    help="genes to draw (default: the 4 most variable predictions)")
    ap.add_argument("--mask", default=None, help="tissue mask image (non-zero = tissue)")
    ap.add_argument("--name", default=None, help="section name (default: the image's stem)")
    ap.add_argument("--max-spots", type=int, default=None,
                    help=f"most virtual spots allowed (default {ds.MAX_VIRTUAL_SPOTS:,})")
    ap.add_argument("--max-tissue-mm", type=float, default=None,
                    help=f"widest tissue allowed, mm (default {ds.MAX_TISSUE_MM:g})")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    figure = args.figure or str(Path(args.out).with_suffix(".png"))
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", UserWarning)
            pred = predict_image(args.model, args.image, um_per_px=args.um_per_px,
                                 out=args.out, overwrite=args.overwrite, figure=figure,
                                 genes=args.genes, tissue_mask=args.mask, name=args.name,
                                 device=args.device, progress=not args.no_progress,
                                 max_spots=args.max_spots, max_tissue_mm=args.max_tissue_mm)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as exc:
        for w in said:
            if issubclass(w.category, UserWarning):
                print(f"warning: {_cli_message(str(w.message))}", file=sys.stderr)
        print(f"error: {_cli_message(str(exc))}", file=sys.stderr)
        return 2
    for w in said:
        if issubclass(w.category, UserWarning):
            print(f"warning: {_cli_message(str(w.message))}", file=sys.stderr)
    print(f"predicted {pred.n_vars} genes at {pred.n_obs} spots -> {args.out}; figure {figure}")
    return 0


#: Former name of :func:`mclstexp_lite.pl.prediction_maps` (a figure: it lives in ``pl``;
#: warns once, then calls it).
plot_prediction = _util.deprecated_alias(prediction_maps, "predict.plot_prediction",
                                         "pl.prediction_maps")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
