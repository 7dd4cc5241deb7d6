"""The spots a model trains on or retrieves from: :class:`SpotData`.

Cached uint8 patches (one memory-mapped array per section, from the patch cache of
:mod:`mclstexp_lite.patches`) plus expression, array positions and section ids, all
sections stacked in order. Built from prepared AnnData with
:meth:`SpotData.from_anndata`, which warns when the expression looks like raw counts.
Re-exported by :mod:`mclstexp_lite.train`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import patches as pt
from ._util import to_dense
from ._augment import to_torch_batch

__all__ = ["SpotData"]


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
    layouts
        Optional: the spot layout of each section (``spot_pitch_um``,
        ``spot_diameter_um``, ``grid``, ``array``), from its metadata
        (:func:`section_layout`); a predictor lays virtual spots like its training data's.
    coords_um
        Optional ``(N, 2)`` spot centres in microns (image pixels times the image's
        ``um_per_px``), for neighbourhoods (:mod:`mclstexp_lite._inputs`);
        :meth:`from_anndata` fills it.
    sources, geometry
        Optional: the section AnnData (one per section) and how their patches were cut
        (``patch_um``, ``patch_size``, ``stain``, ``cache_dir``), so that other crops of
        the same spots can be cut later (:meth:`wide_patches`); :meth:`from_anndata`
        fills them.
    """

    patches: list
    expr: np.ndarray
    pos: np.ndarray
    groups: np.ndarray
    sections: list[str]
    genes: list[str]
    obs_names: list[str]
    layouts: list | None = None
    coords_um: np.ndarray | None = None
    sources: list | None = None
    geometry: dict | None = None

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
        if self.coords_um is not None:
            c = np.asarray(self.coords_um, dtype=np.float64)
            if c.shape != (n, 2) or not np.isfinite(c).all():
                raise ValueError(f"SpotData: coords_um must be finite (N, 2) = ({n}, 2) "
                                 f"spot centres in microns, got shape {c.shape}")
            self.coords_um = c
        if self.sources is not None and len(self.sources) != len(self.sections):
            raise ValueError("SpotData: one source AnnData per section (sources), or None")
        self._wide: dict = {}
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
        fitted :class:`mclstexp_lite.patches.StainNormalizer` applied to every section's
        patches (their own patch-cache entries, so the frozen features differ too; fit
        it on the training sections, :func:`mclstexp_lite.patches.fit_on_sections`).
        """
        items = list(adatas.items()) if isinstance(adatas, Mapping) else [
            (str(a.obs["section"].iloc[0]), a) for a in adatas]
        if not items:
            raise ValueError("SpotData.from_anndata: no sections given")
        genes = list(items[0][1].var_names)
        patches, exprs, poss, groups, names, layouts, coords = [], [], [], [], [], [], []
        for gi, (name, a) in enumerate(items):
            if list(a.var_names) != genes:
                raise ValueError(f"section {name}: genes differ from section {items[0][0]}; "
                                 "subset every section to one panel first (pp.prepare)")
            X = to_dense(a.layers[layer] if layer else a.X)
            _warn_if_raw_counts(X, name)
            patches.append(pt.patch_cache(a, patch_um=patch_um, out_size=patch_size,
                                          cache_dir=cache_dir, progress=progress, stain=stain))
            exprs.append(X.astype(np.float32))
            poss.append(a.obs[["array_x", "array_y"]].to_numpy(np.int64))
            groups.append(np.full(a.n_obs, gi, dtype=np.int64))
            names.extend(a.obs_names)
            layouts.append(section_layout(a))
            coords.append(_coords_um(a))
        return cls(patches=patches, expr=np.concatenate(exprs), pos=np.concatenate(poss),
                   groups=np.concatenate(groups), sections=[n for n, _ in items], genes=genes,
                   obs_names=list(names), layouts=layouts,
                   coords_um=(np.concatenate(coords) if all(c is not None for c in coords)
                              else None),
                   sources=[a for _, a in items],
                   geometry={"patch_um": float(patch_um), "patch_size": int(patch_size),
                             "stain": stain, "cache_dir": cache_dir})

    def wide_patches(self, factor: float, *, progress: bool = False) -> list:
        """Crops ``factor`` times as wide as the patches, same centres and output size.

        One uint8 array per section from the patch cache (cut once per section and
        factor, cached on disk like the patches; with the same stain normalisation), for
        the wide field of view of :mod:`mclstexp_lite._inputs`. Needs the sections the
        data was built from (:meth:`from_anndata`).
        """
        factor = float(factor)
        if factor in self._wide:
            return self._wide[factor]
        if self.sources is None or self.geometry is None:
            raise ValueError("SpotData: a wide view needs the sections' images, which this "
                             "SpotData does not know; build it with SpotData.from_anndata")
        g = self.geometry
        out = [pt.patch_cache(a if getattr(a, "is_view", False) else a[:, []],
                              patch_um=g["patch_um"] * factor, out_size=g["patch_size"],
                              cache_dir=g["cache_dir"], progress=progress, stain=g["stain"])
               for a in self.sources]
        self._wide[factor] = out
        return out

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
            return to_torch_batch(self.patches[s], idx - self._offsets[s], device=device)
        out = None
        for s in sections:
            sel = np.nonzero(g == s)[0]
            part = to_torch_batch(self.patches[s], idx[sel] - self._offsets[s], device=device)
            if out is None:
                out = torch.empty((len(idx),) + tuple(part.shape[1:]), dtype=torch.uint8,
                                  device=part.device, memory_format=memory_format)
            out[torch.as_tensor(sel, device=part.device)] = part
        return out


def section_layout(adata) -> dict:
    """The spot layout of a section, from ``uns['spatial'][lib]['metadata']``:
    ``spot_pitch_um`` (same-row neighbours), ``spot_diameter_um``, ``grid`` (``square``,
    ``checkerboard``, ``hex``) and ``array`` (``1k``, ``2k``, ``visium`` or ``""``).
    Sections written before the layout was recorded: a 100 um pitch is Visium's hex grid,
    anything else a square grid; the diameter half the pitch unless stated."""
    spatial = adata.uns.get("spatial") or {}
    meta = dict(next(iter(spatial.values())).get("metadata") or {}) if len(spatial) == 1 else {}
    pitch = float(meta.get("spot_pitch_um") or 200.0)
    grid = str(meta.get("grid") or ("hex" if pitch == 100.0 else "square"))
    diameter = meta.get("spot_diameter_um")
    if not diameter:
        diameter = {"hex": 55.0}.get(grid, pitch / 2)
    return {"spot_pitch_um": pitch, "spot_diameter_um": float(diameter), "grid": grid,
            "array": str(meta.get("array") or "")}


def _coords_um(adata) -> np.ndarray | None:
    """Spot centres in microns (``obsm['spatial']`` times the image's ``um_per_px``), or
    ``None`` when the section does not say its scale."""
    try:
        meta = next(iter(adata.uns["spatial"].values()))["metadata"]
        um = float(meta["um_per_px"])
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    except (KeyError, TypeError, StopIteration, ValueError, AttributeError):
        return None
    if not (np.isfinite(um) and um > 0) or xy.shape != (adata.n_obs, 2):
        return None
    return xy * um


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
