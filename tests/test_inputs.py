"""What a model reads (mclstexp_lite._inputs): per-section standardisation, neighbourhood
context, the wide view, centred expression; and that training, retrieval, the linear probe
and a saved predictor all build the same inputs. SYNTHETIC data (tests/factories.py):
plumbing and arithmetic, not prediction quality (docs/results.md measures that)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mclstexp_lite import _baselines as bl
from mclstexp_lite import _inputs as inputs, predict, tl
from mclstexp_lite import train as tr

from .factories import RUN, synthetic_sections, synthetic_spotdata, tiny_config

ALL_ON = dict(feature_norm="section", expr_norm="center", context="mean", context_um=60.0,
              wide_view=2.0)


def test_center_expression_moves_every_section_to_the_overall_mean():
    """SYNTHETIC: two sections with very different levels."""
    rng = np.random.default_rng(0)
    expr = np.vstack([rng.random((5, 3)) + 10, rng.random((7, 3))]).astype(np.float32)
    groups = np.repeat([0, 1], [5, 7])
    out = inputs.center_expression(expr, groups)
    overall = expr.astype(np.float64).mean(axis=0)
    for g in (0, 1):
        np.testing.assert_allclose(out[groups == g].mean(axis=0), overall, rtol=1e-6)
        dev = expr[groups == g] - expr[groups == g].mean(axis=0)
        np.testing.assert_allclose(out[groups == g] - out[groups == g].mean(axis=0), dev,
                                   atol=1e-5)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="groups"):
        inputs.center_expression(expr, groups[:-1])


def test_standardize_sections_per_view_and_section():
    """SYNTHETIC features of 2 views; a feature constant within a section becomes 0."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(3, 2, (2, 30, 4)).astype(np.float32))
    x[:, :25, 3] = 7.0  # constant in section 0
    groups = np.repeat([0, 1], [25, 5])
    with pytest.warns(RuntimeWarning, match="section S1 has 5 spots"):
        z = inputs.standardize_sections(x, groups, names=["S0", "S1"])
    for g in (0, 1):
        part = z[:, torch.from_numpy(groups == g)]
        np.testing.assert_allclose(part[..., :3].mean(dim=1), 0, atol=1e-5)
        np.testing.assert_allclose(part[..., :3].std(dim=1, unbiased=False), 1, atol=1e-4)
    assert torch.all(z[:, :25, 3] == 0)


def test_neighbour_mean_takes_the_spots_within_the_radius_of_the_same_section():
    """SYNTHETIC: a 4 x 3 grid 100 um apart in each of two sections at the same place."""
    xs, ys = np.meshgrid(np.arange(4) * 100.0, np.arange(3) * 100.0)
    one = np.c_[xs.ravel(), ys.ravel()]
    coords = np.vstack([one, one])
    groups = np.repeat([0, 1], 12)
    w = inputs.neighbour_matrix(coords, groups, 150.0)
    counts = np.diff(w.indptr)
    assert counts[0] == 4  # corner: itself, 2 edge neighbours, 1 diagonal
    assert counts[5] == 9  # inside: itself and its 8 neighbours
    np.testing.assert_allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
    assert w[:12, 12:].nnz == 0 and w[12:, :12].nnz == 0  # sections never mix
    x = torch.arange(24, dtype=torch.float32).reshape(1, 24, 1)
    got = inputs.neighbour_mean(x, coords, groups, 150.0)
    assert got[0, 0, 0].item() == pytest.approx(np.mean([0, 1, 4, 5]))
    with pytest.raises(ValueError, match="positions in microns.*from_anndata"):
        inputs.neighbour_matrix(None, groups, 150.0)


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    return synthetic_sections(tmp_path_factory.mktemp("inputs") / "sections",
                              spots={"S1": 30, "S2": 26, "S3": 24},
                              patients={"S1": "P", "S2": "P", "S3": "Q"})


def _data(sections, names):
    return tr.SpotData.from_anndata({s: sections[s] for s in names},
                                    patch_um=RUN["patch_um"], patch_size=RUN["patch_size"],
                                    progress=False)


def test_image_inputs_blocks_and_their_order(sections):
    """SYNTHETIC: the blocks are [patch, neighbourhood, wide crop], built as documented."""
    from mclstexp_lite import features as fx

    data = _data(sections, ["S1", "S2"])
    assert data.coords_um.shape == (56, 2)
    cfg = tiny_config(**ALL_ON)
    torch.manual_seed(0)
    model = tr.build_model(cfg, data.n_genes)
    assert model.image_blocks == 3 and model.config["context_um"] == 60.0
    x = inputs.image_inputs(model, data, views=2, device="cpu", progress=False)
    d = model.image_encoder.out_dim
    assert x.shape == (2, 56, 3 * d) and model.image_input_dim == 3 * d
    base = fx.spot_features(model.image_encoder, data, views=2, device="cpu", progress=False)
    z = inputs.standardize_sections(base, data.groups)
    torch.testing.assert_close(x[..., :d], z)
    torch.testing.assert_close(x[..., d:2 * d],
                               inputs.neighbour_mean(z, data.coords_um, data.groups, 60.0))
    wide = data.wide_patches(2.0)
    assert wide[0].shape == data.patches[0].shape
    assert not np.array_equal(np.asarray(wide[0]), np.asarray(data.patches[0]))
    # the sections' own provenance still names their patches, not the wide crops
    assert "c128" not in sections["S1"].uns["mclstexp"]["patches"]["path"]
    bare = tr.SpotData(patches=data.patches, expr=data.expr, pos=data.pos, groups=data.groups,
                       sections=data.sections, genes=data.genes, obs_names=data.obs_names,
                       coords_um=data.coords_um)
    with pytest.raises(ValueError, match="wide view needs the sections' images"):
        inputs.image_inputs(model, bare, device="cpu", progress=False)
    with pytest.raises(ValueError, match="inputs.image_inputs"):
        model.encode_image(torch.zeros(2, 3, 32, 32))


def test_config_options_are_checked_and_recorded():
    for bad, match in ((dict(feature_norm="slide"), "feature_norm"),
                       (dict(expr_norm="zscore"), "expr_norm"),
                       (dict(context="attention"), "context"),
                       (dict(context_um=0), "context_um"),
                       (dict(wide_view=1.0), "wide_view"),
                       (dict(mode="full", context="mean"), "mode='frozen'"),
                       (dict(model={"weights": None, "context": "mean"}), "TrainConfig fields")):
        with pytest.raises(ValueError, match=match):
            tiny_config(bad)
    cfg = tiny_config(mode="full", expr_norm="center")  # works on the pixel path too
    assert tr.build_model(cfg, 6).config["expr_norm"] == "center"
    paper = tr.TrainConfig.profile("paper")
    assert all(v is None for k, v in paper.model_inputs().items() if k != "context_um")
    # a config written before the options existed means "off"
    old = {k: v for k, v in tiny_config().to_dict().items() if k not in inputs.options_of(cfg)}
    assert tr.same_run(old, tiny_config())


def test_training_retrieval_probe_and_predictor_use_the_same_inputs(sections, tmp_path):
    """SYNTHETIC end to end with every option on: a saved predictor predicts like
    tl.predict_section, retrieval averages the centred bank, and the linear probe reads
    the model's input features."""
    data = _data(sections, ["S1", "S2"])
    cfg = tiny_config(**ALL_ON)
    model = tr.train(data, cfg, progress=False).model
    test = sections["S3"]
    test_data = _data(sections, ["S3"])
    want = tl.predict_section(model, data, test, top_k=5, device="cpu", test_data=test_data)
    keys = tl.embed_reference(model, data, device="cpu")
    q = tr.embed_images(model, test_data, device="cpu", progress=False)
    bank = inputs.center_expression(data.expr, data.groups)
    np.testing.assert_allclose(want.X, tl.retrieve(q, keys, bank, top_k=5), rtol=1e-5, atol=1e-6)
    p = predict.build_predictor(model, data, patch_um=RUN["patch_um"],
                                patch_size=RUN["patch_size"], top_k=5)
    np.testing.assert_allclose(p.reference_expr, bank)
    path = predict.save_predictor(p, tmp_path / "all_on.predictor.pt")
    loaded = predict.load_predictor(path)
    assert loaded.model.config["wide_view"] == 2.0
    got = loaded.predict(test, device="cpu", progress=False)
    np.testing.assert_allclose(got.X, want.X, rtol=1e-5, atol=1e-6)
    feats = bl.encoder_features(data, config=cfg, device="cpu")
    np.testing.assert_allclose(
        feats, inputs.image_inputs(model, data, device="cpu", progress=False)[0].numpy(),
        rtol=1e-6)
    with pytest.raises(ValueError, match="other inputs"):
        tr.train(data, tiny_config(), model=model, progress=False)


def test_virtual_spots_of_an_image_get_the_same_context(sections, tmp_path):
    """SYNTHETIC slide (tests/test_slides.py): image-only prediction with every option on
    builds the virtual spots' inputs from their own positions, statistics and image."""
    from PIL import Image

    from mclstexp_lite import datasets as ds

    from .test_slides import UM, synthetic_slide

    data = _data(sections, ["S1", "S2"])
    cfg = tiny_config(ALL_ON, context_um=250.0)  # the 100 um hex grid: 2 rings
    model = tr.train(data, cfg, progress=False).model
    p = predict.build_predictor(model, data, patch_um=RUN["patch_um"],
                                patch_size=RUN["patch_size"], top_k=5, spot_pitch_um=100.0,
                                spot_diameter_um=55.0, grid="hex")
    Image.fromarray(synthetic_slide()).save(tmp_path / "slide.png")
    pred = predict.predict_image(p, tmp_path / "slide.png", um_per_px=UM, progress=False,
                                 device="cpu")
    assert pred.n_obs > 50 and np.isfinite(pred.X).all()
    slide = ds.from_image(tmp_path / "slide.png", um_per_px=UM, spot_pitch_um=100.0,
                          spot_diameter_um=55.0, grid="hex")
    virtual = tr.SpotData.from_anndata({"slide": slide}, patch_um=RUN["patch_um"],
                                       patch_size=RUN["patch_size"], progress=False)
    w = inputs.neighbour_matrix(virtual.coords_um, virtual.groups, 250.0)
    assert np.median(np.diff(w.indptr)) == 19  # itself and two hexagonal rings
    emb = tr.embed_images(model, virtual, device="cpu", progress=False)
    np.testing.assert_allclose(pred.X, tl.retrieve(emb, p.reference_emb, p.reference_expr,
                                                   top_k=5), rtol=1e-5, atol=1e-6)
