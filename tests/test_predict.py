"""Saved predictors, image-only prediction, the command line, and their bad inputs.

A tiny model (ResNet-18, random init, 32 px, one epoch) is trained on SYNTHETIC sections
(tests/factories.py) and predicts a SYNTHETIC slide (tests/test_slides.py): these tests
check plumbing and safety, not prediction quality (notebook 06 does that on real data).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mclstexp_lite import pl, predict, tl
from mclstexp_lite import train as tr

from .factories import RUN, synthetic_sections, tiny_config
from .test_slides import UM, synthetic_slide

LAYOUT = dict(patch_um=RUN["patch_um"], patch_size=RUN["patch_size"], spot_pitch_um=100.0,
              spot_diameter_um=55.0, grid="hex", top_k=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("predict")
    sections = synthetic_sections(d / "sections", spots={"S1": 40, "S2": 36, "S3": 30},
                                  patients={"S1": "P", "S2": "P", "S3": "Q"})
    ref = {k: sections[k] for k in ("S1", "S2")}
    data = tr.SpotData.from_anndata(ref, patch_um=RUN["patch_um"], patch_size=RUN["patch_size"],
                                    progress=False)
    model = tr.train(data, tiny_config(), progress=False).model
    p = predict.build_predictor(model, data, **LAYOUT)
    path = predict.save_predictor(p, d / "tiny.predictor.pt")
    img = synthetic_slide()
    Image.fromarray(img).save(d / "slide.png")
    return {"dir": d, "sections": sections, "data": data, "model": model, "predictor": p,
            "path": path, "slide": d / "slide.png"}


def test_a_saved_predictor_predicts_like_the_model_it_came_from(trained):
    loaded = predict.load_predictor(trained["path"])
    assert loaded.genes == list(trained["data"].genes)
    assert loaded.info["reference_sections"] == ["S1", "S2"] and loaded.info["grid"] == "hex"
    test = trained["sections"]["S3"]
    got = loaded.predict(test, device="cpu", progress=False)
    test_data = tr.SpotData.from_anndata({"S3": test}, patch_um=RUN["patch_um"],
                                         patch_size=RUN["patch_size"], progress=False)
    want = tl.predict_section(trained["model"], trained["data"], test, top_k=5, device="cpu",
                              test_data=test_data)
    assert got.n_obs == test.n_obs and list(got.var_names) == list(test.var_names)
    np.testing.assert_allclose(got.X, want.X, rtol=1e-5, atol=1e-6)


def test_predict_section_and_a_predictor_take_one_path(trained):
    """The same model, reference and section: tl.predict_section and Predictor.predict
    give identical predictions and record the same info (a predictor adds only its own
    keys, predict.PREDICTOR_KEYS), with the same values."""
    p = predict.build_predictor(trained["model"], trained["data"], **LAYOUT)
    test = trained["sections"]["S3"]
    got = p.predict(test, device="cpu", progress=False)
    test_data = tr.SpotData.from_anndata({"S3": test}, patch_um=RUN["patch_um"],
                                         patch_size=RUN["patch_size"], progress=False)
    want = tl.predict_section(trained["model"], trained["data"], test, top_k=5, device="cpu",
                              test_data=test_data)
    np.testing.assert_array_equal(got.X, want.X)
    assert list(got.var_names) == list(want.var_names) and got.obs.equals(want.obs)
    rec, ref = got.uns[tl.PREDICTION_KEY], want.uns[tl.PREDICTION_KEY]
    assert set(rec) - set(ref) == set(predict.PREDICTOR_KEYS) and set(ref) <= set(rec)
    assert {k: rec[k] for k in ref} == ref
    assert ref["image_only"] is False and ref["test_section"] == "S3"
    assert ref["reference_sections"] == ["S1", "S2"] and ref["n_reference"] == 76


def test_prediction_maps_live_in_pl_and_the_former_name_warns_once(trained):
    """pl.prediction_maps draws a prediction's genes (a figure, so in pl); the former
    predict.plot_prediction warns once and draws the same."""
    import warnings

    import matplotlib.pyplot as plt

    pred = trained["predictor"].predict(trained["sections"]["S3"], device="cpu",
                                        progress=False)
    fig = pl.prediction_maps(pred, n_genes=2)
    assert len([a for a in fig.axes if a.get_title()]) >= 2
    with pytest.raises(ValueError, match="not in the prediction's"):
        pl.prediction_maps(pred, ["NOPE"])
    predict.plot_prediction.warned = False
    with pytest.warns(FutureWarning, match="use pl.prediction_maps"):
        old = predict.plot_prediction(pred, n_genes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        plt.close(predict.plot_prediction(pred, n_genes=2))
    assert [a.get_title() for a in old.axes] == [a.get_title() for a in fig.axes]
    plt.close("all")


def test_the_file_loads_without_unpickling_code(trained):
    obj = torch.load(trained["path"], weights_only=True)  # raises if anything needs pickle
    assert obj["format"] == predict.FORMAT
    assert obj["reference_emb"].shape[0] == obj["reference_expr"].shape[0] == len(trained["data"])


def test_predict_image_writes_h5ad_and_figure(trained):
    import anndata as ad

    out, fig = trained["dir"] / "pred.h5ad", trained["dir"] / "pred.png"
    pred = predict.predict_image(trained["path"], trained["slide"], um_per_px=UM, out=out,
                                 figure=fig, progress=False, device="cpu")
    assert pred.n_vars == len(trained["data"].genes) and pred.n_obs > 50
    back = ad.read_h5ad(out)
    assert back.uns["mclstexp_prediction"]["image_only"]
    assert list(back.var_names) == list(pred.var_names)
    np.testing.assert_array_equal(back.X, pred.X)
    assert fig.stat().st_size > 5_000
    # outputs are never silently replaced
    with pytest.raises(FileExistsError, match="pred.h5ad exists.*overwrite"):
        predict.predict_image(trained["path"], trained["slide"], um_per_px=UM, out=out,
                              progress=False)


def test_command_line(trained, capsys):
    out = trained["dir"] / "cli" / "slide.h5ad"
    rc = predict.main(["--model", str(trained["path"]), "--image", str(trained["slide"]),
                       "--um-per-px", str(UM), "--out", str(out), "--no-progress",
                       "--device", "cpu", "--genes", "g0", "g1"])
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and out.with_suffix(".png").exists()
    assert "predicted 6 genes" in capsys.readouterr().out


def test_command_line_bad_input_leaves_nothing(trained, tmp_path, capsys):
    Image.fromarray(np.full((300, 400, 3), 240, np.uint8)).save(tmp_path / "glass.png")
    out = tmp_path / "o.h5ad"
    rc = predict.main(["--model", str(trained["path"]), "--image", str(tmp_path / "glass.png"),
                       "--um-per-px", "2", "--out", str(out), "--no-progress"])
    assert rc == 2 and "no tissue found" in capsys.readouterr().err
    rc = predict.main(["--model", str(trained["path"]), "--image", str(trained["slide"]),
                       "--out", str(out), "--no-progress"])
    assert rc == 2 and "does not state its pixel size" in capsys.readouterr().err
    rc = predict.main(["--model", str(trained["path"]), "--image", str(trained["slide"]),
                       "--um-per-px", "2", "--out", str(out), "--genes", "NOPE"])
    assert rc == 2 and "NOPE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glass.png"]


def test_bad_predictor_files(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictor file"):
        predict.load_predictor(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read the predictor.*junk.pt"):
        predict.load_predictor(tmp_path / "junk.pt")
    # a training checkpoint is not a predictor: the message says how to make one
    run = tmp_path / "run"
    tr.train(trained["data"], tiny_config(), out_dir=run, progress=False)
    with pytest.raises(ValueError, match="training checkpoint.*build_predictor"):
        predict.load_predictor(run / tr.CHECKPOINT)
    # image encoder weights that are not the ones the bank was embedded with
    obj = torch.load(trained["path"], weights_only=True)
    key = next(k for k in obj["model"] if k.startswith("image_encoder.backbone.")
               and obj["model"][k].is_floating_point())
    obj["model"][key] = obj["model"][key] + 1.0
    torch.save(obj, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="weights .* are not those the reference bank"):
        predict.load_predictor(tmp_path / "tampered.pt")
    # an existing file is not replaced unless asked
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predict.save_predictor(trained["predictor"], trained["path"])


def test_model_and_reference_with_different_genes_are_refused(trained):
    import anndata as ad

    other = {k: ad.AnnData(X=a.X[:, :4], obs=a.obs, obsm=dict(a.obsm), uns=dict(a.uns))
             for k, a in trained["sections"].items() if k in ("S1", "S2")}
    for a in other.values():
        a.var_names = [f"g{i}" for i in range(4)]
    data4 = tr.SpotData.from_anndata(other, patch_um=RUN["patch_um"],
                                     patch_size=RUN["patch_size"], progress=False)
    with pytest.raises(ValueError, match="trained on 6 genes but the reference has 4"):
        predict.build_predictor(trained["model"], data4, **LAYOUT)
    with pytest.raises(ValueError, match="trained on 6 genes but the reference has 4"):
        tl.predict_section(trained["model"], data4, other["S1"], top_k=5, device="cpu")


def test_nearest_spots_carries_predictions_to_measured_spots(trained):
    from mclstexp_lite import datasets as ds

    p = trained["predictor"]
    virtual = p.predict(trained["slide"], um_per_px=UM, progress=False, device="cpu")
    target = ds.from_image(trained["slide"], um_per_px=UM, spot_pitch_um=100,
                           spot_diameter_um=55, grid="square")  # another layout, same image
    moved = predict.nearest_spots(virtual, target)
    assert 0 < moved.n_obs <= target.n_obs and (moved.obs["distance_um"] <= 50).all()
    i = 0
    j = int(np.argmin(np.linalg.norm(virtual.obsm["spatial"] - moved.obsm["spatial"][i], axis=1)))
    np.testing.assert_array_equal(moved.X[i], virtual.X[j])


# ------------------------------------------------------------ issue 20: bad input
def test_a_reference_with_the_genes_in_another_order_is_refused(trained, tmp_path):
    """SYNTHETIC: a model read from its checkpoint knows its genes; a reference prepared
    with the same genes in another order (same count) is refused where model and
    reference meet: build_predictor, tl.predict_section, and a predictor assembled by hand."""
    import anndata as ad

    run = tmp_path / "run"
    tr.train(trained["data"], tiny_config(), out_dir=run, progress=False)
    model = tr.load_model(run / tr.CHECKPOINT)
    assert model.genes == list(trained["data"].genes)
    order = list(reversed(range(6)))
    other = {}
    for k in ("S1", "S2"):
        a = trained["sections"][k]
        other[k] = ad.AnnData(X=np.asarray(a.X)[:, order], obs=a.obs, obsm=dict(a.obsm),
                              uns=dict(a.uns))
        other[k].var_names = [a.var_names[i] for i in order]
    data = tr.SpotData.from_anndata(other, patch_um=RUN["patch_um"],
                                    patch_size=RUN["patch_size"], progress=False)
    with pytest.raises(ValueError, match=r"the same 6 genes as the reference has, but in another "
                                         r"order: gene 0 is 'g0' in the first and 'g5'.*pp\.prepare"):
        predict.build_predictor(model, data, **LAYOUT)
    with pytest.raises(ValueError, match="another order"):
        tl.predict_section(model, data, other["S1"], top_k=5, device="cpu")
    with pytest.raises(ValueError, match="another order"):
        predict.Predictor(model=model, reference_emb=np.zeros((len(data), 256), np.float32),
                          reference_expr=data.expr, genes=list(data.genes))
    # the right order builds
    assert predict.build_predictor(model, trained["data"], **LAYOUT).genes == model.genes


def test_the_predictor_lays_virtual_spots_like_its_training_data(trained):
    """SYNTHETIC sections whose metadata say legacy ST 2k (checkerboard, 200 um in a row):
    the predictor carries that layout and lays its virtual spots on a checkerboard; mixed
    layouts need one given."""
    import copy

    secs = {k: copy.copy(trained["sections"][k]) for k in ("S1", "S2")}
    for k, a in secs.items():
        a.uns = copy.deepcopy(dict(a.uns))
        a.uns["spatial"][k]["metadata"].update(grid="checkerboard", array="2k",
                                               spot_pitch_um=200.0, spot_diameter_um=100.0)
    data = tr.SpotData.from_anndata(secs, patch_um=RUN["patch_um"], patch_size=RUN["patch_size"],
                                    progress=False)
    p = predict.build_predictor(trained["model"], data, top_k=5, patch_um=RUN["patch_um"],
                                patch_size=RUN["patch_size"])
    assert p.info["grid"] == "checkerboard" and p.info["array"] == "2k"
    assert p.info["layout_from"] == "the reference sections' metadata"
    pred = p.predict(trained["slide"], um_per_px=UM, progress=False, device="cpu")
    from mclstexp_lite import datasets as ds

    geo = ds.array_layout(pred.obs[["array_x", "array_y"]].to_numpy(), pred.obsm["spatial"])
    assert geo["layout"] == "2k" and not geo["ambiguous"]
    assert pred.uns["spatial"][next(iter(pred.uns["spatial"]))]["metadata"][
        "spot_spacing_um"] == pytest.approx(141.421, abs=1e-3)
    secs["S2"].uns["spatial"]["S2"]["metadata"].update(grid="hex", spot_pitch_um=100.0)
    mixed = tr.SpotData.from_anndata(secs, patch_um=RUN["patch_um"],
                                     patch_size=RUN["patch_size"], progress=False)
    with pytest.raises(ValueError, match=r"different spot layouts \(S1: checkerboard 200 um, "
                                         r"S2: hex 100 um\).*grid="):
        predict.build_predictor(trained["model"], mixed, top_k=5)
    assert predict.build_predictor(trained["model"], mixed, top_k=5, spot_pitch_um=100.0,
                                   spot_diameter_um=55.0, grid="hex").info["layout_from"] == "given"


def test_out_of_distribution_score_is_recorded_saved_and_warns(trained, tmp_path):
    """SYNTHETIC: the score of one of the reference's own sections is about 1; a
    saved-and-loaded predictor gives the same score; a patch set far from the reference
    images warns; a predictor file without reference images (older files) predicts
    without a score."""
    import torch as _torch

    p = trained["predictor"]
    assert p.reference_image_emb is not None and p.info["ood_reference_distance"] > 0
    own = p.predict(trained["sections"]["S1"], progress=False, device="cpu")
    s_own = own.uns["mclstexp_prediction"]["ood_score"]
    assert s_own < p.info["ood_threshold"]
    loaded = predict.load_predictor(trained["path"])
    np.testing.assert_array_equal(loaded.reference_image_emb, p.reference_image_emb)
    far = -np.asarray(p.reference_image_emb[:20]) + 0.0  # pointing the other way
    assert p.ood_score(far) > p.info["ood_threshold"]
    assert p.ood_score(np.asarray(p.reference_image_emb[:20])) < 1.0
    obj = _torch.load(trained["path"], weights_only=True)
    del obj["reference_image_emb"]
    _torch.save(obj, tmp_path / "old.pt")
    old = predict.load_predictor(tmp_path / "old.pt")
    assert old.reference_image_emb is None and old.ood_score(far) is None
    rec = old.predict(trained["sections"]["S1"], progress=False, device="cpu").uns[
        "mclstexp_prediction"]
    assert "ood_score" not in rec


def test_weak_messages_fixed(trained, tmp_path, capsys):
    """A corrupt predictor's error has no weights_only=False advice; a NumPy image is
    predicted (and without um_per_px refused up front); the CLI names its flags."""
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError) as err:
        predict.load_predictor(tmp_path / "junk.pt")
    assert "weights_only" not in str(err.value) and "junk.pt" in str(err.value)
    img = np.asarray(Image.open(trained["slide"]).convert("RGB"))
    pred = predict.predict_image(trained["path"], img, um_per_px=UM, progress=False,
                                 device="cpu")
    by_path = predict.predict_image(trained["path"], trained["slide"], um_per_px=UM,
                                    progress=False, device="cpu")
    np.testing.assert_allclose(pred.X, by_path.X, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"NumPy array states no pixel size; pass um_per_px="):
        predict.predict_image(trained["path"], img, progress=False)
    with pytest.raises(TypeError, match="file path or an .H, W, 3. uint8 NumPy array"):
        predict.predict_image(trained["path"], img.tolist(), um_per_px=UM, progress=False)
    rc = predict.main(["--model", str(trained["path"]), "--image", str(trained["slide"]),
                       "--out", str(tmp_path / "o.h5ad"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--um-per-px" in err and "um_per_px" not in err
    rc = predict.main(["--model", str(trained["path"]), "--image", str(trained["slide"]),
                       "--out", str(tmp_path / "o.h5ad"), "--no-progress", "--um-per-px",
                       str(UM), "--max-spots", "10"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-spots" in err and "max_spots" not in err
    assert not (tmp_path / "o.h5ad").exists()
    help_text = predict.main.__code__  # the help names the out-of-distribution warning
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    assert "unlike the training data" in capsys.readouterr().out
    del help_text


def test_prediction_maps_draw_one_panel_per_gene_without_warnings(trained):
    """The maps are squidpy's (through ml.pl.spots_on_tissue): no scanpy FutureWarning to
    filter; each gene's colour scale is its own 2nd-98th percentile."""
    import warnings

    import matplotlib.pyplot as plt

    pred = trained["predictor"].predict(trained["sections"]["S3"], device="cpu", progress=False)
    genes = list(pred.var_names[:3])
    with warnings.catch_warnings():
        # what a notebook would show (Pending/DeprecationWarnings from inside libraries
        # are hidden there by Python's default filters)
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", UserWarning)
        fig = pl.prediction_maps(pred, genes, ncols=2)
    drawn = [ax for ax in fig.axes if ax.get_title() in genes]
    assert [ax.get_title() for ax in drawn] == genes
    for ax, g in zip(drawn, genes):
        spots = [c for c in ax.collections if c.get_array() is not None][0]
        lo, hi = np.percentile(np.asarray(pred[:, g].X, float).ravel(), [2, 98])
        assert spots.get_clim() == pytest.approx((lo, hi))
        assert len(spots.get_paths()) == pred.n_obs
    assert fig._suptitle.get_text().endswith(f"({pred.n_obs} spots)")
    with pytest.raises(ValueError, match="NOPE"):
        pl.prediction_maps(pred, ["NOPE"])
    plt.close("all")
