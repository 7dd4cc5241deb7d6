"""Cross-validation folds: which sections train, which are held out, per scheme.

- ``"section"``: leave one section out (the paper's scheme; other sections of the same
  patient stay in training and in the reference bank);
- ``"patient"``: leave one patient out (the field's current practice beside it).

:func:`make_folds` builds them from ``{section: patient}``, :func:`save_folds` /
:func:`load_folds` keep them in a results folder's ``folds.json``, and
:func:`check_leakage` refuses a fold that would train on what it tests.
:mod:`mclstexp_lite.cv` runs them and re-exports every public name here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from . import _util

__all__ = ["SCHEMES", "Fold", "make_folds", "save_folds", "load_folds", "patients_of",
           "check_leakage", "check_folder_name"]

#: Fold schemes of :func:`make_folds`.
SCHEMES = ("section", "patient")
#: File name of the folds in a results folder (:func:`save_folds`, :func:`load_folds`).
FOLDS_FILE = "folds.json"


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold.

    Attributes
    ----------
    name
        Fold name, also its folder name: the held-out section (``"section"`` scheme)
        or patient (``"patient"`` scheme).
    test
        Held-out sections, each scored separately.
    train
        Sections the model is trained (or the baseline fitted) on.
    reference
        Sections whose spots form the retrieval reference bank (equal to ``train``
        in both schemes).
    """

    name: str
    test: tuple
    train: tuple
    reference: tuple

    def to_dict(self) -> dict:
        return {"name": self.name, "test": list(self.test), "train": list(self.train),
                "reference": list(self.reference)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Fold":
        return cls(name=str(d["name"]), test=tuple(d["test"]), train=tuple(d["train"]),
                   reference=tuple(d["reference"]))


def make_folds(sections: Mapping[str, str], scheme: str = "section") -> list[Fold]:
    """Build the folds of a scheme.

    Parameters
    ----------
    sections
        ``{section: patient}`` for every section of the study, in the order folds and
        training lists should follow.
    scheme
        ``"section"`` (leave one section out; other sections of the same patient stay
        in training and reference) or ``"patient"`` (leave one patient out).

    Returns
    -------
    list of Fold
        ``"section"``: one fold per section, named after it. ``"patient"``: one fold
        per patient (in order of first appearance), named after it, whose ``test`` is
        all that patient's sections.

    Raises
    ------
    ValueError
        Unknown ``scheme``; fewer than two sections (``"section"``) or patients
        (``"patient"``), since a fold would have no training data; a section or patient
        name that cannot be a folder name.
    TypeError
        If ``sections`` is not a mapping of strings to strings.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}.")
    if not isinstance(sections, Mapping):
        raise TypeError("`sections` must be a mapping {section: patient}, got "
                        f"{type(sections).__name__}; e.g. cv.patients_of(adatas).")
    for s, p in sections.items():
        if not isinstance(s, str) or not isinstance(p, str):
            raise TypeError(f"`sections` must map str to str, got {s!r}: {p!r}.")
        for name in (s, p):
            check_folder_name(name)
    names = list(sections)
    if scheme == "section":
        if len(names) < 2:
            raise ValueError(f"the 'section' scheme needs at least 2 sections, got {names}; "
                             "a fold would have no training data.")
        return [Fold(s, (s,), tuple(o for o in names if o != s),
                     tuple(o for o in names if o != s)) for s in names]
    patients = list(dict.fromkeys(sections.values()))
    if len(patients) < 2:
        raise ValueError(
            f"the 'patient' scheme needs sections from at least 2 patients, got only "
            f"{patients}; holding out the only patient leaves no training data. Add "
            "sections of another patient or use scheme='section'.")
    folds = []
    for p in patients:
        test = tuple(s for s in names if sections[s] == p)
        rest = tuple(s for s in names if sections[s] != p)
        folds.append(Fold(p, test, rest, rest))
    return folds


def save_folds(folds: Sequence[Fold], path, *, scheme: str, sections: Mapping[str, str]) -> None:
    """Write folds to a JSON file (atomically).

    Parameters
    ----------
    folds
        From :func:`make_folds`.
    path
        Target file (e.g. ``results/folds.json``).
    scheme, sections
        Recorded alongside, as given to :func:`make_folds`.
    """
    _util.atomic_write_json(Path(path), {"scheme": scheme, "sections": dict(sections),
                                         "folds": [f.to_dict() for f in folds]})


def load_folds(path) -> list[Fold]:
    """Read folds written by :func:`save_folds`."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    with open(path) as fh:
        d = json.load(fh)
    if "folds" not in d:
        raise ValueError(f"{path} is not a folds file (no 'folds').")
    return [Fold.from_dict(f) for f in d["folds"]]


def patients_of(adatas: Mapping) -> dict[str, str]:
    """``{section: patient}`` from each section's ``obs['patient']``.

    Raises
    ------
    ValueError
        If a section lacks ``obs['patient']`` or holds several patients.
    """
    out = {}
    for s, a in adatas.items():
        if "patient" not in a.obs:
            raise ValueError(f"section {s!r} has no obs['patient']; load it with "
                             "mclstexp_lite.datasets or set obs['patient'] yourself.")
        values = a.obs["patient"].astype(str).unique()
        if len(values) != 1:
            raise ValueError(f"section {s!r} holds spots of several patients {list(values)}; "
                             "one patient per section is expected.")
        out[str(s)] = str(values[0])
    return out


def check_leakage(fold: Fold, patients: Mapping[str, str], scheme: str) -> None:
    """Refuse a fold whose training or reference data include what it tests."""
    seen = set(fold.train) | set(fold.reference)
    bad = set(fold.test) & seen
    if bad:
        raise RuntimeError(f"fold {fold.name}: test section(s) {sorted(bad)} are also in "
                           "training/reference; folds.json was edited or corrupted.")
    if scheme == "patient":
        test_patients = {patients[s] for s in fold.test}
        leaked = sorted(s for s in seen if patients[s] in test_patients)
        if leaked:
            raise RuntimeError(f"fold {fold.name}: section(s) {leaked} of held-out patient(s) "
                               f"{sorted(test_patients)} are in training/reference.")


def check_folder_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in '/\\:*?"<>|\0'):
        raise ValueError(f"{name!r} cannot be used as a fold folder name; rename the section "
                         "or patient (letters, digits, '_', '-', '.').")
