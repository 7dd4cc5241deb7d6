"""Small helpers shared by several modules (private: import them from here, nowhere else).

- atomic writes: a temp file beside the target, fsynced, given the usual permissions and
  renamed into place, so an interrupted write never leaves a partial file
  (:func:`atomic_write` and its text / JSON / h5ad / npz forms; ``mclstexp_lite.download``
  re-exports the first four as public API);
- :func:`sha256_file`, streamed and memoised per (path, mtime, size);
- :func:`pil_pixel_limit`, PIL's decompression-bomb limit changed for one decode only;
- :func:`to_dense`, numpy / scipy.sparse / AnnData ``X`` to a dense array.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
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
