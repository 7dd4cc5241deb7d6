"""The tutorials: committed notebooks are clean and parameterised; bad parameters stop
early with a clear message; the quick profile runs every notebook end to end (papermill)
and each writes a metrics.json with the documented keys and sane values.

The end-to-end run takes several minutes on 2 CPU cores; it needs the real data
(MCLSTEXP_DATA) and is skipped with a reason otherwise. Set MCLSTEXP_SKIP_NOTEBOOKS=1 to
skip it while iterating on other tests.
"""

from __future__ import annotations

import json
import math
import os

import nbformat
import pytest
import yaml

from mclstexp_lite import tutorials, workflow

from .conftest import REPO, needs_data

NB_DIR = REPO / "notebooks"
EXPECTED = ["01_data_and_preprocessing", "02_training", "03_evaluation",
            "04_interpretation_immune_genes", "05_spatial_clustering",
            "06_predict_your_own_slide"]


def _params_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cells


def test_numbered_notebooks_exist():
    assert [p.stem for p in tutorials.notebooks()] == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_is_clean_and_parameterised(name):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "What you will" in nb.cells[0].source
    params = _params_cell(nb)
    assert len(params) == 1, f"{name}: exactly one cell tagged 'parameters'"
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: committed with outputs"
    # every profile's keys are parameters of the notebook (UPPER_CASE names)
    names = {line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line}
    assert all(n.isupper() for n in names)
    for prof in tutorials.available_profiles():
        keys = set(tutorials.load_profile(prof))
        assert keys <= names, f"{name}: profile {prof} sets unknown parameters {keys - names}"
    assert "OUTPUT_DIR" in names


def test_profiles_are_valid_yaml():
    from mclstexp_lite import train

    assert tutorials.available_profiles() == ["densenet_frozen", "paper", "quick"]
    for name in tutorials.available_profiles():
        prof = yaml.safe_load((NB_DIR / "profiles" / f"{name}.yaml").read_text())
        # the numbers belong to the library's one profile table, not to the YAML
        assert prof["PROFILE"] == name and name in train.PROFILES and name in workflow.PROFILES
        assert prof["EPOCHS"] is None and prof["BATCH_SIZE"] is None
    with pytest.raises(SystemExit, match="unknown profile 'nope'.*quick"):
        tutorials.load_profile("nope")


@needs_data
@pytest.mark.parametrize("kw, match", [
    (dict(sections=["Z9"]), "unknown her2st section"),
    (dict(sections=["C2", "C2"]), "twice"),
    (dict(dataset="mouse"), "DATASET='mouse'"),
    (dict(profile="fast"), "PROFILE='fast'"),
    (dict(epochs=0), "EPOCHS must be a positive integer"),
    (dict(batch_size=2.5), "BATCH_SIZE"),
    (dict(test_section="C9"), "TEST_SECTION"),
    (dict(sections=["B1", "C2"]), "lack local files.*B1"),
])
def test_bad_parameters_are_stopped_with_a_clear_message(kw, match):
    args = dict(dataset="her2st", sections=["C2", "C3"], profile="quick", epochs=1,
                batch_size=8, test_section=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        workflow.check_params(**args)


@needs_data
def test_bad_parameter_stops_the_notebook_in_its_first_cells(tmp_path):
    import papermill as pm

    out = tmp_path / "bad.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(NB_DIR / "01_data_and_preprocessing.ipynb"), str(out),
                            parameters={"EPOCHS": -1, "OUTPUT_DIR": str(tmp_path / "r")},
                            progress_bar=False, cwd=str(NB_DIR))
    assert "EPOCHS must be a positive integer" in str(err.value)
    nb = nbformat.read(out, as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(
        o.get("output_type") == "error" for o in c.get("outputs", []))]
    # it is the first cell after the parameters that fails: the one that checks them
    assert len(failed) == 1 and "check_params" in failed[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code.index(failed[0]) <= 2


def test_relative_path_variables_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"MCLSTEXP_DATA": "../shared/data", "MCLSTEXP_CACHE": "/abs/cache",
           "MCLSTEXP_MANIFEST": "m.csv", "OTHER": "rel"}
    changed = tutorials.absolute_path_variables(env)
    assert env["MCLSTEXP_DATA"] == str(tmp_path.parent / "shared" / "data")
    assert env["MCLSTEXP_MANIFEST"] == str(tmp_path / "m.csv")
    assert env["MCLSTEXP_CACHE"] == "/abs/cache" and env["OTHER"] == "rel"
    assert set(changed) == {"MCLSTEXP_DATA", "MCLSTEXP_MANIFEST"}


# ------------------------------------------------------------- running order (jobs)
def _transitive_needs(name, table):
    seen, todo = set(), list(table.get(name, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(table.get(n, ()))
    return seen


def test_needs_cover_what_each_notebook_reads():
    """Every notebook named in a notebook's code (its results folder, its model) is one it
    waits for, directly or through another; all wait for 01, which prepares the data."""
    import re

    assert set(tutorials.NEEDS) == set(EXPECTED)
    for name in EXPECTED:
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        named = set(re.findall(r"\b\d\d_[a-z_]+", code)) & set(EXPECTED) - {name}
        before = _transitive_needs(name, tutorials.NEEDS)
        assert named <= before, f"{name} reads {named - before} without waiting for it"
        if name != EXPECTED[0]:
            assert EXPECTED[0] in before, name
        assert all(EXPECTED.index(n) < EXPECTED.index(name) for n in before), name
    # a notebook the table does not know waits for all before it
    assert tutorials.needs(["01_a", "02_b", "03_c"]) == {
        "01_a": (), "02_b": ("01_a",), "03_c": ("01_a", "02_b")}


def _tiny_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell('OUTPUT_DIR = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_independent_notebooks_run_side_by_side_and_a_failure_stops_the_rest(
        tmp_path, monkeypatch, capfd):
    """SYNTHETIC notebooks a -> (b, c) -> d with two jobs: b and c overlap in time, each
    with its share of the threads (a, alone, with the default); c fails, so d, which
    needs it, never starts; the records say so. The kernels talk over IPC sockets on
    Linux: the terminal gets no "running over TCP without encryption" line per kernel."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    stamp = ("import os, time, pathlib\n"
             "out = pathlib.Path(OUTPUT_DIR)\n"
             "(out / '{n}.start').write_text(str(time.time()))\n"
             "(out / '{n}.threads').write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))\n"
             "time.sleep({sleep})\n"
             "{extra}"
             "(out / '{n}.end').write_text(str(time.time()))\n")
    for n, sleep, extra in (("a", 0, ""), ("b", 4, ""),
                            ("c", 2, "raise ValueError('c broke on purpose')\n"), ("d", 0, "")):
        _tiny_notebook(folder / f"0{'abcd'.index(n) + 1}_{n}.ipynb",
                       stamp.format(n=n, sleep=sleep, extra=extra))
    monkeypatch.setattr(tutorials, "NOTEBOOKS", folder)
    monkeypatch.setattr(tutorials, "NEEDS", {"01_a": (), "02_b": ("01_a",), "03_c": ("01_a",),
                                             "04_d": ("02_b", "03_c")})
    records = tutorials.run("quick", tmp_path / "out", jobs=2, progress=False)
    res = tmp_path / "out" / "quick" / "results"
    t = {f.name: float(f.read_text()) for f in res.glob("*.start")}
    t.update({f.name: float(f.read_text()) for f in res.glob("*.end")})
    assert [r["name"] for r in records] == ["01_a", "02_b", "03_c"]  # d never started
    assert [r["ok"] for r in records] == [True, True, False]
    assert "c broke on purpose" in records[2]["error"]
    assert not (res / "d.start").exists()
    assert t["a.end"] <= min(t["b.start"], t["c.start"])
    assert t["c.start"] < t["b.end"] and t["b.start"] < t["c.start"] + 2  # side by side
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert (res / "b.threads").read_text() == (res / "c.threads").read_text() == share
    assert (res / "a.threads").read_text() == os.environ.get("OMP_NUM_THREADS", "unset")
    assert records[0]["threads"] is None and records[1]["threads"] == int(share)
    executed = tmp_path / "out" / "quick" / "executed"
    assert sorted(p.name for p in executed.iterdir()) == ["01_a.ipynb", "02_b.ipynb",
                                                          "03_c.ipynb"]
    if os.name == "posix":
        assert "without encryption" not in capfd.readouterr().err
    with pytest.raises(ValueError, match="jobs"):
        tutorials.run("quick", tmp_path / "out2", jobs=0, progress=False)


# ---------------------------------------------------------------- full quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if os.environ.get("MCLSTEXP_SKIP_NOTEBOOKS") == "1":
        pytest.skip("MCLSTEXP_SKIP_NOTEBOOKS=1")
    from .conftest import SHARED_DATA

    if SHARED_DATA is None:
        pytest.skip("real data not found (set MCLSTEXP_DATA)")
    out = tmp_path_factory.mktemp("tutorials")
    # Give the data folder as a path relative to where the command runs, as users type
    # it (MCLSTEXP_DATA=../shared/data make tutorials): the kernels run in notebooks/,
    # so this works only because tutorials.run makes it absolute first.
    relative = os.path.relpath(SHARED_DATA, os.getcwd())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MCLSTEXP_DATA", relative)
        records = tutorials.run("quick", out, progress=False)
    return out / "quick", records


def _metrics(run, name):
    path = run[0] / "results" / name / "metrics.json"
    assert path.exists(), f"{name} wrote no metrics.json"
    return json.loads(path.read_text())


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
@needs_data
def test_quick_profile_runs_every_notebook(quick_run):
    out, records = quick_run
    assert [r["name"] for r in records] == EXPECTED
    assert all(r["ok"] for r in records), [r["error"] for r in records if not r["ok"]]
    index = (out / "index.html").read_text()
    for name in EXPECTED:
        assert (out / "executed" / f"{name}.ipynb").exists()
        assert (out / "html" / f"{name}.html").stat().st_size > 10_000
        assert f"html/{name}.html" in index
        assert list((out / "results" / name).glob("*.png")), f"{name} saved no figure"


@pytest.mark.slow
@needs_data
def test_metrics_01(quick_run):
    m = _metrics(quick_run, "01_data_and_preprocessing")
    assert m["n_sections"] == 7 and m["n_genes_panel"] == 785
    assert m["n_spots"] == 346 + 283 + 187 + 180 + 184 + 181 + 178  # A1 B4 C2 C3 C4 C5 C6
    assert 0 < m["panel_overlap"] <= 785 and 0 <= m["panel_jaccard"] <= 1
    assert m["patch_shape"] == [224, 224, 3]


@pytest.mark.slow
@needs_data
def test_metrics_02(quick_run):
    from mclstexp_lite import train

    m = _metrics(quick_run, "02_training")
    assert m["epochs"] == train.TrainConfig.profile("quick").epochs and m["n_train_spots"] > 1000
    assert _finite(m["final_loss"]) and m["final_loss"] < m["first_loss"]
    # the quick profile learns: its loss ends far below chance (ln batch) and on the
    # unseen section each patch's own spot ranks well above the middle
    assert m["final_loss"] < 0.5 * m["chance_loss"]
    # (measured 2026-11-30: median rank 48 of 180, top-10 hit rate 0.117 vs chance 0.056)
    assert 0 <= m["heldout_median_rank"] < 0.35 * m["heldout_n_spots"]
    assert m["heldout_top10_hit_rate"] > 1.5 * 10 / m["heldout_n_spots"]


@pytest.mark.slow
@needs_data
def test_metrics_03(quick_run):
    m = _metrics(quick_run, "03_evaluation")
    for k in ("heldout_pcc_acg", "heldout_pcc_heg"):
        assert -1 <= m[k] <= 1
    assert m["heldout_pcc_heg"] > 0.15  # learned: a shuffled reference bank gives ~0.01
    assert m["heldout_mse"] > 0 and m["heldout_mae"] > 0
    # the quick profile: one section fold (C3), every patient fold (A, B, C: leak-free)
    assert m["n_folds_section"] == 1 and m["n_folds_patient"] == 3
    for key, vals in m["cv"].items():
        assert vals["mse"] > 0 and vals["mae"] > 0, key
        if key.endswith("/mean"):  # a constant prediction has no correlation
            assert vals["pcc_acg"] is None, key
        else:
            assert -1 <= vals["pcc_acg"] <= 1 and -1 <= vals["pcc_heg"] <= 1, key


@pytest.mark.slow
@needs_data
def test_metrics_04(quick_run):
    m = _metrics(quick_run, "04_interpretation_immune_genes")
    assert m["n_genes_ranked"] > 700 and len(m["top10_genes"]) == 10
    assert "PTPRC" in m["immune_genes_in_panel"] and "FASN" in m["cancer_genes_in_panel"]
    assert -1 <= m["immune_mean_r"] <= 1


@pytest.mark.slow
@needs_data
def test_metrics_05(quick_run):
    m = _metrics(quick_run, "05_spatial_clustering")
    assert m["labelled_section"] == "A1" and m["n_classes"] == 6
    for k in ("ari_predicted_kmeans", "ari_measured_kmeans"):
        assert -0.5 <= m[k] <= 1
    for k in ("nmi_predicted_kmeans", "nmi_measured_kmeans", "nmi_positions_only",
              "nmi_random_regions_95"):
        assert 0 <= m[k] <= 1, k
    # the spatial-only baselines are in the table, and the verdict the prose reads is theirs
    assert {"none/positions only", "none/random regions, 95th percentile"} <= set(m["scores"])
    floor = max(m["nmi_positions_only"], m["nmi_random_regions_95"])
    assert m["predicted_beats_spatial_baseline"] == (m["nmi_predicted_kmeans"] > floor)


# ------------------------------------------------------- notebook 01 on own files
def _write_own_section(folder):
    """SYNTHETIC legacy-ST section: a 6 x 5 grid of spots 100 px apart (2 um/px, so the
    200 um pitch), 60 genes of random counts, an 800 x 700 px image with stained discs
    under the spots."""
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    xs, ys = (g.ravel() for g in np.meshgrid(np.arange(1, 7), np.arange(1, 6)))
    spots = pd.DataFrame({"x": xs, "y": ys, "pixel_x": xs * 100.0 + 20,
                          "pixel_y": ys * 100.0 + 30, "selected": 1})
    counts = pd.DataFrame(rng.poisson(rng.gamma(0.8, 4.0, (len(xs), 60))) + 1,
                          index=[f"{x}x{y}" for x, y in zip(xs, ys)],
                          columns=[f"GENE{i}" for i in range(60)])
    img = Image.new("RGB", (800, 700), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for x, y in zip(spots.pixel_x, spots.pixel_y):
        draw.ellipse((x - 48, y - 48, x + 48, y + 48), fill=(180, 80, 160))
    paths = {"COUNTS_PATH": folder / "counts.tsv", "SPOTS_PATH": folder / "spots.tsv",
             "IMAGE_PATH": folder / "he.png"}
    counts.to_csv(paths["COUNTS_PATH"], sep="\t")
    spots.to_csv(paths["SPOTS_PATH"], sep="\t", index=False)
    img.save(paths["IMAGE_PATH"])
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.slow
@needs_data  # the published HER2+ panel it compares with
def test_notebook_01_runs_on_own_files(tmp_path):
    """Notebook 01 with COUNTS_PATH, SPOTS_PATH, IMAGE_PATH (SYNTHETIC files written here)
    loads that section with from_files, picks a panel in its naming and writes it."""
    import papermill as pm

    if os.environ.get("MCLSTEXP_SKIP_NOTEBOOKS") == "1":
        pytest.skip("MCLSTEXP_SKIP_NOTEBOOKS=1")
    params = dict(_write_own_section(tmp_path), SECTION="S1", UM_PER_PX=2.0,
                  OUTPUT_DIR=str(tmp_path / "results"))
    pm.execute_notebook(str(NB_DIR / "01_data_and_preprocessing.ipynb"),
                        str(tmp_path / "own.ipynb"), parameters=params, progress_bar=False,
                        cwd=str(NB_DIR))
    out = tmp_path / "results" / "01_data_and_preprocessing"
    m = json.loads((out / "metrics.json").read_text())
    assert m["own_files"] is True and m["sections"] == ["S1"] and m["n_spots"] == 30
    assert m["n_genes_panel"] == m["n_genes_recipe"] == 60  # its own genes, not HER2+'s
    assert m["patch_shape"] == [224, 224, 3]
    import anndata as ad

    prepared = ad.read_h5ad(out / "prepared_S1.h5ad")
    assert prepared.n_obs == 30 and prepared.uns["spatial"]["S1"]["metadata"]["um_per_px"] == 2.0
    assert not (tmp_path / "results" / "prepared").exists()  # the tutorial's are untouched


@pytest.mark.parametrize("kw, match", [
    (dict(image=None), "IMAGE_PATH is None"),
    (dict(counts="nope.tsv"), r"COUNTS_PATH='nope\.tsv': no such file.*absolute path"),
    (dict(um_per_px=0), "UM_PER_PX must be a positive number"),
    (dict(section=""), "SECTION must be a non-empty name"),
])
def test_bad_own_file_parameters_are_stopped_with_a_clear_message(tmp_path, kw, match):
    paths = _write_own_section(tmp_path)
    args = dict(counts=paths["COUNTS_PATH"], spots=paths["SPOTS_PATH"],
                image=paths["IMAGE_PATH"], section="S1", um_per_px=None)
    args.update(kw)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        workflow.check_own_files(args.pop("counts"), args.pop("spots"), args.pop("image"), **args)


@pytest.mark.slow
@needs_data
def test_metrics_06(quick_run):
    m = _metrics(quick_run, "06_predict_your_own_slide")
    # C3's image alone: virtual spots over its tissue, about as many as were measured
    assert 150 <= m["n_virtual_spots"] <= 220 and 5 < m["tissue_mm2"] < 10
    assert m["image_only_n_spots"] >= 0.9 * 180 and m["at_spots_n_spots"] == 180
    # the image-only prediction agrees with the measurement beyond chance (a shuffled
    # reference gives PCC-HEG ~0.01); measured 2026-11-30: 0.29 image only, 0.26 at spots
    assert m["image_only_pcc_heg"] > 0.15 and m["at_spots_pcc_heg"] > 0.15
    assert m["median_gene_pcc"] > 0
    assert m["prediction"].endswith(".h5ad") and m["predict_seconds"] > 0
    # the prediction beats the best of its shuffled-reference runs (the checkpoint's bar)
    assert m["image_only_pcc_heg"] > m["image_only_pcc_heg_shuffled_max"]
    # "a new section, not a new patient": C3's patient (C) is in the bank, and the numbers
    # for a new patient come from 03's patient folds
    assert m["bank_sections_same_patient"] == ["C2", "C4", "C5", "C6"]
    assert "C3" not in m["reference_sections"] and 0 < m["neighbours_same_patient"] <= 1
    assert _finite(m["new_patient_pcc_heg_mean"]) and len(m["new_patient_sections"]) >= 3



@needs_data
def test_prepared_sections_uses_already_loaded_sections(her2_c2, tmp_path, monkeypatch):
    """Notebook 01 hands its loaded sections to prepared_sections (no second read of the
    count and image files); the result equals preparing a fresh load, and the section
    handed in is left as it was."""
    import numpy as np

    from mclstexp_lite import datasets

    before = her2_c2.copy()
    fresh = workflow.prepared_sections("her2st", ["C2"], output_dir=tmp_path / "a",
                                       progress=False)["C2"]

    def no_load(*args, **kwargs):
        raise AssertionError("the section was loaded again")

    monkeypatch.setattr(datasets, "load", no_load)
    given = workflow.prepared_sections("her2st", ["C2"], output_dir=tmp_path / "b",
                                       raw={"C2": her2_c2}, progress=False)["C2"]
    assert given.obs_names.equals(fresh.obs_names) and given.var_names.equals(fresh.var_names)
    np.testing.assert_array_equal(given.X.toarray(), fresh.X.toarray())
    np.testing.assert_array_equal(given.obsm["spatial"], fresh.obsm["spatial"])
    assert given.uns["mclstexp_prepared"] == fresh.uns["mclstexp_prepared"]
    assert (tmp_path / "b" / "prepared" / "her2st_C2.h5ad").exists()
    assert her2_c2.n_vars == before.n_vars and her2_c2.obs.equals(before.obs)
    assert (her2_c2.X != before.X).nnz == 0


def test_cell_times_tool_reads_papermill_durations(tmp_path, capsys):
    """tools/cell_times.py: the total and the slowest code cells of an executed notebook
    (SYNTHETIC notebook with papermill's per-cell durations)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cell_times", REPO / "tools" / "cell_times.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    nb = nbformat.v4.new_notebook()
    for src, secs in (("a = 1", 0.5), ("\nimport time\ntime.sleep(3)", 3.25), ("b = 2", 1.0)):
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["papermill"] = {"duration": secs}
        nb.cells.append(cell)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("text"))
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert tool.main([str(path), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "x.ipynb: 4.8 s in 3 code cells"
    assert "3.2 s  cell  2  import time" in lines[1] and "1.0 s  cell  3  b = 2" in lines[2]
    assert len(lines) == 3
    (tmp_path / "bad.ipynb").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.ipynb: not a readable notebook"):
        tool.main([str(tmp_path / "bad.ipynb")])
