"""Cross-validation runs: the patient rule end to end, the results folder (refusals,
resume, cached embeddings), section prediction (``tl.predict_section``) and rescoring.
Folds are tested in test_folds.py, results tables in test_results.py.

Data here are SYNTHETIC: tiny random sections (random RGB images, random expression,
a few dozen spots) built by ``factories.synthetic_sections``; they test bookkeeping, not
biology. The real-data study is ``tools/run_results.py`` (docs/results.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mclstexp_lite import _util, cv, metrics, tl
from mclstexp_lite import train as tr

from .factories import GENES, PATIENTS, RUN, SPOTS, synthetic_sections, tiny_config


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    torch.set_num_threads(2)
    return synthetic_sections(tmp_path_factory.mktemp("synthetic_images"))


@pytest.fixture(scope="module")
def patient_run(sections, tmp_path_factory):
    """One complete mclSTExp run under the patient scheme (2 folds, 2 trainings)."""
    out = tmp_path_factory.mktemp("runs") / "patient_mclstexp"
    df = cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
                   out_dir=out, **RUN)
    return out, df


def test_method_config():
    cfg = tiny_config()
    assert cv.method_config("bleep", cfg).model["spot_encoder"] == "none"
    assert cv.method_config("mclstexp", cfg) is cfg
    with pytest.raises(ValueError, match="method='bleep'"):
        cv.method_config("mclstexp", tiny_config(model={"image_arch": "resnet18",
                                                        "weights": None,
                                                        "spot_encoder": "none"}))
    with pytest.raises(ValueError, match="method must be one of"):
        cv.method_config("knn", cfg)


# ================================================================ end-to-end runs
def test_patient_run_respects_the_patient_rule(patient_run, sections):
    """The sections whose spots entered the reference bank never include the held-out
    patient: read back from embeddings.npz and from each prediction's uns."""
    import anndata as ad

    out, df = patient_run
    folds = cv.load_folds(out)
    assert [f.name for f in folds] == ["P", "Q"]
    for f in folds:
        emb = np.load(out / f.name / "embeddings.npz")
        bank = set(emb["reference_sections"].tolist())
        assert bank == set(f.reference)
        assert all(PATIENTS[s] != f.name for s in bank)
        names = emb["reference_obs_names"].tolist()
        assert all(PATIENTS[n.split("_")[0]] != f.name for n in names)
        assert len(names) == sum(SPOTS[s] for s in f.reference)
        for s in f.test:
            p = ad.read_h5ad(out / f.name / f"pred_{s}.h5ad")
            info = p.uns[tl.PREDICTION_KEY]
            assert all(PATIENTS[r] != f.name for r in info["reference_sections"])
            assert all(PATIENTS[r] != f.name for r in info["train_sections"])
            assert info["test_section"] == s and info["top_k"] == RUN["top_k"]
    assert sorted(df["test_section"]) == sorted(SPOTS)


def test_section_run_keeps_replicates_in_the_bank(sections, tmp_path):
    out = tmp_path / "section"
    cv.run_cv(sections, scheme="section", method="mclstexp", config=tiny_config(mode="full"),
              out_dir=out, folds=["S1"], **RUN)
    emb = np.load(out / "S1" / "embeddings.npz")
    assert set(emb["reference_sections"].tolist()) == {"S2", "S3"}  # S2: same patient as S1


def test_results_folder_layout_and_metrics(patient_run, sections):
    """metrics.csv equals the metrics recomputed from the written predictions."""
    import anndata as ad

    out, df = patient_run
    for name in ("config.json", "folds.json", "metrics.csv", "summary.csv", "summary.md"):
        assert (out / name).exists(), name
    for fold in ("P", "Q"):
        for name in ("checkpoint.pt", "embeddings.npz", "metrics.json", "history.json"):
            assert (out / fold / name).exists(), name
    assert list(df.columns) == list(cv.ROW_COLUMNS)
    pd.testing.assert_frame_equal(cv.load_results(out), df, check_dtype=False)
    for _, row in df.iterrows():
        pred = ad.read_h5ad(out / row["fold"] / f"pred_{row['test_section']}.h5ad")
        truth = sections[row["test_section"]]
        m = metrics.section_metrics(pred.X, truth.X, n_heg=RUN["n_heg"])
        for c in ("pcc_acg", "pcc_heg", "mse", "mae"):
            assert row[c] == pytest.approx(m[c], rel=1e-12)
        assert row["n_spots"] == truth.n_obs and row["n_genes"] == GENES
        assert row["seconds"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scheme"] == "patient" and cfg["method"] == "mclstexp" and cfg["top_k"] == 5
    assert cfg["train_config"] == tiny_config().to_dict()
    assert cfg["genes"]["n"] == GENES and set(cfg["data"]) == set(SPOTS)
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "n_sections"] == 3 and summary.loc[0, "n_folds"] == 2
    assert summary.loc[0, "mse_mean"] == pytest.approx(df["mse"].mean())
    assert summary.loc[0, "mse_sd"] == pytest.approx(df["mse"].std(ddof=1))
    assert "± " in (out / "summary.md").read_text()
    # where the retrieved neighbours come from, per held-out section
    nb = pd.read_csv(out / "neighbours.csv", dtype={"test_section": str})
    pd.testing.assert_frame_equal(nb, cv.neighbour_shares(out), check_dtype=False)
    assert sorted(nb["test_section"]) == sorted(SPOTS) and (nb["neighbours_same_patient"] == 0).all()
    assert "neighbours from same patient" in (out / "summary.md").read_text()
    # atomic writes keep ordinary file permissions (mkstemp alone would give 0600)
    for f in (out / "metrics.csv", out / "config.json", out / "P" / "pred_S1.h5ad",
              out / "P" / "embeddings.npz"):
        assert f.stat().st_mode & 0o777 == _util._umask_mode(), f


def test_complete_folder_is_read_back_not_recomputed(patient_run, sections, monkeypatch):
    """Every asked-for fold complete: run_cv returns the finished table and writes
    nothing (no training, no file touched)."""
    out, df = patient_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as mp:
        def forbidden(*a, **k):
            raise AssertionError("a complete fold was run again")

        mp.setattr(cv, "_run_fold", forbidden)
        again = cv.run_cv(sections, scheme="patient", method="mclstexp",
                          config=tiny_config(), out_dir=out, **RUN)
        one = cv.run_cv(sections, scheme="patient", method="mclstexp",
                        config=tiny_config(), out_dir=out, folds=["Q"], **RUN)
    pd.testing.assert_frame_equal(again, df)
    pd.testing.assert_frame_equal(one, df)  # the folder's table, all completed folds
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_cv_or_load_reads_a_complete_folder_and_refuses_another_configuration(
        patient_run, sections):
    """workflow.cv_or_load: the asked-for folds' rows of a complete folder, read back
    through run_cv (no FileExistsError to catch); another configuration stays an error."""
    from mclstexp_lite import workflow

    out, df = patient_run
    kw = dict(scheme="patient", method="mclstexp", config=tiny_config(), out_dir=out,
              top_k=RUN["top_k"], progress=False)
    run = {k: RUN[k] for k in ("n_heg", "device", "patch_um", "patch_size")}
    with pytest.MonkeyPatch.context() as mp:  # cv_or_load passes only its own arguments
        mp.setattr(cv, "run_cv", lambda *a, _run=cv.run_cv, **k: _run(*a, **k, **run))
        pd.testing.assert_frame_equal(workflow.cv_or_load(sections, **kw), df)
        only_q = workflow.cv_or_load(sections, folds="Q", **kw)
        assert list(only_q["fold"]) == ["Q"] and list(only_q["test_section"]) == ["S3"]
        with pytest.raises(ValueError, match="different configuration.*lr"):
            workflow.cv_or_load(sections, **dict(kw, config=tiny_config(lr=5e-4)))


def test_different_config_is_refused(patient_run, sections):
    out, _ = patient_run
    with pytest.raises(ValueError, match="different configuration.*top_k: 5 -> 7"):
        cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
                  out_dir=out, **{**RUN, "top_k": 7})
    with pytest.raises(ValueError, match="different configuration.*lr"):
        cv.run_cv(sections, scheme="patient", method="mclstexp",
                  config=tiny_config(lr=5e-4), out_dir=out, **RUN)


def test_foreign_folder_is_refused(sections, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a run_cv results folder"):
        cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(),
                  out_dir=tmp_path, **RUN)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_interrupted_run_continues(sections, tmp_path, monkeypatch):
    """Run one fold, then all: the finished fold is skipped (not retrained, files
    untouched) and the other is trained."""
    out = tmp_path / "run"
    first = cv.run_cv(sections, scheme="patient", method="bleep", config=tiny_config(),
                      out_dir=out, folds=["P"], **RUN)
    assert sorted(first["fold"]) == ["P", "P"]
    done = out / "P" / "metrics.json"
    stamp = done.stat().st_mtime_ns
    trained = []
    real_train = tr.train

    def counting_train(data, *a, **k):
        trained.append(tuple(data.sections))
        return real_train(data, *a, **k)

    monkeypatch.setattr(tr, "train", counting_train)
    full = cv.run_cv(sections, scheme="patient", method="bleep", config=tiny_config(),
                     out_dir=out, **RUN)
    assert trained == [("S1", "S2")]  # only fold Q (trained on patient P: S1, S2)
    assert done.stat().st_mtime_ns == stamp
    assert sorted(full["fold"]) == ["P", "P", "Q"]
    ck = tr.load_checkpoint(out / "Q")
    assert ck["model_config"]["spot_encoder"] == "none"


def test_rerun_reuses_embeddings_and_checkpoint(sections, tmp_path, monkeypatch):
    """A fold interrupted after its embeddings were saved: the rerun neither trains
    nor embeds again, and predicts the same."""
    import anndata as ad

    out = tmp_path / "run"
    cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
              out_dir=out, folds=["Q"], **RUN)
    fold = out / "Q"
    before = ad.read_h5ad(fold / "pred_S3.h5ad").X
    ckpt_stamp = (fold / "checkpoint.pt").stat().st_mtime_ns
    emb_stamp = (fold / "embeddings.npz").stat().st_mtime_ns
    for name in ("metrics.json", "pred_S3.h5ad"):
        (fold / name).unlink()

    def forbidden(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(tr, "embed_images", forbidden)
    monkeypatch.setattr(tl, "embed_reference", forbidden)
    df = cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
                   out_dir=out, folds=["Q"], **RUN)
    assert (fold / "checkpoint.pt").stat().st_mtime_ns == ckpt_stamp
    assert (fold / "embeddings.npz").stat().st_mtime_ns == emb_stamp
    np.testing.assert_array_equal(ad.read_h5ad(fold / "pred_S3.h5ad").X, before)
    assert list(df["test_section"]) == ["S3"]


def test_a_finished_run_of_the_same_training_is_reused(patient_run, sections, tmp_path,
                                                       monkeypatch):
    """reuse={fold: run}: a finished run of exactly the fold's training is copied in, not
    trained again, and predicts as the fold's own training did; a run of another config
    (seed), or for a method it was not trained as (bleep), is not taken."""
    import anndata as ad

    src_out, _ = patient_run
    src = src_out / "Q"  # trained on P's sections (S1, S2), predicts S3
    with monkeypatch.context() as mp:
        def forbidden(*a, **k):
            raise AssertionError("trained although a finished run was given")

        mp.setattr(tr, "save_checkpoint", forbidden)
        cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
                  out_dir=tmp_path / "reused", folds=["Q"], reuse={"Q": src}, **RUN)
    fold = tmp_path / "reused" / "Q"
    assert (fold / "checkpoint.pt").read_bytes() == (src / "checkpoint.pt").read_bytes()
    assert json.loads((fold / "history.json").read_text()) == json.loads(
        (src / "history.json").read_text())
    assert json.loads((fold / "metrics.json").read_text())["reused_from"] == str(
        (src / "checkpoint.pt").resolve())
    np.testing.assert_allclose(ad.read_h5ad(fold / "pred_S3.h5ad").X,
                               ad.read_h5ad(src / "pred_S3.h5ad").X, rtol=1e-6, atol=1e-6)

    for method, cfg, name in (("mclstexp", tiny_config(seed=2), "other_seed"),
                              ("bleep", tiny_config(), "bleep")):
        cv.run_cv(sections, scheme="patient", method=method, config=cfg,
                  out_dir=tmp_path / name, folds=["Q"], reuse={"Q": src}, **RUN)
        fold = tmp_path / name / "Q"
        assert json.loads((fold / "metrics.json").read_text())["reused_from"] is None
        assert (fold / "checkpoint.pt").read_bytes() != (src / "checkpoint.pt").read_bytes()
        assert tr.load_checkpoint(fold / "checkpoint.pt")["config"] == cv.method_config(
            method, cfg).to_dict()


def test_stale_embeddings_are_recomputed(sections, tmp_path):
    """An embeddings.npz from other weights (checkpoint hash differs) is not used."""
    out = tmp_path / "run"
    cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
              out_dir=out, folds=["Q"], **RUN)
    fold = out / "Q"
    z = dict(np.load(fold / "embeddings.npz"))
    z["checkpoint_sha256"] = np.array("0" * 64)
    z["reference"] = np.zeros_like(z["reference"])
    np.savez(fold / "embeddings.npz", **z)
    (fold / "metrics.json").unlink()
    cv.run_cv(sections, scheme="patient", method="mclstexp", config=tiny_config(),
              out_dir=out, folds=["Q"], **RUN)
    again = np.load(fold / "embeddings.npz")
    assert str(again["checkpoint_sha256"]) != "0" * 64
    assert np.abs(again["reference"]).sum() > 0


def test_overwrite_recomputes(sections, tmp_path):
    out = tmp_path / "run"
    cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(), out_dir=out,
              **RUN)
    stamp = (out / "Q" / "metrics.json").stat().st_mtime_ns
    cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(), out_dir=out,
              overwrite=True, **RUN)
    assert (out / "Q" / "metrics.json").stat().st_mtime_ns != stamp


def test_no_partial_files_when_a_write_fails(sections, tmp_path, monkeypatch):
    import anndata as ad

    def broken(self, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        cv.run_cv(sections, scheme="patient", method="mean", config=tiny_config(),
                  out_dir=out, **RUN)
    leftovers = [p.name for p in (out / "P").iterdir()]
    assert leftovers == []  # no half-written prediction, no metrics.json


# ============================================================== predict_section
def test_predict_section_is_retrieval_aligned_with_truth(patient_run, sections, tmp_path):
    """predict_section == retrieve(embed_images, embed_spots per section, ref expr),
    laid out like the truth, and survives an h5ad round trip."""
    import anndata as ad

    out, _ = patient_run
    model = tr.load_model(out / "Q")
    cfg = tiny_config()
    geo = dict(patch_um=RUN["patch_um"], patch_size=RUN["patch_size"], progress=False)
    ref = tr.SpotData.from_anndata({s: sections[s] for s in ("S1", "S2")}, **geo)
    test = tr.SpotData.from_anndata({"S3": sections["S3"]}, **geo)
    truth = sections["S3"]
    pred = tl.predict_section(model, ref, truth, config=cfg, top_k=4, test_data=test,
                              device="cpu")
    q = tr.embed_images(model, test, config=cfg, device="cpu", progress=False)
    keys = np.concatenate([tr.embed_spots(model, tr.SpotData(
        patches=[ref.patches[i]], expr=ref.expr[ref.groups == i], pos=ref.pos[ref.groups == i],
        groups=np.zeros((ref.groups == i).sum(), dtype=np.int64), sections=[ref.sections[i]],
        genes=ref.genes, obs_names=[n for n, g in zip(ref.obs_names, ref.groups) if g == i]),
        device="cpu") for i in range(2)])
    expected = tl.retrieve(q, keys, ref.expr, top_k=4)
    np.testing.assert_allclose(pred.X, expected, rtol=1e-5, atol=1e-6)
    assert pred.X.dtype == np.float32
    assert list(pred.obs_names) == list(truth.obs_names)
    assert list(pred.var_names) == list(truth.var_names)
    np.testing.assert_array_equal(pred.obsm["spatial"], truth.obsm["spatial"])
    np.testing.assert_array_equal(pred.uns["spatial"]["S3"]["images"]["hires"],
                                  truth.uns["spatial"]["S3"]["images"]["hires"])
    pd.testing.assert_frame_equal(pred.obs, truth.obs)
    info = pred.uns[tl.PREDICTION_KEY]
    assert info["reference_sections"] == ["S1", "S2"]
    assert info["reference_n_spots"] == [SPOTS["S1"], SPOTS["S2"]]
    assert info["top_k"] == 4 and info["test_section"] == "S3"
    pred.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_array_equal(back.X, pred.X)
    assert list(back.obs_names) == list(truth.obs_names)
    np.testing.assert_array_equal(back.obsm["spatial"], truth.obsm["spatial"])
    assert list(back.uns[tl.PREDICTION_KEY]["reference_sections"]) == ["S1", "S2"]
    # precomputed embeddings give the same answer without a model
    again = tl.predict_section(None, ref, truth, config=cfg, top_k=4, image_emb=q,
                               reference_emb=keys)
    np.testing.assert_allclose(again.X, expected, rtol=1e-6)


def test_predict_section_errors(sections):
    geo = dict(patch_um=RUN["patch_um"], patch_size=RUN["patch_size"], progress=False)
    ref = tr.SpotData.from_anndata({"S1": sections["S1"]}, **geo)
    other = sections["S3"][:, list(range(GENES))[::-1]].copy()  # same genes, other order
    with pytest.raises(ValueError, match="different genes"):
        tl.predict_section(None, ref, other, config=tiny_config(), top_k=2)
    with pytest.raises(ValueError, match="model.*is None"):
        tl.predict_section(None, ref, sections["S3"], config=tiny_config(), top_k=2)
    with pytest.raises(TypeError, match="SpotData"):
        tl.predict_section(None, {"S1": sections["S1"]}, sections["S3"], config=tiny_config())
    with pytest.raises(ValueError, match="shape"):
        tl.prediction_anndata(np.zeros((3, 3)), sections["S3"], info={})


# ========================================================================= rescore
def test_rescore_with_the_same_top_k_reproduces_the_run(patient_run, sections, tmp_path):
    out, df = patient_run
    same = cv.rescore(sections, out, top_k=RUN["top_k"], out_dir=tmp_path / "k5",
                      progress=False, device="cpu")
    for c in ("pcc_acg", "pcc_heg", "mse", "mae"):
        np.testing.assert_allclose(same[c], df[c], rtol=1e-6)
    other = cv.rescore(sections, out, top_k=2, out_dir=tmp_path / "k2", progress=False,
                       device="cpu")
    assert not np.allclose(other["mse"], df["mse"])
    shuffled = {s: a.copy() for s, a in sections.items()}
    shuffled["S1"].X = shuffled["S1"].X[::-1].copy()
    with pytest.raises(ValueError, match="not the sections"):
        cv.rescore(shuffled, out, top_k=2, out_dir=tmp_path / "bad")
    table = cv.compare([out, tmp_path / "k2"])
    assert list(table["top_k"]) == [2, 5]
    assert set(table["method"]) == {"mclstexp"} and (table["n_sections"] == 3).all()
    md = cv.summary_markdown(table)
    assert md.count("\n") == 3 and "PCC-HEG" in md
    assert "left_out" not in table.columns  # both runs scored every section


def test_run_cv_argument_errors(sections, tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of"):
        cv.run_cv(sections, scheme="loso", config=tiny_config(), out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="unknown fold"):
        cv.run_cv(sections, scheme="patient", config=tiny_config(), out_dir=tmp_path / "a",
                  folds=["R"], **RUN)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        cv.run_cv(sections, scheme="patient", config=tiny_config(), out_dir=tmp_path / "a",
                  **{**RUN, "top_k": 0})
    bad = dict(sections)
    bad["S2"] = sections["S2"][:, :3].copy()
    with pytest.raises(ValueError, match="other genes"):
        cv.run_cv(bad, scheme="patient", config=tiny_config(), out_dir=tmp_path / "a", **RUN)
    with pytest.raises(TypeError, match="TrainConfig"):
        cv.run_cv(sections, scheme="patient", config={"epochs": 1}, out_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="run_cv"):
        cv.load_results(tmp_path / "nothing")
    assert not (tmp_path / "a").exists()


def test_input_options_through_run_cv_rescore_and_the_probe(sections, tmp_path):
    """SYNTHETIC: a run with centred expression and neighbourhood context rescores to
    the same metrics (rescore centres its bank too) and writes its neighbour shares from
    the source's embeddings; the probe with the same config reads the same two blocks."""
    cfg = tiny_config(expr_norm="center", context="mean", context_um=60.0)
    out = tmp_path / "options"
    df = cv.run_cv(sections, scheme="patient", method="mclstexp", config=cfg, out_dir=out,
                   **RUN)
    same = cv.rescore(sections, out, top_k=RUN["top_k"], out_dir=tmp_path / "re",
                      progress=False, device="cpu")
    for c in ("pcc_acg", "pcc_heg", "mse", "mae"):
        np.testing.assert_allclose(same[c], df[c], rtol=1e-6)
    assert (tmp_path / "re" / "neighbours.csv").exists()
    pd.testing.assert_frame_equal(cv.neighbour_shares(tmp_path / "re"),
                                  cv.neighbour_shares(out))
    ridge = tmp_path / "ridge"
    cv.run_cv(sections, scheme="patient", method="ridge_features", config=cfg, out_dir=ridge,
              **RUN)
    with np.load(ridge / "P" / "embeddings.npz") as z:
        assert z["train"].shape[1] == 2 * 512  # ResNet-18 features and their neighbourhood

