"""Stain normalisation of H&E patches (Macenko or Reinhard, through ``torchstain``).

Slides from another lab, scanner or file format differ in colour even when the tissue is
the same. A stain normaliser maps every patch towards the colour of a set of *reference*
patches, normally the patches of the training sections, before the image encoder sees
it. The colour transforms themselves are those of the ``torchstain`` package (its NumPy
backend); this module adds what the package needs around them:

- **fitting on many patches.** :meth:`StainNormalizer.fit` pools the pixels of many
  reference patches (not one image) and fits once; :func:`reference_patches` picks
  those patches deterministically from the patch cache of the reference sections, and
  :func:`fit_on_sections` does both.
- **batches and awkward patches.** :meth:`StainNormalizer.transform` takes a ``uint8``
  ``(N, H, W, 3)`` array. Black pixels (the blacked-out background of HER2+ A1, padding)
  are never used for estimation and are left as they are; a patch with less than
  ``min_tissue`` stained tissue (glass, black background, an empty border patch), of a
  single flat colour, or on which the transform fails numerically is returned
  **unchanged**, and the counts are in :attr:`StainNormalizer.last_stats`.
- **identity.** :meth:`StainNormalizer.to_dict` / :meth:`StainNormalizer.from_dict`
  serialise a fitted normaliser to plain numbers, and :attr:`StainNormalizer.fingerprint`
  (12 hex digits) names it in patch-cache keys
  (:func:`mclstexp_lite.patches.patch_cache` with ``stain=``), so normalised patches and
  the image features computed from them are cached apart from the unnormalised ones.

Methods
-------
``"macenko"`` (Macenko et al., ISBI 2009)
    Per patch: optical density ``OD = -log((I + 1) / io)``; pixels with every channel's
    OD at least ``beta`` are stained tissue; the two stain vectors (haematoxylin, eosin)
    are the ``alpha``-th and ``(100 - alpha)``-th percentile directions of those pixels
    in the plane of the two main eigenvectors; each pixel's stain concentrations are
    rescaled so that their 99th percentiles match the reference's and recombined with
    the reference stain vectors. Fitted values: the reference stain matrix (3 x 2) and
    the reference 99th-percentile concentrations (2).
``"reinhard"`` (Reinhard et al., 2001)
    Per patch: in LAB colour space each channel is standardised with the patch's own
    mean and standard deviation and rescaled to the reference's. Fitted values: the
    reference LAB means and standard deviations (3 + 3).

Both are *per patch*: every patch gets its own stain estimate, as torchstain computes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from ._progress import progress_bar
from ._patch_cache import patch_cache

__all__ = [
    "METHODS",
    "StainNormalizer",
    "fit_on_sections",
    "reference_patches",
    "tissue_fraction",
]

#: Names accepted by :class:`StainNormalizer` (``method=``).
METHODS = ("macenko", "reinhard")

#: Version of the :meth:`StainNormalizer.to_dict` layout; part of the fingerprint.
_DICT_FORMAT = 1


def _torchstain_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchstain")
    except Exception:  # pragma: no cover - not installed: caught where it is used
        return "unknown"


def _backend(method: str):
    try:
        import torchstain
    except ImportError as err:  # pragma: no cover - a pinned dependency
        raise ImportError(
            "Stain normalisation needs the package torchstain; install it with "
            "`pip install torchstain==1.4.1` (it is in requirements.txt)."
        ) from err
    if method == "macenko":
        return torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    return torchstain.normalizers.ReinhardNormalizer(backend="numpy")


# ------------------------------------------------------------------------- validation
def _check_method(method) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS} (stain normalisation), got {method!r}; "
            "e.g. StainNormalizer('macenko')."
        )
    return method.lower()


def _real(value, name: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        lb, hb = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lb}{low:g}, {high:g}{hb}, got {value:g}.")
    return value


def _check_patches(patches, name: str = "patches") -> np.ndarray:
    """``patches`` as a ``uint8`` ``(N, H, W, 3)`` array (memory maps are kept as they are)."""
    if not isinstance(patches, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy uint8 array of shape (N, H, W, 3), got "
            f"{type(patches).__name__}; e.g. the array from patches.patch_cache(adata), or "
            "np.stack([...]) of single (H, W, 3) patches."
        )
    if patches.ndim == 3 and patches.shape[-1] == 3:
        raise ValueError(
            f"{name} must have shape (N, H, W, 3), got one patch of shape {patches.shape}; "
            f"pass {name}[None] for a single patch."
        )
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape (N, H, W, 3) (RGB, channels last), got {patches.shape}; "
            "a (N, 3, H, W) array needs arr.transpose(0, 2, 3, 1) first."
        )
    if patches.dtype != np.uint8:
        raise TypeError(
            f"{name} must have dtype uint8 (0..255), got {patches.dtype}; convert with "
            "np.clip(arr, 0, 255).astype(np.uint8) (multiply by 255 first if it holds 0..1)."
        )
    return patches


# ------------------------------------------------------------------------- tissue
def _tissue_mask(px: np.ndarray, *, io: float, beta: float, black_level: int):
    """``(non_black, tissue)`` boolean masks of ``(M, 3)`` uint8 pixels.

    ``non_black``: the brightest channel reaches ``black_level``. ``tissue``: non-black
    and every channel's optical density ``-log((I + 1) / io)`` at least ``beta``, the
    pixels Macenko's method estimates stains from.
    """
    non_black = px.max(axis=1) >= black_level
    # OD >= beta  <=>  I + 1 <= io * exp(-beta): compare intensities, no logarithms.
    limit = io * math.exp(-beta) - 1.0
    tissue = non_black & (px.max(axis=1) <= limit)
    return non_black, tissue


def tissue_fraction(patches, *, io: float = 240.0, beta: float = 0.15, black_level: int = 30,
                    stride: int = 1) -> np.ndarray:
    """Share of each patch's pixels that are stained tissue (see :class:`StainNormalizer`).

    Parameters
    ----------
    patches
        ``uint8`` ``(N, H, W, 3)``.
    io, beta, black_level
        As in :class:`StainNormalizer`.
    stride
        Look at every ``stride``-th pixel along each axis only (faster; 1 = all).

    Returns
    -------
    numpy.ndarray
        ``float64`` ``(N,)`` in [0, 1].
    """
    patches = _check_patches(patches)
    stride = int(stride)
    out = np.empty(len(patches))
    for i in range(len(patches)):
        px = np.asarray(patches[i, ::stride, ::stride]).reshape(-1, 3)
        out[i] = _tissue_mask(px, io=io, beta=beta, black_level=black_level)[1].mean()
    return out


# ------------------------------------------------------------------------- normaliser
class StainNormalizer:
    """Macenko or Reinhard stain normalisation of ``uint8`` H&E patches.

    Parameters
    ----------
    method
        ``"macenko"`` or ``"reinhard"`` (module docstring).
    io
        Transmitted light intensity, the brightness of empty glass, for the optical
        density (Macenko; also the tissue test of both methods). torchstain's default 240.
    alpha
        Percentile (0-50, exclusive) of the stain-vector angles (Macenko). Default 1.
    beta
        Optical-density threshold of a stained pixel. Default 0.15.
    black_level
        Pixels whose brightest channel is below this (0-255) are black background or
        padding: excluded from every estimate and never changed. Default 30 (the
        blacked-out background of HER2+ A1 is 0; the edge of a resized crop is darker).
    min_tissue
        Patches whose share of stained tissue pixels is below this are returned
        unchanged. Default 0.05 (about 2,500 pixels of a 224 px patch).

    Attributes
    ----------
    last_stats : dict
        Counts of the last :meth:`transform`: ``n``, ``normalised``, ``low_tissue``
        (unchanged: too little tissue), ``failed`` (unchanged: a flat colour, every
        channel's sd below one grey level, on which both transforms are undefined, or
        the transform raised a numerical error).
    reference : dict
        What the normaliser was fitted on (free-form description, numbers of patches and
        pixels); not part of :attr:`fingerprint`.

    Examples
    --------
    Synthetic patches (random pink/purple noise, not tissue):

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.integers([120, 60, 140], [200, 140, 220], (4, 32, 32, 3)).astype(np.uint8)
    >>> norm = StainNormalizer("reinhard").fit(ref)
    >>> norm.transform(ref).shape, len(norm.fingerprint)
    ((4, 32, 32, 3), 12)
    >>> StainNormalizer.from_dict(norm.to_dict()).fingerprint == norm.fingerprint
    True
    """

    def __init__(self, method: str = "macenko", *, io: float = 240.0, alpha: float = 1.0,
                 beta: float = 0.15, black_level: int = 30, min_tissue: float = 0.05):
        self.method = _check_method(method)
        self.io = _real(io, "io", 1.0, 1e4)
        self.alpha = _real(alpha, "alpha", 0.0, 50.0, low_open=True, high_open=True)
        self.beta = _real(beta, "beta", 0.0, 5.0, low_open=True)
        if isinstance(black_level, bool) or not isinstance(black_level, numbers.Integral) \
                or not 0 <= black_level <= 255:
            raise ValueError(f"black_level must be an integer 0..255, got {black_level!r}.")
        self.black_level = int(black_level)
        self.min_tissue = _real(min_tissue, "min_tissue", 0.0, 1.0, high_open=True)
        self._impl = _backend(self.method)
        self._fitted: dict | None = None
        self.reference: dict = {}
        self.last_stats: dict = {}

    # ---------------------------------------------------------------- state
    @property
    def is_fitted(self) -> bool:
        return self._fitted is not None

    def settings(self) -> dict:
        return {"io": self.io, "alpha": self.alpha, "beta": self.beta,
                "black_level": self.black_level, "min_tissue": self.min_tissue}

    def _require_fitted(self, what: str):
        if self._fitted is None:
            raise RuntimeError(
                f"StainNormalizer({self.method!r}) is not fitted, so it cannot {what}; call "
                ".fit(reference_patches) (or stain.fit_on_sections(...)) first, or load a "
                "fitted one with StainNormalizer.from_dict(d)."
            )

    def _set_fitted(self, fitted: dict) -> None:
        if self.method == "macenko":
            he = np.asarray(fitted["stain_matrix"], dtype=np.float64)
            maxc = np.asarray(fitted["max_concentrations"], dtype=np.float64)
            if he.shape != (3, 2) or maxc.shape != (2,) or not (np.isfinite(he).all() and np.isfinite(maxc).all()) \
                    or (maxc <= 0).any():
                raise ValueError(
                    "Macenko fit is unusable: stain_matrix must be finite 3 x 2 and "
                    f"max_concentrations 2 positive numbers, got {he.tolist()} and {maxc.tolist()}; "
                    "fit on patches with more stained tissue."
                )
            self._impl.HERef, self._impl.maxCRef = he, maxc
            self._fitted = {"stain_matrix": he.tolist(), "max_concentrations": maxc.tolist()}
        else:
            means = np.asarray(fitted["lab_means"], dtype=np.float64)
            stds = np.asarray(fitted["lab_stds"], dtype=np.float64)
            if means.shape != (3,) or stds.shape != (3,) or not (np.isfinite(means).all() and np.isfinite(stds).all()) \
                    or (stds <= 0).any():
                raise ValueError(
                    "Reinhard fit is unusable: lab_means and lab_stds must be 3 finite numbers "
                    f"each, the stds positive, got {means.tolist()} and {stds.tolist()}; fit on "
                    "patches that are not a single flat colour."
                )
            self._impl.target_means, self._impl.target_stds = means, stds
            self._fitted = {"lab_means": means.tolist(), "lab_stds": stds.tolist()}

    # ---------------------------------------------------------------- fit
    def fit(self, patches, *, description: str = "") -> "StainNormalizer":
        """Fit the reference colour on the pooled pixels of reference patches.

        Every non-black pixel of every patch enters one estimate (the patches are pooled,
        not averaged patch by patch). Pick the patches with :func:`reference_patches`.

        Parameters
        ----------
        patches
            ``uint8`` ``(N, H, W, 3)`` reference patches.
        description
            Free text stored in :attr:`reference` (what the patches are).

        Returns
        -------
        StainNormalizer
            ``self``, fitted.

        Raises
        ------
        ValueError
            If the patches hold fewer than 1,000 stained tissue pixels, or the fit gives
            non-finite values.
        """
        patches = _check_patches(patches)
        px = np.asarray(patches).reshape(-1, 3)
        non_black, tissue = _tissue_mask(px, io=self.io, beta=self.beta, black_level=self.black_level)
        n_tissue = int(tissue.sum())
        if n_tissue < 1000:
            raise ValueError(
                f"patches hold only {n_tissue} stained tissue pixels (optical density >= beta="
                f"{self.beta:g} in every channel, not black); fit the normaliser on patches "
                "under tissue, e.g. stain.reference_patches(...)."
            )
        sample = px[non_black][None]  # one (1, M, 3) "image" of the pooled pixels
        with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
            try:
                if self.method == "macenko":
                    self._impl.fit(sample, Io=self.io, alpha=self.alpha, beta=self.beta)
                    fitted = {"stain_matrix": self._impl.HERef, "max_concentrations": self._impl.maxCRef}
                else:
                    self._impl.fit(sample)
                    fitted = {"lab_means": self._impl.target_means, "lab_stds": self._impl.target_stds}
            except (FloatingPointError, np.linalg.LinAlgError) as err:
                raise ValueError(
                    f"The {self.method} fit failed on these patches ({err}); fit on patches "
                    "with more, and more varied, stained tissue."
                ) from err
        self._set_fitted(fitted)
        self.reference = {"description": str(description), "n_patches": int(len(patches)),
                          "n_pixels": int(non_black.sum()), "n_tissue_pixels": n_tissue}
        return self

    # ---------------------------------------------------------------- transform
    def _one(self, patch: np.ndarray) -> tuple[np.ndarray, str]:
        px = patch.reshape(-1, 3)
        non_black, tissue = _tissue_mask(px, io=self.io, beta=self.beta, black_level=self.black_level)
        if tissue.mean() < self.min_tissue or tissue.sum() < 2:
            return patch, "low_tissue"
        sample = px[non_black][None]
        if sample[0].std(axis=0).max() < 1.0:  # one flat colour: both transforms undefined
            return patch, "failed"
        try:
            with np.errstate(divide="raise", invalid="raise", over="ignore", under="ignore"):
                if self.method == "macenko":
                    out = self._impl.normalize(sample, Io=self.io, alpha=self.alpha,
                                               beta=self.beta, stains=False)[0]
                else:
                    out = self._impl.normalize(sample)
        except (FloatingPointError, np.linalg.LinAlgError, ValueError):
            return patch, "failed"
        result = px.copy()
        result[non_black] = out.reshape(-1, 3)
        return result.reshape(patch.shape), "normalised"

    def transform(self, patches, *, out=None, batch_size: int = 64, progress: bool = False):
        """Normalise a batch of patches.

        Parameters
        ----------
        patches
            ``uint8`` ``(N, H, W, 3)`` (e.g. a patch-cache memory map); read
            ``batch_size`` patches at a time.
        out
            Optional writable ``uint8`` array of the same shape to write into (e.g. a new
            memory-mapped cache file); default a new array.
        batch_size
            Patches read from ``patches`` at once.
        progress
            Show a tqdm progress bar.

        Returns
        -------
        numpy.ndarray
            ``uint8``, same shape: black pixels, and patches with too little tissue or on
            which the transform failed, unchanged (counts in :attr:`last_stats`).
        """
        self._require_fitted("transform patches")
        patches = _check_patches(patches)
        if out is None:
            out = np.empty(patches.shape, dtype=np.uint8)
        elif not isinstance(out, np.ndarray) or out.shape != patches.shape or out.dtype != np.uint8:
            raise ValueError(
                f"out must be a uint8 array of shape {patches.shape} (that of patches), got "
                f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}."
            )
        stats = {"n": int(len(patches)), "normalised": 0, "low_tissue": 0, "failed": 0}
        starts = range(0, len(patches), max(1, int(batch_size)))
        if progress:
            starts = progress_bar(starts, desc=f"stain ({self.method})", unit="batch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for start in starts:
                block = np.asarray(patches[start:start + batch_size])
                for j in range(len(block)):
                    out[start + j], kind = self._one(block[j])
                    stats[kind] += 1
        self.last_stats = stats
        return out

    __call__ = transform

    # ---------------------------------------------------------------- identity
    def to_dict(self) -> dict:
        """The fitted normaliser as plain JSON-able numbers and strings."""
        self._require_fitted("be serialised")
        return {"format": _DICT_FORMAT, "method": self.method, "settings": self.settings(),
                "fitted": json.loads(json.dumps(self._fitted)),
                "backend": f"torchstain {_torchstain_version()} (numpy)",
                "reference": dict(self.reference)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "StainNormalizer":
        """Rebuild a fitted normaliser from :meth:`to_dict`'s output."""
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a dict from StainNormalizer.to_dict(), got {type(d).__name__}.")
        missing = [k for k in ("format", "method", "settings", "fitted") if k not in d]
        if missing:
            raise ValueError(f"d lacks {missing}; pass the dict StainNormalizer.to_dict() returned.")
        if d["format"] != _DICT_FORMAT:
            raise ValueError(
                f"d has format {d['format']!r}, this version reads format {_DICT_FORMAT}; refit "
                "the normaliser with this version of the package."
            )
        settings = d["settings"]
        if not isinstance(settings, Mapping):
            raise ValueError("d['settings'] must be a dict of numbers (io, alpha, beta, black_level, min_tissue).")
        try:
            norm = cls(d["method"], **settings)
        except TypeError as err:
            raise ValueError(f"d['settings'] is invalid ({err}); pass the dict to_dict() returned.") from err
        try:
            norm._set_fitted(d["fitted"])
        except KeyError as err:
            raise ValueError(f"d['fitted'] lacks {err} for method {norm.method!r}.") from err
        norm.reference = dict(d.get("reference") or {})
        return norm

    @property
    def fingerprint(self) -> str:
        """12 hex digits naming what the transform does.

        A sha256 of the format, method, settings, fitted values and the installed
        torchstain version; not of :attr:`reference` (two fits with equal numbers are the
        same transform).
        """
        self._require_fitted("have a fingerprint")
        payload = {"format": _DICT_FORMAT, "method": self.method, "settings": self.settings(),
                   "fitted": self._fitted, "torchstain": _torchstain_version()}
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def __repr__(self) -> str:
        state = f"fitted {self.fingerprint}" if self.is_fitted else "not fitted"
        return f"StainNormalizer({self.method!r}, {state})"


# ------------------------------------------------------------------------- reference
def reference_patches(patch_arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray], *,
                      per_section: int = 16, min_tissue: float = 0.5, io: float = 240.0,
                      beta: float = 0.15, black_level: int = 30) -> np.ndarray:
    """Pick reference patches for :meth:`StainNormalizer.fit`, deterministically.

    From each section: the patches whose stained-tissue share (:func:`tissue_fraction`,
    every 4th pixel) is at least ``min_tissue`` are the candidates (if fewer than
    ``per_section`` qualify, the ``per_section`` patches with the most tissue, ties by
    row); ``per_section`` of them are taken evenly spaced in row (spot) order,
    ``np.linspace(0, n_candidates - 1, per_section)`` rounded. Every section contributes
    equally whatever its number of spots, and no randomness is involved: the same
    sections give the same patches.

    Parameters
    ----------
    patch_arrays
        ``{section: uint8 (N, H, W, 3)}`` or a list of such arrays (patch-cache entries).
    per_section
        Patches taken from each section (all of them if it has fewer).
    min_tissue
        Tissue share a candidate needs.
    io, beta, black_level
        The tissue test (:class:`StainNormalizer`).

    Returns
    -------
    numpy.ndarray
        ``uint8`` ``(n_sections * per_section, H, W, 3)`` (fewer for small sections).
    """
    arrays = list(patch_arrays.values()) if isinstance(patch_arrays, Mapping) else list(patch_arrays)
    if not arrays:
        raise ValueError("patch_arrays is empty; pass the patch arrays of the reference sections.")
    if isinstance(per_section, bool) or not isinstance(per_section, numbers.Integral) or per_section < 1:
        raise ValueError(f"per_section must be a positive integer, got {per_section!r}.")
    min_tissue = _real(min_tissue, "min_tissue", 0.0, 1.0)
    chosen = []
    shapes = set()
    for i, arr in enumerate(arrays):
        arr = _check_patches(arr, f"patch_arrays[{i}]")
        shapes.add(arr.shape[1:])
        frac = tissue_fraction(arr, io=io, beta=beta, black_level=black_level, stride=4)
        cand = np.flatnonzero(frac >= min_tissue)
        if len(cand) < per_section:
            cand = np.sort(np.argsort(-frac, kind="stable")[:per_section])
        rows = cand[np.unique(np.round(np.linspace(0, len(cand) - 1, min(per_section, len(cand)))).astype(int))]
        chosen.append(np.asarray(arr[rows]))
    if len(shapes) != 1:
        raise ValueError(f"patch_arrays hold patches of different sizes {sorted(shapes)}; use one out_size.")
    return np.concatenate(chosen)


def fit_on_sections(adatas: Mapping, method: str = "macenko", *, per_section: int = 16,
                    patch_um: float | None = None, out_size: int = 224, cache_dir=None,
                    progress: bool = False, **settings) -> StainNormalizer:
    """Fit a normaliser on the (unnormalised) patch-cache patches of reference sections.

    Parameters
    ----------
    adatas
        ``{section: AnnData}`` of the reference (training) sections.
    method
        ``"macenko"`` or ``"reinhard"``.
    per_section
        Reference patches per section (:func:`reference_patches`).
    patch_um, out_size, cache_dir, progress
        Patch geometry and cache, as :func:`mclstexp_lite.patches.patch_cache`.
    **settings
        :class:`StainNormalizer` settings (``io``, ``alpha``, ``beta``, ``black_level``,
        ``min_tissue``).

    Returns
    -------
    StainNormalizer
        Fitted; :attr:`StainNormalizer.reference` names the sections.
    """
    if not isinstance(adatas, Mapping) or not adatas:
        raise ValueError("adatas must be a non-empty {section: AnnData} dict of the reference sections.")
    norm = StainNormalizer(method, **settings)
    geometry = {"out_size": out_size, "cache_dir": cache_dir, "progress": progress}
    if patch_um is not None:
        geometry["patch_um"] = patch_um
    arrays = {s: patch_cache(a, **geometry) for s, a in adatas.items()}
    ref = reference_patches(arrays, per_section=per_section, io=norm.io, beta=norm.beta,
                            black_level=norm.black_level)
    norm.fit(ref, description=f"{len(ref)} patches, up to {per_section} per section "
                              f"(stain.reference_patches) of {', '.join(map(str, adatas))}")
    norm.reference["sections"] = [str(s) for s in adatas]
    return norm
