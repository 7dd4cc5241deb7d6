"""Which sections exist, and loading them by dataset and name.

- :func:`list_sections` - the manifest's sections and which files are present locally
- :func:`load`, :func:`load_sections` - ``her2st`` / ``cscc`` sections by name
"""

from __future__ import annotations

import os
from typing import Sequence

from .. import download as dl
from .._progress import progress_bar
from ._legacy_st import PAPER_HER2ST_SECTIONS, cscc, her2st


def list_sections(dataset: str | None = None, *, data_dir: str | os.PathLike | None = None):
    """Which sections exist (per the manifest) and which files are present locally.

    Returns
    -------
    pandas.DataFrame
        One row per section: ``dataset``, ``section``, ``patient``, ``counts``, ``spots``,
        ``image`` (full resolution), ``image_reduced``, ``labels`` (True when the file is
        present under the data root; checksums are verified when a section is loaded),
        ``paper`` (in the mclSTExp paper's set) and ``trainable`` (counts, spots and some
        image present).
    """
    import pandas as pd

    sectioned = ("her2st", "cscc")
    if dataset is not None and dataset not in sectioned:
        raise ValueError(
            f"list_sections: unknown dataset {dataset!r}; datasets with sections in the "
            f"manifest: {', '.join(sectioned)}. 10x Visium data is loaded from its own "
            "Space Ranger folder with datasets.visium(path).")
    datasets = [dataset] if dataset else list(sectioned)
    st = pd.concat([dl.status(d, data_dir=data_dir) for d in datasets], ignore_index=True)
    st = st[st["kind"].isin(["counts", "spots", "image", "image_reduced", "labels"])]
    wide = st.pivot_table(index=["dataset", "section", "patient"], columns="kind",
                          values="present", aggfunc="any")
    wide = wide.reindex(columns=["counts", "spots", "image", "image_reduced", "labels"])
    has_section = wide["counts"].notna()
    wide = wide[has_section].astype("boolean").fillna(False).astype(bool).reset_index()
    wide.columns.name = None
    wide["paper"] = [(d == "her2st" and s in PAPER_HER2ST_SECTIONS) or d == "cscc"
                     for d, s in zip(wide["dataset"], wide["section"])]
    wide["trainable"] = wide["counts"] & wide["spots"] & (wide["image"] | wide["image_reduced"])
    return wide


def load(dataset: str, section: str, **kw):
    """Load ``section`` of ``dataset`` (``"her2st"`` or ``"cscc"``)."""
    loaders = {"her2st": her2st, "cscc": cscc}
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(loaders)}")
    return loaders[dataset](section, **kw)


def load_sections(dataset: str, sections: Sequence[str], **kw) -> dict:
    """Load several sections; returns ``{section: AnnData}`` in the given order."""
    out = {}
    for s in progress_bar(list(sections), desc=f"loading {dataset}", disable=len(sections) < 3):
        out[s] = load(dataset, s, **kw)
    return out
