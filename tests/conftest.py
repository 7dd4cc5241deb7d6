"""Shared fixtures.

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
