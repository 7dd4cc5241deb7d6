"""Tests for mclstexp_lite._folds: section and patient folds, the fold file, and the
leakage guard. A made-up study of six section names (no data)."""

from __future__ import annotations

import json

import pytest

from mclstexp_lite import cv


STUDY = {"A1": "A", "B1": "B", "B2": "B", "B3": "B", "C1": "C", "C2": "C"}


def test_section_folds_leave_one_out_and_keep_replicates():
    folds = cv.make_folds(STUDY, "section")
    assert [f.name for f in folds] == list(STUDY)
    for f in folds:
        assert f.test == (f.name,)
        assert f.train == tuple(s for s in STUDY if s != f.name)
        assert f.reference == f.train
    # the section-level leak: replicates of the held-out patient are in training
    b2 = next(f for f in folds if f.name == "B2")
    assert {"B1", "B3"} <= set(b2.train) and {"B1", "B3"} <= set(b2.reference)


def test_patient_folds_hold_out_every_section_of_the_patient():
    folds = cv.make_folds(STUDY, "patient")
    assert [f.name for f in folds] == ["A", "B", "C"]
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(STUDY)  # every section scored exactly once
    for f in folds:
        assert set(f.test) == {s for s, p in STUDY.items() if p == f.name}
        for s in set(f.train) | set(f.reference):
            assert STUDY[s] != f.name, f"{s} of patient {f.name} leaked into fold {f.name}"
        assert set(f.train) == set(STUDY) - set(f.test)


@pytest.mark.parametrize("sections, scheme, err, match", [
    (STUDY, "random", ValueError, "scheme must be one of"),
    ({"B1": "B", "B2": "B"}, "patient", ValueError, "at least 2 patients"),
    ({"B1": "B"}, "section", ValueError, "at least 2 sections"),
    ({"B/1": "B", "C1": "C"}, "section", ValueError, "folder name"),
    (["B1", "C1"], "section", TypeError, "mapping"),
    ({"B1": 1, "C1": "C"}, "section", TypeError, "str to str"),
])
def test_make_folds_errors(sections, scheme, err, match):
    with pytest.raises(err, match=match):
        cv.make_folds(sections, scheme)


def test_folds_file_round_trip(tmp_path):
    folds = cv.make_folds(STUDY, "patient")
    cv.save_folds(folds, tmp_path / "folds.json", scheme="patient", sections=STUDY)
    assert cv.load_folds(tmp_path / "folds.json") == folds
    assert json.loads((tmp_path / "folds.json").read_text())["sections"] == STUDY


def test_leakage_guard_refuses_an_edited_fold():
    bad = cv.Fold("B", ("B1", "B2"), ("A1", "B3"), ("A1", "B3"))
    with pytest.raises(RuntimeError, match="B3"):
        cv.check_leakage(bad, STUDY, "patient")
    cv.check_leakage(bad, STUDY, "section")  # allowed there: replicates may train
    with pytest.raises(RuntimeError, match="also in"):
        cv.check_leakage(cv.Fold("B1", ("B1",), ("B1",), ("A1",)), STUDY, "section")
