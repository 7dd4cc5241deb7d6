"""The on-disk patch cache: every spot's H&E patch of a section, cut once, memory-mapped.

Cropping a JPEG per training item is slow (decode, crop, resize for every spot and every
epoch). :func:`patch_cache` therefore decodes each source image once
(:func:`mclstexp_lite.patches.extract_patches`), stores all patches of a section as one
``uint8`` array ``(n_spots, out_size, out_size, 3)`` in a ``.npy`` file and returns it
memory-mapped. This module holds the cache: entry keys, writing and validating entries,
building a new spot set from a sibling entry of the same image, and stain-normalised
entries (``stain=``). Users call it as ``mclstexp_lite.patches.patch_cache``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import numpy as np

from . import __version__, download
from ._util import (atomic_write, atomic_write_text, positive_float, positive_int, safe_name,
                    sha256_file)
from ._patch_extract import DEFAULT_PATCH_UM, center_pixels, crop_size_px, extract_patches

__all__ = ["patch_cache"]

#: The patch stage's logger, as before the cache had a module of its own.
logger = logging.getLogger("mclstexp_lite.patches")

#: Version of the cache entry layout; bump when the crop/resize algorithm changes so
#: that entries written by older code are rebuilt instead of reused.
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------
# cache location and keys
# --------------------------------------------------------------------------------------
def _default_cache_dir() -> Path:
    """Directory for patch cache entries: ``<mclstexp_lite.download.cache_dir()>/patches``.

    That is ``$MCLSTEXP_CACHE`` when set, else the per-user cache folder; derived files
    never go inside the data root, which may be a shared or read-only copy.
    """
    return download.cache_dir() / "patches"


def _spots_digest(obs_names: list[str], rounded: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(obs_names).encode("utf-8"))
    digest.update(np.ascontiguousarray(rounded, dtype="<i8").tobytes())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------
# atomic writes and entry validation
# --------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a rename in it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_entry(directory: Path, key: str, shape: tuple, fill_fn, meta: dict) -> None:
    """Write ``<key>.npy`` (filled by ``fill_fn``) then ``<key>.json``, each atomically.

    The array is filled in a temporary file first, so a failure while filling leaves any
    existing entry untouched. The JSON marks a complete entry: it is removed before the
    new array takes the old one's place and written only after it.
    """
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"

    def write(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        try:
            fill_fn(arr)
            arr.flush()
        finally:
            del arr
        json_path.unlink(missing_ok=True)

    atomic_write(npy_path, write, suffix=".npy")
    _fsync_dir(directory)
    atomic_write_text(json_path, json.dumps(meta, indent=1))
    _fsync_dir(directory)


class _StaleEntry(Exception):
    """A cache entry that exists but cannot be used."""


def _open_entry(directory: Path, key: str) -> tuple[np.memmap, dict] | None:
    """Open a cache entry read-only; ``None`` if absent, :class:`_StaleEntry` if broken."""
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"
    if not json_path.exists():
        if npy_path.exists():
            raise _StaleEntry(f"{npy_path.name} has no {json_path.name} (an interrupted write)")
        return None
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _StaleEntry(f"unreadable metadata {json_path.name} ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        raise _StaleEntry(f"{json_path.name} has another cache format than {_CACHE_FORMAT}")
    try:
        n, size = int(meta["n_spots"]), int(meta["out_size"])
        if len(meta["obs_names"]) != n or len(meta["centers_px"]) != n:
            raise _StaleEntry(f"{json_path.name} lists a wrong number of spots")
    except (KeyError, TypeError, ValueError) as err:
        raise _StaleEntry(f"{json_path.name} lacks a field ({err})") from err
    try:
        arr = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise _StaleEntry(f"cannot memory-map {npy_path.name} ({err})") from err
    expected = (n, size, size, 3)
    if not isinstance(arr, np.memmap) or arr.dtype != np.uint8 or arr.shape != expected:
        raise _StaleEntry(
            f"{npy_path.name} holds {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}, "
            f"expected uint8 {expected}"
        )
    if npy_path.stat().st_size != arr.offset + arr.nbytes:
        raise _StaleEntry(f"{npy_path.name} has {npy_path.stat().st_size} bytes, expected {arr.offset + arr.nbytes}")
    return arr, meta


# --------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------
def _resolve_library(adata, library_id) -> str:
    spatial = adata.uns.get("spatial") if isinstance(adata.uns, Mapping) else None
    if not isinstance(spatial, Mapping) or len(spatial) == 0:
        raise ValueError(
            "adata.uns['spatial'] is missing or empty; load the section with a loader from "
            "mclstexp_lite.datasets, which records the source image there."
        )
    if library_id is None:
        if len(spatial) != 1:
            raise ValueError(
                f"adata.uns['spatial'] holds {len(spatial)} libraries {sorted(map(str, spatial))}; "
                "pass library_id= to choose the one whose image the spots are on."
            )
        return next(iter(spatial))
    if library_id not in spatial:
        raise ValueError(
            f"library_id={library_id!r} is not in adata.uns['spatial']; choose one of "
            f"{sorted(map(str, spatial))}."
        )
    if "section" in adata.obs.columns and len(spatial) > 1:
        sections = adata.obs["section"].astype(str)
        other = sections != str(library_id)
        if other.any():
            raise ValueError(
                f"{int(other.sum())} of {adata.n_obs} spots belong to other sections than "
                f"{library_id!r} (adata.obs['section']); subset first, e.g. "
                f"adata[adata.obs['section'] == {str(library_id)!r}]."
            )
    return library_id


def _section_inputs(adata, library_id) -> dict:
    lib = _resolve_library(adata, library_id)
    entry = adata.uns["spatial"][lib]
    meta = entry.get("metadata") if isinstance(entry, Mapping) else None
    required = ("source_image_path", "um_per_px")
    if not isinstance(meta, Mapping) or any(k not in meta for k in required):
        raise ValueError(
            f"adata.uns['spatial'][{lib!r}]['metadata'] must hold {list(required)} (and "
            "'source_image_sha256'); load the section with mclstexp_lite.datasets."
        )
    if "spatial" not in adata.obsm:
        raise ValueError("adata.obsm['spatial'] (spot centres in source-image pixels) is missing.")
    pixels = center_pixels(adata.obsm["spatial"])
    if adata.n_obs == 0:
        raise ValueError("adata has no spots; there are no patches to extract.")
    path = Path(str(meta["source_image_path"])).expanduser()
    try:
        um_per_px = positive_float(meta["um_per_px"], "metadata['um_per_px']")
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.uns['spatial'][{lib!r}]['metadata']['um_per_px'] is invalid: {err}") from err
    sha = str(meta.get("source_image_sha256") or "").lower()
    sha_computed = False
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        if not path.is_file():
            raise FileNotFoundError(
                f"H&E image not found: {path} (adata.uns['spatial'][{lib!r}]['metadata']"
                "['source_image_path']); download the section's files first."
            )
        sha, sha_computed = sha256_file(path, memo=True), True
    return {
        "library_id": lib,
        "path": path,
        "um_per_px": um_per_px,
        "sha256": sha,
        "sha256_computed": sha_computed,
        "centers": np.asarray(adata.obsm["spatial"], dtype=np.float64),
        "pixels": pixels,
    }


def _gather_from_sibling(directory: Path, prefix: str, own_key: str, rounded: np.ndarray, pad: list):
    """Find a complete entry of the same image and geometry holding every wanted centre.

    Returns ``(array, rows, key)`` or ``None``; ``rows[i]`` is the sibling row holding
    the crop of ``rounded[i]`` (a crop depends only on the image, the geometry and its
    rounded centre, all of which the sibling shares).
    """
    for json_path in sorted(directory.glob(f"{prefix}*.json")):
        key = json_path.name[: -len(".json")]
        if key == own_key:
            continue
        try:
            opened = _open_entry(directory, key)
        except _StaleEntry:
            continue
        if opened is None:
            continue
        arr, meta = opened
        if meta.get("pad_value") != pad:
            continue
        lookup = {}
        for row, (x, y) in enumerate(meta["centers_px"]):
            lookup.setdefault((int(x), int(y)), row)
        rows = [lookup.get((int(x), int(y))) for x, y in rounded]
        if all(r is not None for r in rows):
            return arr, np.asarray(rows, dtype=np.int64), key
    return None


def patch_cache(
    adata,
    *,
    patch_um=DEFAULT_PATCH_UM,
    out_size=224,
    cache_dir=None,
    library_id=None,
    overwrite=False,
    progress=True,
    stain=None,
) -> np.memmap:
    """H&E patches of every spot, cached on disk and returned memory-mapped.

    The first call for a section decodes its source image once, cuts a
    ``patch_um``-wide patch under each spot (:func:`extract_patches`, white padding at the
    image border) and stores them; later calls open the stored array without touching
    the image.

    Parameters
    ----------
    adata
        One section, laid out as in ``docs/data_model.md``. Read:
        ``adata.obsm['spatial']`` (spot centres, source-image pixels), ``adata.obs_names``
        and ``adata.uns['spatial'][library_id]['metadata']`` (``source_image_path``,
        ``source_image_sha256``, ``um_per_px``).
    patch_um
        Tissue width of a patch in microns; the crop width in pixels is
        ``crop_size_px(um_per_px, patch_um=patch_um)``.
    out_size
        Side of the stored patches in pixels (the model's input size).
    cache_dir
        Directory for the entries. Default: ``$MCLSTEXP_CACHE/patches`` if that variable
        is set, else ``<user cache directory>/cache/patches``; never inside the data root.
    library_id
        Key of ``adata.uns['spatial']``; needed only when there are several.
    overwrite
        Rebuild the entry from the image even if a valid one exists.
    progress
        Show a progress bar while cropping.
    stain
        Optional fitted :class:`mclstexp_lite.patches.StainNormalizer`: return the patches
        stain-normalised, from an entry of their own (see Notes). ``None`` (default):
        the patches as cut.

    Returns
    -------
    numpy.memmap
        Read-only ``uint8`` array ``(n_obs, out_size, out_size, 3)``, row ``i`` the patch
        of ``adata.obs_names[i]``.

    Notes
    -----
    Each entry is two files in the cache directory, named by the key
    ``<library>_<out_size>px_c<crop_px>_<sha16>_<spots>``: ``sha16`` is the first 16 hex
    digits of the source image's sha256 (taken from the metadata, or computed by
    streaming the file and memoised per path, mtime and size when the metadata has
    none), ``spots`` a short hash of the obs names and rounded centres in order, so any
    other spot set or order gets its own entry.

    - ``<key>.npy``: the patches (``numpy.save`` format).
    - ``<key>.json``: obs names and rounded centres in row order, ``crop_px``,
      ``out_size``, ``patch_um``, ``um_per_px``, ``pad_value``, source path and sha256,
      creation time and package version.

    Both are written to a temporary file in the same directory, fsynced and renamed
    into place, the JSON last: an entry without its JSON is incomplete and is rebuilt.
    On a hit the JSON must match the request (format, obs names, centres, geometry) and
    the ``.npy`` must memory-map to the recorded shape and size; otherwise a warning is
    logged and the entry is rebuilt, never used. A new spot set whose centres are all
    in an existing entry of the same image and geometry (e.g. after filtering spots) is
    built by copying those rows instead of decoding the image again.

    When ``adata`` is not a view, ``adata.uns['mclstexp']['patches']`` is set to
    ``{'path': ..., 'json': ..., 'params': {...}}`` for provenance (the patches
    themselves are not stored in ``adata``).

    With ``stain=``, the unnormalised entry is opened (or built) first and its patches,
    normalised with ``stain.transform``, are written as a separate entry in the
    subfolder ``stained/`` of the cache directory, named
    ``<unnormalised key>_<method>-<fingerprint>`` and written atomically in the same way.
    Its JSON adds ``stain`` (the normaliser's ``to_dict()``), ``stain_fingerprint``,
    ``stain_stats`` (patches normalised / left unchanged) and the key and creation time
    of the entry it was built from; it is reused only while all of these match, so a
    rebuilt unnormalised entry or another normaliser gives a new one. Because the key
    differs, :func:`mclstexp_lite.features.patch_identity` and hence the feature cache
    tell normalised and unnormalised patches apart. The provenance in ``adata.uns``
    then points at the normalised entry and adds ``params['stain']`` (method and
    fingerprint).

    Raises
    ------
    ValueError
        If a required slot is missing or invalid, spots lie outside the image, or the
        image is corrupt.
    FileNotFoundError
        If the source image is needed and missing.
    """
    if stain is not None:
        return _stained_patch_cache(adata, stain, patch_um=patch_um, out_size=out_size,
                                    cache_dir=cache_dir, library_id=library_id,
                                    overwrite=overwrite, progress=progress)
    out_size = positive_int(out_size, "out_size", strict_type=True)
    patch_um = positive_float(patch_um, "patch_um")
    inputs = _section_inputs(adata, library_id)
    lib = inputs["library_id"]
    crop_px = crop_size_px(inputs["um_per_px"], patch_um=patch_um)
    obs_names = [str(name) for name in adata.obs_names]
    rounded = inputs["pixels"]
    pad = [255, 255, 255]

    prefix = f"{safe_name(lib, fallback='section')}_{out_size}px_c{crop_px}_{inputs['sha256'][:16]}_"
    key = prefix + _spots_digest(obs_names, rounded)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"

    meta = {
        "format": _CACHE_FORMAT,
        "key": key,
        "library_id": str(lib),
        "n_spots": len(obs_names),
        "out_size": out_size,
        "crop_px": crop_px,
        "patch_um": patch_um,
        "um_per_px": inputs["um_per_px"],
        "pad_value": pad,
        "resize": "PIL bilinear",
        "source_image_path": str(inputs["path"]),
        "source_image_sha256": inputs["sha256"],
        "sha256_computed": inputs["sha256_computed"],
    }

    result = None if overwrite else _matching_entry(directory, key, meta, obs_names, rounded)
    if result is None:
        sibling = None if overwrite else _gather_from_sibling(directory, prefix, key, rounded, pad)
        result = _build_entry(directory, key, meta, sibling, inputs=inputs, obs_names=obs_names,
                              rounded=rounded, progress=progress)

    if not getattr(adata, "is_view", False):
        record = adata.uns.get("mclstexp")
        if record is None:
            record = adata.uns["mclstexp"] = {}
        if not isinstance(record, MutableMapping):
            raise TypeError(
                f"adata.uns['mclstexp'] must be a dict to record patch provenance, got {type(record).__name__}."
            )
        record["patches"] = {
            "path": str(npy_path),
            "json": str(json_path),
            "params": {
                "library_id": str(lib),
                "patch_um": patch_um,
                "out_size": out_size,
                "crop_px": crop_px,
                "um_per_px": inputs["um_per_px"],
                "source_image_sha256": inputs["sha256"],
            },
        }
    return result


def _matching_entry(directory: Path, key: str, meta: dict, obs_names, rounded):
    """The stored entry ``key`` when it is whole and matches this section (geometry,
    image, obs names, centres), else ``None`` (a warning says why it is rebuilt)."""
    npy_path = directory / f"{key}.npy"
    try:
        opened = _open_entry(directory, key)
    except _StaleEntry as err:
        logger.warning("Patch cache entry %s is unusable (%s); rebuilding it.", npy_path, err)
        return None
    if opened is None:
        return None
    arr, stored = opened
    mismatch = [
        field
        for field in ("library_id", "crop_px", "out_size", "source_image_sha256", "pad_value")
        if stored.get(field) != meta[field]
    ]
    if stored["obs_names"] != obs_names:
        mismatch.append("obs_names")
    if not np.array_equal(np.asarray(stored["centers_px"], dtype=np.int64).reshape(-1, 2), rounded):
        mismatch.append("centers_px")
    if mismatch:
        logger.warning(
            "Patch cache entry %s does not match this section (%s); rebuilding it.",
            npy_path,
            ", ".join(mismatch),
        )
        return None
    return arr


def _build_entry(directory: Path, key: str, meta: dict, sibling, *, inputs, obs_names, rounded,
                 progress) -> np.memmap:
    """Write the entry ``key`` (rows copied from a sibling entry of the same image, else
    cut from the image) and open it."""
    shape = (len(obs_names), meta["out_size"], meta["out_size"], 3)
    if sibling is not None:
        source, rows, sibling_key = sibling
        meta["built_from"] = f"cache entry {sibling_key}"

        def fill(dest):
            order = np.argsort(rows, kind="stable")
            for i in order:  # ascending source rows: sequential reads
                dest[i] = source[rows[i]]

    else:
        meta["built_from"] = "source image"

        def fill(dest):
            extract_patches(
                inputs["path"],
                inputs["centers"],
                crop_px=meta["crop_px"],
                out_size=meta["out_size"],
                pad_value=meta["pad_value"],
                ids=obs_names,
                out=dest,
                progress=progress,
            )

    meta.update(
        obs_names=obs_names,
        centers_px=rounded.tolist(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        package_version=__version__,
    )
    _write_entry(directory, key, shape, fill, meta)
    logger.info("Cached %d patches of %s in %s (%s).", shape[0], meta["library_id"],
                directory / f"{key}.npy", meta["built_from"])
    opened = _open_entry(directory, key)
    if opened is None:  # pragma: no cover - removed by another process meanwhile
        raise RuntimeError(f"Patch cache entry {directory / f'{key}.json'} vanished right after "
                           "it was written.")
    return opened[0]


#: Subfolder of the patch cache for stain-normalised entries. They must stay out of the
#: folder itself, where ``_gather_from_sibling`` looks for unnormalised crops to copy.
_STAINED_SUBDIR = "stained"


def _stained_patch_cache(adata, stain, *, patch_um, out_size, cache_dir, library_id, overwrite,
                         progress) -> np.memmap:
    """:func:`patch_cache` with ``stain=``: the normalised entry, built from the plain one.

    ``stain`` is used through the normaliser's interface (``method``, ``is_fitted``,
    ``fingerprint``, ``transform``, ``last_stats``, ``to_dict``), so this module needs
    nothing of :mod:`mclstexp_lite._stain`, which builds on the cache
    (:func:`mclstexp_lite.patches.fit_on_sections`)."""
    if isinstance(stain, str):
        raise TypeError(
            f"stain must be a fitted mclstexp_lite.patches.StainNormalizer, got the string "
            f"{stain!r}; fit one on the reference sections first, e.g. "
            f"stain.fit_on_sections(training_sections, {stain!r}) (cv.run_cv(stain={stain!r}) "
            "does this per fold)."
        )
    if not all(hasattr(type(stain), a) for a in ("is_fitted", "fingerprint", "transform",
                                                  "to_dict")):
        raise TypeError(
            f"stain must be a fitted mclstexp_lite.patches.StainNormalizer or None, got "
            f"{type(stain).__name__}."
        )
    if not stain.is_fitted:
        raise ValueError(
            "stain is not fitted; call stain.fit(reference_patches) or use "
            "stain.fit_on_sections(...) before passing it to patch_cache."
        )
    base = patch_cache(adata, patch_um=patch_um, out_size=out_size, cache_dir=cache_dir,
                       library_id=library_id, overwrite=overwrite, progress=progress)
    base_json = Path(base.filename).with_suffix(".json")
    base_meta = json.loads(base_json.read_text(encoding="utf-8"))
    fingerprint = stain.fingerprint
    key = f"{base_meta['key']}_{stain.method}-{fingerprint}"
    directory = base_json.parent / _STAINED_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    npy_path, json_path = directory / f"{key}.npy", directory / f"{key}.json"
    expected = {"stain_fingerprint": fingerprint, "source_entry": base_meta["key"],
                "source_created": base_meta.get("created"), "obs_names": base_meta["obs_names"]}

    result = None
    if not overwrite:
        try:
            opened = _open_entry(directory, key)
        except _StaleEntry as err:
            logger.warning("Stained patch cache entry %s is unusable (%s); rebuilding it.", npy_path, err)
            opened = None
        if opened is not None:
            arr, stored = opened
            mismatch = [field for field, value in expected.items() if stored.get(field) != value]
            if mismatch:
                logger.warning("Stained patch cache entry %s does not match (%s); rebuilding it.",
                               npy_path, ", ".join(mismatch))
            else:
                result = arr

    if result is None:
        stats: dict = {}

        def fill(dest):
            stain.transform(base, out=dest, progress=progress)
            stats.update(stain.last_stats)

        meta = {k: v for k, v in base_meta.items() if k not in ("built_from", "created", "package_version")}
        meta.update(expected)
        meta.update(
            key=key,
            stain=stain.to_dict(),
            stain_stats=stats,  # filled by fill() before the JSON is written
            built_from=f"cache entry {base_meta['key']} + stain normalisation ({stain.method})",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            package_version=__version__,
        )
        _write_entry(directory, key, tuple(base.shape), fill, meta)
        logger.info("Stain-normalised %d patches of %s into %s (%s).", len(base),
                    base_meta.get("library_id"), npy_path, stats)
        opened = _open_entry(directory, key)
        if opened is None:  # pragma: no cover - removed by another process meanwhile
            raise RuntimeError(f"Patch cache entry {json_path} vanished right after it was written.")
        result = opened[0]

    record = adata.uns.get("mclstexp") if not getattr(adata, "is_view", False) else None
    if isinstance(record, MutableMapping) and isinstance(record.get("patches"), MutableMapping):
        record["patches"]["path"] = str(npy_path)
        record["patches"]["json"] = str(json_path)
        record["patches"]["params"]["stain"] = {"method": stain.method, "fingerprint": fingerprint}
    return result
