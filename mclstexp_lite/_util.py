"""Small helpers shared by several modules (private: import them from here, nowhere else).

- atomic writes: a temp file beside the target, fsynced, given the usual permissions and
  renamed into place, so an interrupted write never leaves a partial file
  (:func:`atomic_write` and its text / JSON / h5ad / npz forms; ``mclstexp_lite.download``
  re-exports the first four as public API);
- :func:`sha256_file`, streamed and memoised per (path, mtime, size);
- :func:`pil_pixel_limit`, PIL's decompression-bomb limit changed for one decode only;
- :func:`to_dense`, numpy / scipy.sparse / AnnData ``X`` to a dense array;
- :func:`positive_int`, :func:`positive_float`: the one check of a positive integer
  / positive finite number argument;
- :func:`safe_name`, text reduced to a file-name-safe key part;
- :func:`check_anndata`, :func:`section_name`: the AnnData type check and the section
  name that error messages use;
- :func:`load_matching_npz`, a cached ``.npz`` read back only when it matches;
- :func:`deprecated_alias`, a former public name that warns once and calls the new one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}
_PIL_LIMIT_LOCK = threading.Lock()


# ------------------------------------------------------------------------ atomic writes
def _umask_mode() -> int:
    """The mode a new file gets under the process's umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write, *, suffix: str = ".part") -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temp file beside ``path``, which is
    fsynced, given normal permissions and renamed into place.

    An interrupted or failing write leaves the previous file (if any) untouched and no
    partial file. ``suffix`` keeps the extension for writers that check it (h5ad, png).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON atomically (sorted keys, indent 2; other objects as str)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_h5ad(adata, path: str | os.PathLike) -> None:
    """Write an AnnData to ``.h5ad`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, adata.write_h5ad, suffix=".h5ad")


def atomic_savez(path: str | os.PathLike, arrays) -> None:
    """Write arrays to ``.npz`` atomically (see :func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write, suffix=".npz")


# ----------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, *, memo: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    ``memo=True`` remembers the digest per (resolved path, mtime, size) for the life of
    the process, for large images hashed more than once.
    """
    path = Path(path)
    key = None
    if memo:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in _SHA256_MEMO:
            return _SHA256_MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if key is not None:
        _SHA256_MEMO[key] = digest
    return digest


# ------------------------------------------------------------------------- environment
def _set_environ(values) -> None:
    """Set each variable of ``values`` (``None``: unset it)."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environ(changes):
    """Set (or, for ``None``, unset) environment variables for the ``with`` block, and put
    every one of them back as it was afterwards, also on an error."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        _set_environ(changes)
        yield
    finally:
        _set_environ(saved)


# ------------------------------------------------------------------------------ images
@contextlib.contextmanager
def pil_pixel_limit(limit: int | None):
    """Set PIL's decompression-bomb limit (``None``: off) for the duration of one decode;
    a lock keeps threads from restoring each other's value."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


# ------------------------------------------------------------------------------ arrays
def to_dense(x, dtype=None) -> np.ndarray:
    """A dense numpy array of ``x`` (numpy, scipy.sparse, or an AnnData's ``X``)."""
    if hasattr(x, "X") and hasattr(x, "obs_names"):
        x = x.X
    if hasattr(x, "toarray") and hasattr(x, "nnz"):
        x = x.toarray()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------- checks
def positive_int(value, name: str, *, strict_type: bool = False) -> int:
    """``value`` as an ``int`` >= 1, else an error that names ``name``.

    A bool or non-integer is a ``ValueError`` (``strict_type=True``: a ``TypeError``
    that names its type), as is an integer below 1. ``name`` is used as written (add
    backticks there if the module's messages quote names).
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if strict_type:
            raise TypeError(f"{name} must be a positive integer, got {value!r} "
                            f"({type(value).__name__}).")
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if value < 1:
        if strict_type:
            raise ValueError(f"{name} must be a positive integer (>= 1), got {value}.")
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- AnnData
def check_anndata(adata, name: str = "adata") -> None:
    """A ``TypeError`` naming ``name`` unless ``adata`` is an :class:`anndata.AnnData`."""
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"`{name}` must be an anndata.AnnData, got {type(adata).__name__}. "
                        "Load a section with mclstexp_lite.datasets first.")


def section_name(adata) -> str:
    """A readable name for error messages: obs['section'], else uns['mclstexp']['section']."""
    from collections.abc import Mapping

    if "section" in adata.obs.columns:
        names = [str(s) for s in dict.fromkeys(adata.obs["section"].astype(str))]
        if names:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    meta = adata.uns.get("mclstexp", {})
    if isinstance(meta, Mapping) and meta.get("section"):
        return str(meta["section"])
    return "<unnamed section>"


# ------------------------------------------------------------------------- npz cache
def load_matching_npz(path: str | os.PathLike, expect) -> dict | None:
    """The arrays of the ``.npz`` at ``path`` if it exists and every ``expect`` entry
    equals the stored array (same shape and values), else ``None``.

    A file that cannot be read or that differs is logged (a warning) and treated as
    absent, so the caller recomputes and overwrites it.
    """
    import logging

    log = logging.getLogger(__name__)
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated or foreign file: recompute
        log.warning("cannot read %s (%s); recomputing", path, exc)
        return None
    for k, v in expect.items():
        if k not in arrays or arrays[k].shape != np.shape(v) or not np.array_equal(arrays[k], v):
            log.warning("%s does not match this fold (%s differs); recomputing", path, k)
            return None
    return arrays


def positive_float(value, name: str) -> float:
    """``value`` as a ``float`` > 0 and finite: a ``TypeError`` naming ``name`` and the
    type for a bool or non-number, a ``ValueError`` for zero, negative, nan or inf."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number, got {value}.")
    return value


def check_dropout(value, name: str = "dropout") -> float:
    """``value`` as a dropout probability in [0, 1), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}.")
    return float(value)


def safe_name(text: str, *, fallback: str = "x") -> str:
    """``text`` reduced to letters, digits, ``.`` and ``-`` (for cache file names);
    ``fallback`` when nothing is left."""
    import re

    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(text)).strip("-.") or fallback


def h5ad_value(v):
    """``v`` as a value ``uns`` can hold in an h5ad file: ``None`` becomes ``"None"``,
    numpy scalars Python ones, lists and tuples lists (recursively)."""
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return [h5ad_value(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# ------------------------------------------------------------------------ torch files
def torch_load_plain(path, *, what: str, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` (tensors and plain values only, no code is
    unpickled); any failure becomes ``ValueError("cannot read the <what> <path>: ... <fix>")``."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # PyTorch's own text ends by suggesting the unsafe load, which would run any code
        # pickled in the file: keep only its first line, never that advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in first or "Weights only load failed" in first:
            first = ("it holds Python objects that a safe load refuses (it was not written "
                     "by this package's save functions) or it is damaged")
        raise ValueError(f"cannot read the {what} {path}: {type(exc).__name__}: {first}. "
                         f"{fix}") from exc


# ------------------------------------------------------------------------ deprecations
def deprecated_alias(func, old: str, new: str):
    """``func`` under its former name ``old``: the first call warns (``FutureWarning``,
    shown by default, also in notebooks) that ``old`` is now ``new``; later calls are
    silent. The alias keeps ``func``'s signature and docstring, headed by the notice."""

    @functools.wraps(func)
    def alias(*args, **kwargs):
        if not alias.warned:
            alias.warned = True
            warnings.warn(f"{old} is deprecated and will be removed; use {new} (same "
                          "arguments).", FutureWarning, stacklevel=2)
        return func(*args, **kwargs)

    alias.warned = False
    alias.__name__ = alias.__qualname__ = old.rpartition(".")[2]
    alias.__doc__ = f"Deprecated alias of :func:`{new}`.\n\n{func.__doc__ or ''}"
    return alias
def import_squidpy():
    """``import squidpy``, without the two ``SyntaxWarning: '...' is not a valid key!``
    lines that squidpy 1.8 prints on every first import.

    Their cause is squidpy's own docstring of ``squidpy.gr.sepal``, which names the
    docrep templates ``%(n_jobs)s`` and ``%(show_progress_bar)s`` where its template
    table has them under ``parallelize``; docrep then warns (``warnings.warn`` with
    ``SyntaxWarning``, at import, compiled bytecode or not). Nothing in squidpy's code
    is affected. Only these two messages and only during this import are silenced; any
    other warning passes. Import squidpy through here, so a notebook never shows them.
    """
    import sys
    import warnings

    if "squidpy" in sys.modules:
        return sys.modules["squidpy"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"'(n_jobs|show_progress_bar)' is not a "
                                r"valid key!", category=SyntaxWarning)
        import squidpy
    return squidpy
