"""The data manifest and a checksum-verifying downloader.

Every input file the package reads is one row of ``data_manifest.csv`` (top level of the
repository): dataset, section, kind, a relative path that mirrors the upstream layout,
a URL pinned to a commit, and a checksum (sha256, or the git blob sha1 that GitHub
stores, or, for GEO files whose checksums are not published, the expected size).

All files live under one data root:

1. the ``data_dir=`` argument of any loader, else
2. the environment variable ``MCLSTEXP_DATA``, else
3. a per-user cache folder (``platformdirs.user_cache_dir("mclstexp_lite")/data``).

A file already present with the right checksum is used as it is. A missing file is
downloaded to a temporary file next to its destination, verified, and only then renamed
into place, so an interrupted download never leaves a half-written file under the real
name. A file whose checksum does not match is never used.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from . import _util
from ._progress import progress_bar

__all__ = [
    "MANIFEST_NAME",
    "ENV_DATA",
    "ENV_CACHE",
    "ENV_OFFLINE",
    "ENV_MANIFEST",
    "DataMissingError",
    "ChecksumError",
    "ManifestRow",
    "data_dir",
    "cache_dir",
    "manifest_path",
    "manifest",
    "rows",
    "git_blob_sha1_file",
    "verify",
    "locate",
    "fetch",
    "status",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "data_manifest.csv"
ENV_DATA = "MCLSTEXP_DATA"
ENV_CACHE = "MCLSTEXP_CACHE"
ENV_OFFLINE = "MCLSTEXP_OFFLINE"
ENV_MANIFEST = "MCLSTEXP_MANIFEST"

_CHUNK = 1 << 20


class DataMissingError(FileNotFoundError):
    """One or more manifest files are missing and could not be downloaded."""


class ChecksumError(ValueError):
    """A file on disk does not match the checksum recorded for it."""


@dataclass(frozen=True)
class ManifestRow:
    """One file of the manifest."""

    dataset: str
    section: str
    patient: str
    kind: str
    path: str
    url: str
    sha256: str
    git_blob_sha1: str
    size: int | None
    pixel_scale: float | None
    source: str
    license: str
    notes: str

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha256 or self.git_blob_sha1)


# --------------------------------------------------------------------------- roots
def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data root.

    Parameters
    ----------
    data_dir
        Explicit folder; wins over everything else.

    Returns
    -------
    Path
        ``data_dir`` if given, else ``$MCLSTEXP_DATA``, else the per-user cache folder
        ``<user cache>/mclstexp_lite/data``. The folder is not created here.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser().resolve()
    return _user_cache() / "data"


def _resolve_root(folder):
    return data_dir(folder)


def cache_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """Return the folder for derived files (patch cache, unpacked images, panels).

    ``$MCLSTEXP_CACHE`` if set, else ``<user cache>/mclstexp_lite/cache``. Derived files
    never go inside the data root: it may be a shared or read-only copy of the data. The
    folder is created. (``data_dir_`` is accepted for symmetry and ignored.)
    """
    env = os.environ.get(ENV_CACHE)
    out = Path(env).expanduser().resolve() if env else _user_cache() / "cache"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _user_cache() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("mclstexp_lite"))


# ------------------------------------------------------------------------ manifest
def manifest_path() -> Path:
    """Locate ``data_manifest.csv`` (``$MCLSTEXP_MANIFEST`` overrides)."""
    env = os.environ.get(ENV_MANIFEST)
    if env:
        path = Path(env)
    else:
        path = Path(__file__).resolve().parent.parent / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"data manifest not found at {path}. Install the package from a clone of the "
            f"repository (pip install -e .) or set {ENV_MANIFEST} to the file's path."
        )
    return path


@lru_cache(maxsize=4)
def _read_manifest(path: str) -> tuple[ManifestRow, ...]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        out = []
        for i, rec in enumerate(reader, start=2):
            try:
                out.append(ManifestRow(
                    dataset=rec["dataset"], section=rec["section"], patient=rec["patient"],
                    kind=rec["kind"], path=rec["path"], url=rec["url"],
                    sha256=rec["sha256"].lower(), git_blob_sha1=rec["git_blob_sha1"].lower(),
                    size=int(rec["size"]) if rec["size"] else None,
                    pixel_scale=float(rec["pixel_scale"]) if rec["pixel_scale"] else None,
                    source=rec["source"], license=rec["license"], notes=rec["notes"],
                ))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}, line {i}: malformed manifest row ({exc})") from exc
    return tuple(out)


def manifest() -> "pandas.DataFrame":  # noqa: F821
    """Return the manifest as a DataFrame (one row per upstream file)."""
    import pandas as pd

    rows = _read_manifest(str(manifest_path()))
    return pd.DataFrame([r.__dict__ for r in rows])


def rows(dataset: str | None = None, section: str | None = None,
         kind: str | Iterable[str] | None = None) -> list[ManifestRow]:
    """Select manifest rows; unknown dataset or section names raise ``ValueError``."""
    all_rows = _read_manifest(str(manifest_path()))
    if dataset is not None:
        known = sorted({r.dataset for r in all_rows})
        if dataset not in known:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(known)}")
        all_rows = tuple(r for r in all_rows if r.dataset == dataset)
    if section is not None:
        known = sorted({r.section for r in all_rows})
        if section not in known:
            raise ValueError(
                f"unknown section {section!r} for dataset {dataset!r}; valid: {', '.join(known)}")
        all_rows = tuple(r for r in all_rows if r.section == section)
    if kind is not None:
        kinds = {kind} if isinstance(kind, str) else set(kind)
        all_rows = tuple(r for r in all_rows if r.kind in kinds)
    return list(all_rows)


# ---------------------------------------------------------------------- checksums
#: Hex sha256 of a file, read in 1 MiB chunks (``memo=True``: remembered per path,
#: mtime and size). The implementation is :func:`mclstexp_lite._util.sha256_file`.
sha256_file = _util.sha256_file


def git_blob_sha1_file(path: str | os.PathLike) -> str:
    """The id git gives a file's content: sha1 of ``b"blob <size>\\0" + content``."""
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify(path: str | os.PathLike, row: ManifestRow) -> str:
    """Check ``path`` against the manifest row; return the file's sha256.

    Raises
    ------
    ChecksumError
        When the size, sha256 or git blob sha1 differs from the manifest.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    if row.size is not None and st.st_size != row.size:
        raise ChecksumError(
            f"{path}: size {st.st_size} bytes, expected {row.size} for {row.dataset} "
            f"{row.section} {row.kind}. The file is incomplete or a different version; "
            f"delete it and run again to download it from {row.url}")
    digest = sha256_file(path)
    if row.sha256 and digest != row.sha256:
        raise ChecksumError(
            f"{path}: sha256 {digest} does not match the manifest ({row.sha256}). "
            f"Delete the file and run again to download it from {row.url}")
    if not row.sha256 and row.git_blob_sha1:
        blob = git_blob_sha1_file(path)
        if blob != row.git_blob_sha1:
            raise ChecksumError(
                f"{path}: git blob sha1 {blob} does not match the manifest "
                f"({row.git_blob_sha1}). Delete the file and run again to download it "
                f"from {row.url}")
    if not row.has_checksum:
        _check_recorded(path, digest, row)
    _VERIFIED[key] = digest
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check_recorded(path: Path, digest: str, row: ManifestRow) -> None:
    """For rows without a published checksum: compare with the sha256 seen at download."""
    side = _sidecar(path)
    if side.exists():
        recorded = side.read_text().split()[0].strip().lower()
        if recorded != digest:
            raise ChecksumError(
                f"{path}: sha256 {digest} differs from {recorded} recorded in {side.name} "
                f"when it was downloaded. Delete both files and run again.")
    else:
        log.warning("%s: no published checksum for this file (%s); using it unverified",
                    path, row.notes or row.source)


# ----------------------------------------------------------------------- fetching
def locate(row: ManifestRow, data_dir_: str | os.PathLike | None = None) -> Path:
    """Where ``row`` lives under the data root (whether or not it exists)."""
    return data_dir(data_dir_) / row.path


def fetch(selected: Sequence[ManifestRow], *, data_dir: str | os.PathLike | None = None,
          download: bool | None = None, progress: bool = True) -> dict[str, Path]:
    """Make sure every selected file is present and verified; return ``{path: local}``.

    Parameters
    ----------
    selected
        Manifest rows, e.g. ``rows("her2st", "C2")``.
    data_dir
        Data root (see :func:`data_dir`).
    download
        ``False`` never touches the network. ``None`` (default) downloads unless
        ``$MCLSTEXP_OFFLINE`` is set to ``1``.
    progress
        Show a progress bar per download.

    Returns
    -------
    dict
        Manifest relative path -> verified local path.

    Raises
    ------
    DataMissingError
        Listing every file that is missing (with where to put it and its URL) when
        downloading is off or failed.
    ChecksumError
        When a file on disk or a fresh download does not match its checksum.
    """
    root = _resolve_root(data_dir)
    if download is None:
        download = os.environ.get(ENV_OFFLINE, "") not in ("1", "true", "yes")
    found: dict[str, Path] = {}
    missing: list[ManifestRow] = []
    failures: list[str] = []
    for row in selected:
        target = root / row.path
        if target.is_file():
            verify(target, row)
            found[row.path] = target
        else:
            missing.append(row)
    if missing and download:
        for row in missing[:]:
            target = root / row.path
            try:
                _download(row, target, progress=progress)
            except ChecksumError:
                raise
            except Exception as exc:  # network errors of every flavour
                failures.append(f"{row.url}: {type(exc).__name__}: {exc}")
                continue
            verify(target, row)
            found[row.path] = target
            missing.remove(row)
    if missing:
        lines = "\n".join(f"  {root / r.path}\n      <- {r.url}" for r in missing)
        why = ("downloads are switched off (download=False or MCLSTEXP_OFFLINE=1)"
               if not download else "the download failed:\n    " + "\n    ".join(failures))
        raise DataMissingError(
            f"{len(missing)} data file(s) missing under the data root {root} and {why}.\n"
            f"Put each file at the path shown (the URL is where it comes from), or set "
            f"{ENV_DATA} / data_dir= to a folder that has them:\n{lines}")
    return found


def _download(row: ManifestRow, target: Path, *, progress: bool = True,
              timeout: float = 60.0) -> None:
    """Stream ``row.url`` into a temp file beside ``target``; verify; rename into place."""
    import requests
    received = 0

    def fetch(tmp):
        nonlocal received
        with open(tmp, "wb") as out, requests.get(row.url, stream=True,
                                                  timeout=timeout) as resp:
            resp.raise_for_status()
            expected = int(resp.headers.get("Content-Length", 0)) or row.size
            bar = progress_bar(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=target.name, disable=not progress, leave=False)
            with bar:
                for chunk in resp.iter_content(chunk_size=_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected and received != expected:
            raise OSError(f"connection closed after {received} of {expected} bytes")
        digest = verify(tmp, row)
        if not row.has_checksum:
            _util.atomic_write_text(_sidecar(target), f"{digest}  {target.name}\n")

    _util.atomic_write(target, fetch)  # temp file beside target, fsync, rename; none left on error
    log.info("downloaded %s (%d bytes)", target, received)


def status(dataset: str | None = None, *, data_dir: str | os.PathLike | None = None):
    """Which manifest files exist under the data root (no hashing; see :func:`fetch`)."""
    import pandas as pd

    root = _resolve_root(data_dir)
    recs = []
    for r in rows(dataset):
        recs.append({"dataset": r.dataset, "section": r.section, "patient": r.patient,
                     "kind": r.kind, "path": r.path, "present": (root / r.path).is_file()})
    return pd.DataFrame(recs)
