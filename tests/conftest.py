"""Shared fixtures; the shared factories are plain functions in ``tests/factories.py``.

Layout: the tests mirror the package, ``mclstexp_lite/<module>.py`` and the private
``mclstexp_lite/_<module>.py`` -> ``tests/test_<module>.py`` (``_stain.py`` ->
``test_stain.py``). Modules without a file of that name are tested here:

- ``datasets/`` (subpackage): test_datasets.py; ``datasets/_hest_1k``: test_hest.py
- ``_panels``, ``_gene_names``: test_pp.py (sections "panel files", "subset_genes",
  "ids <-> symbols", "real data"), through ``pp``, which exports their names
- ``_image_encoder``, ``_spot_encoder``: test_models.py (sections "Image side", "Spot side")
- ``tl``: ``retrieve`` in test_retrieval.py, ``predict_section`` in test_cv.py
- ``_util``: through its users (atomic writes in test_cv.py, test_checkpoint.py,
  test_patch_cache.py; the PIL limit in test_patches.py; ``deprecated_alias`` with each
  former name it keeps)
- the private modules below two public ones, through the public one: ``_device``
  (test_config.py, test_train.py), ``_normalize`` (test_pp.py), ``_patch_extract``
  (test_patches.py, test_patch_cache.py)
- ``tools/``, ``benchmarks/``: test_scripts.py (``--help``, the package names they use)
- ``workflow``, ``tutorials``: test_notebooks.py (and ``tutorials.load_profile`` in
  test_config.py)
- ``_book``, ``_lab``: test_book.py, test_lab.py
- package-wide rules (pins, unknown names, no unsafe unpickling, no import cycles, lazy
  imports only to keep light modules light, function length, public AnnData API only,
  the namespaces and their ``__all__``, one export per name, public addresses in docs):
  test_project.py

Markers (declared in pyproject.toml, ``--strict-markers``): ``gpu`` needs CUDA (each also
skips without it), ``slow`` takes more than ~20 s on 2 CPU cores (``make test-fast``
leaves these out), ``internet`` needs the network beyond 127.0.0.1.

Tests that read real data look for it under ``$MCLSTEXP_DATA`` or, failing that, the
offline copy at ``../shared/data`` beside the repository; when neither is there they skip
with a reason. In CI ``.ci/run`` points ``MCLSTEXP_DATA`` at ``../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _find_data() -> Path | None:
    env = os.environ.get("MCLSTEXP_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "her2st" / "data" / "ST-cnts" / "C2.tsv.gz").exists():
            return c.resolve()
    return None


SHARED_DATA = _find_data()
needs_data = pytest.mark.skipif(
    SHARED_DATA is None,
    reason="real data not found: set MCLSTEXP_DATA to a folder with the manifest's files "
           "(e.g. ../shared/data) to run this test",
)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if SHARED_DATA is None:
        pytest.skip("real data not found (set MCLSTEXP_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Derived files (patch cache, unpacked images) go to a per-session temp folder,
    never to the user's cache, and nothing is ever downloaded unless a test says so.

    Session-scoped, so that module- and session-scoped fixtures (which pytest sets up
    before function-scoped ones) see these settings too; a test's own ``monkeypatch``
    changes are undone after it as usual."""
    cache = tmp_path_factory.getbasetemp() / "mclstexp_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCLSTEXP_CACHE", str(cache))
        mp.setenv("MCLSTEXP_OFFLINE", "1")
        if SHARED_DATA is not None:
            mp.setenv("MCLSTEXP_DATA", str(SHARED_DATA))
        yield


@pytest.fixture(scope="session")
def her2_c2(data_root):
    from mclstexp_lite import datasets

    return datasets.her2st("C2", data_dir=data_root, download=False)


@pytest.fixture(scope="session")
def her2_a1(data_root):
    from mclstexp_lite import datasets

    return datasets.her2st("A1", data_dir=data_root, download=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One epoch of a tiny model on SYNTHETIC data; returns the output folder.

    ``mode="frozen"`` (frozen backbone): a 46 MB checkpoint written in about a second,
    instead of 131 MB (with the backbone's Adam moments) and ten times as long. Tests
    that alter it work on a copy (``factories.fresh_copy``).
    """
    from mclstexp_lite import train as tr

    from .factories import synthetic_spotdata, tiny_config

    out = tmp_path_factory.mktemp("run")
    tr.train(synthetic_spotdata(), tiny_config(seed=1), out_dir=out, progress=False)
    return out


@pytest.fixture()
def small_patches(tmp_path):
    """SYNTHETIC: 20 random 8x8 patches saved and memory-mapped like a cache entry."""
    import numpy as np

    arr = np.random.default_rng(4).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "p.npy", arr)
    return arr, np.load(tmp_path / "p.npy", mmap_mode="r")
