"""Tests for mclstexp_lite.pl: figures compare methods only on what they share.

SYNTHETIC metrics tables (made-up numbers)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mclstexp_lite import cv, pl, _results as results# noqa: E402


def _per_fold():
    rows = []
    for method, sections in (("mclstexp", ["A1", "B4", "C2"]), ("ridge_color", ["A1", "B4"])):
        for i, s in enumerate(sections):
            rows.append({"method": method, "scheme": "section", "fold": s, "test_section": s,
                         "pcc_acg": 0.1 * i, "pcc_heg": 0.2, "mse": 0.3, "mae": 0.4})
    return pd.DataFrame(rows)


def test_methods_are_compared_on_the_sections_they_share():
    kept, notes = results.shared_sections(_per_fold())
    assert sorted(set(kept["test_section"])) == ["A1", "B4"] and len(kept) == 4
    assert notes == ["section: compared on the 2 held-out section(s) every method has; "
                     "left out ['C2'] (not scored for C2: ridge_color)"]
    fig = pl.metric_bars(_per_fold())
    assert any("left out ['C2']" in t.get_text() for t in fig.texts)
    full = _per_fold()
    full = full[full.test_section != "C2"]
    assert results.shared_sections(full)[1] == []


def test_undefined_correlations_are_explained_in_the_summary():
    df = _per_fold()
    df.loc[df.method == "ridge_color", ["pcc_acg", "pcc_heg"]] = float("nan")
    md = cv.summary_markdown(cv.method_summary(df))
    assert "undefined*" in md and "nan ± nan" not in md
    assert "same at every spot" in md


def test_summary_tables_use_the_same_shared_sections_rule():
    """method_summary drops what metric_bars drops, and says which rows lost what."""
    table = cv.method_summary(_per_fold()).set_index("method")
    kept, _ = results.shared_sections(_per_fold())
    assert (table["n_sections"] == 2).all()
    assert table.loc["mclstexp", "pcc_acg_mean"] == pytest.approx(
        kept[kept.method == "mclstexp"]["pcc_acg"].mean())
    assert table.loc["mclstexp", "left_out"] == "C2 (not scored for: ridge_color)"
    assert table.loc["ridge_color", "left_out"] == ""
    md = cv.summary_markdown(table.reset_index())
    assert "C2 (not scored for: ridge_color)" in md and "compared only on the held-out" in md


def test_a_method_with_no_section_in_common_keeps_an_empty_row():
    df = _per_fold()
    df = df[~((df.method == "ridge_color") & df.test_section.isin(["A1", "B4"]))]
    df = pd.concat([df, df.iloc[:1].assign(method="ridge_color", test_section="Z9", fold="Z9")])
    table = cv.method_summary(df).set_index("method")
    assert table.loc["ridge_color", "n_sections"] == 0
    assert table.loc["mclstexp", "n_sections"] == 0
    md = cv.summary_markdown(table.reset_index())
    assert "undefined*" not in md and "nan" not in md


def test_pred_vs_true_says_why_a_correlation_is_undefined():
    """SYNTHETIC section: a constant prediction has no correlation; the title says so."""
    import anndata as ad
    import numpy as np

    rng = np.random.default_rng(0)
    true = ad.AnnData(rng.random((6, 2)).astype(np.float32))
    true.var_names = ["g0", "g1"]
    true.obsm["spatial"] = rng.uniform(10, 90, (6, 2))
    true.uns["spatial"] = {"S": {"images": {"hires": np.full((100, 100, 3), 200, np.uint8)},
                                 "scalefactors": {"tissue_hires_scalef": 1.0,
                                                  "spot_diameter_fullres": 10.0},
                                 "metadata": {}}}
    pred = true.copy()
    pred.X = np.ones_like(true.X)
    fig = pl.pred_vs_true(pred, true, ["g0"])
    titles = [ax.get_title() for ax in fig.axes]
    assert any("r undefined: constant" in t for t in titles)
    assert not any("nan" in t for t in titles)


# ====================================================================== spots on tissue
def _section(n=8, seed=0, n_libraries=1):
    """SYNTHETIC section: random spot centres on a flat grey 100 px "H&E" (scale 0.5)."""
    import anndata as ad
    import numpy as np

    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.random((n, 3)).astype(np.float32))
    a.var_names = ["g0", "g1", "g2"]
    a.obs["label"] = (["tumour", "stroma"] * n)[:n]
    a.obsm["spatial"] = rng.uniform(40, 160, (n, 2))
    a.uns["spatial"] = {f"S{i}": {"images": {"hires": np.full((100, 100, 3), 200, np.uint8)},
                                  "scalefactors": {"tissue_hires_scalef": 0.5,
                                                   "spot_diameter_fullres": 20.0},
                                  "metadata": {}} for i in range(n_libraries)}
    return a


def _spots(fig):
    """The spot collection of a spots_on_tissue figure (its first axes)."""
    from matplotlib.collections import PatchCollection

    colls = [c for c in fig.axes[0].collections if isinstance(c, PatchCollection)]
    assert len(colls) == 1
    return colls[0]


def test_spots_on_tissue_colours_numbers_at_their_true_size_and_place():
    import matplotlib.pyplot as plt
    import numpy as np

    a = _section()
    before = (list(a.obs.columns), list(a.uns), a.obsm["spatial"].copy())
    values = np.linspace(1.0, 8.0, a.n_obs)
    values[3] = np.nan
    fig = pl.spots_on_tissue(a, values, title="numbers")
    spots = _spots(fig)
    assert len(spots.get_paths()) == a.n_obs
    centres = np.array([(p.vertices.min(axis=0) + p.vertices.max(axis=0)) / 2
                        for p in spots.get_paths()])
    # circles of diameter spot_diameter_fullres * tissue_hires_scalef, centred on the spots
    extent = np.array([np.ptp(p.vertices, axis=0) for p in spots.get_paths()])
    np.testing.assert_allclose(extent, 10.0, rtol=1e-3)
    np.testing.assert_allclose(centres, a.obsm["spatial"] * 0.5, atol=1e-3)
    np.testing.assert_allclose(np.ma.filled(spots.get_array(), np.nan), values)
    assert spots.get_clim() == (1.0, 8.0)  # the finite range: NaN is not a limit
    assert len(fig.axes) == 2  # the colour bar
    ax = fig.axes[0]
    assert ax.get_title() == "numbers" and ax.get_xlabel() == "" and ax.get_ylabel() == ""
    x0, x1 = ax.get_xlim()
    y1, y0 = ax.get_ylim()  # image orientation: y grows downwards
    assert x0 < centres[:, 0].min() and centres[:, 0].max() < x1
    assert y0 < centres[:, 1].min() and centres[:, 1].max() < y1
    assert (list(a.obs.columns), list(a.uns)) == before[:2]  # the section is not changed
    np.testing.assert_array_equal(a.obsm["spatial"], before[2])
    fig2 = pl.spots_on_tissue(a, values, vmin=0, vmax=2, colorbar=False)
    assert _spots(fig2).get_clim() == (0, 2) and len(fig2.axes) == 1
    plt.close("all")


def test_spots_on_tissue_gives_each_class_one_colour_and_a_legend():
    import matplotlib.pyplot as plt
    import numpy as np

    a = _section()
    fig = pl.spots_on_tissue(a, "label")
    spots = _spots(fig)
    faces = spots.get_facecolor()
    labels = a.obs["label"].to_numpy()
    for c in ("tumour", "stroma"):
        assert len({tuple(np.round(f, 4)) for f in faces[labels == c]}) == 1
    assert not np.allclose(faces[labels == "tumour"][0], faces[labels == "stroma"][0])
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert sorted(t.get_text() for t in legend.get_texts()) == ["stroma", "tumour"]
    fig2 = pl.spots_on_tissue(a, "label", legend=False)
    assert fig2.axes[0].get_legend() is None
    plt.close("all")


def test_spots_on_tissue_without_values_outlines_the_spots():
    import matplotlib.pyplot as plt
    import numpy as np

    fig = pl.spots_on_tissue(_section())
    spots = _spots(fig)
    assert len(spots.get_facecolor()) == 0  # no fill
    np.testing.assert_allclose(spots.get_edgecolor()[0], [0, 0, 0, 1])
    plt.close("all")


def test_a_large_image_is_drawn_shrunk_on_its_own_pixel_grid():
    """SYNTHETIC 2,500 x 1,500 px image with a dark square: drawn at most
    DISPLAY_MAX_PX on its longer side, over the hires pixel grid, so spots and the
    square stay where they are; a small image is drawn as it is; grey and float work."""
    import matplotlib.pyplot as plt
    import numpy as np

    a = _section()
    img = np.full((1500, 2500, 3), 230, np.uint8)
    img[600:900, 1000:1400] = 20  # the square, in hires pixels
    a.uns["spatial"]["S0"]["images"]["hires"] = img
    a.obsm["spatial"] = np.array([[2400.0, 1500.0]] * a.n_obs)  # at hires (1200, 750)
    for image, hires in (("he", img), ("grey", img), ("he", img / 255.0)):
        a.uns["spatial"]["S0"]["images"]["hires"] = hires
        fig = pl.spots_on_tissue(a, image=image)
        ax = fig.axes[0]
        drawn = ax.images[0]
        assert max(drawn.get_array().shape[:2]) == pl.DISPLAY_MAX_PX
        assert drawn.get_extent() == [-0.5, 2499.5, 1499.5, -0.5]
        shrunk = np.asarray(drawn.get_array())[..., 0].astype(float)
        f = shrunk.shape[1] / 2500
        # the square is under the spots, darker than the background
        assert shrunk[int(750 * f), int(1200 * f)] < shrunk[int(300 * f), int(300 * f)] - 80
        centres = np.array([(p.vertices.min(axis=0) + p.vertices.max(axis=0)) / 2
                            for p in _spots(fig).get_paths()])
        np.testing.assert_allclose(centres, a.obsm["spatial"] * 0.5, atol=1e-3)
    small = pl.spots_on_tissue(_section())
    assert small.axes[0].images[0].get_array().shape[:2] == (100, 100)
    plt.close("all")


def test_spots_on_tissue_errors():
    import numpy as np

    with pytest.raises(ValueError, match="one library"):
        pl.spots_on_tissue(_section(n_libraries=2))
    with pytest.raises(ValueError, match="one value per spot"):
        pl.spots_on_tissue(_section(), np.arange(3.0))


# =========================================================================== others
def test_patch_gallery_loss_curve_and_model_diagram_draw_what_they_are_given():
    """SYNTHETIC patches, history and parameter table."""
    import matplotlib.pyplot as plt
    import numpy as np

    patches = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    fig = pl.patch_gallery(patches, [f"p{i}" for i in range(5)], ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 5
    np.testing.assert_array_equal(shown[4].images[0].get_array(), patches[4])
    assert [ax.get_title() for ax in shown] == [f"p{i}" for i in range(5)]

    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.2}]
    fig = pl.loss_curve(history, title="t")
    (line,) = fig.axes[0].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 1.5, 1.2])
    assert fig.axes[0].get_title() == "t"

    table = pd.DataFrame({"parameters": [1234567]}, index=["image_encoder"])
    texts = [t.get_text() for t in pl.model_diagram(table).axes[0].texts]
    assert any("1,234,567 params" in t for t in texts)
    assert not any("params" in t for t in (x.get_text() for x in pl.model_diagram().axes[0].texts))
    plt.close("all")


def test_spots_on_tissue_grey_image_and_a_palette_that_reads_on_he():
    """SYNTHETIC section whose H&E is purple: image='grey' draws it as light grey (the
    luminance pulled towards white), palette= gives the classes its colours in order."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_rgba

    a = _section()
    a.uns["spatial"]["S0"]["images"]["hires"] = np.tile(np.array([120, 60, 140], np.uint8),
                                                         (100, 100, 1))
    fig = pl.spots_on_tissue(a, "label", image="grey", palette=pl.ON_HE)
    shown = fig.axes[0].images[0].get_array()
    lum = 0.299 * 120 + 0.587 * 60 + 0.114 * 140
    assert np.ptp(np.asarray(shown)[..., :3], axis=-1).max() == 0  # grey: R = G = B
    assert abs(int(np.asarray(shown)[0, 0, 0]) - (0.55 * lum + 0.45 * 255)) <= 1
    # the section's own image is untouched
    assert tuple(a.uns["spatial"]["S0"]["images"]["hires"][0, 0]) == (120, 60, 140)
    faces = _spots(fig).get_facecolor()
    labels = a.obs["label"].to_numpy()
    # classes in sorted order take the palette's first colours: stroma, tumour
    np.testing.assert_allclose(faces[labels == "stroma"][0][:3], to_rgba(pl.ON_HE[0])[:3])
    np.testing.assert_allclose(faces[labels == "tumour"][0][:3], to_rgba(pl.ON_HE[1])[:3])
    fig2 = pl.spots_on_tissue(a, np.arange(a.n_obs, dtype=float), image=None)
    assert not fig2.axes[0].images  # no image at all
    with pytest.raises(ValueError, match="image must be"):
        pl.spots_on_tissue(a, image="gray")
    with pytest.raises(ValueError, match="palette has 1 colours for 2 classes"):
        pl.spots_on_tissue(a, "label", palette=["red"])
    # float images in 0..1 work the same as uint8
    np.testing.assert_allclose(pl.he_grey(np.full((2, 2, 3), 0.5)).astype(int),
                               pl.he_grey(np.full((2, 2, 3), 128, np.uint8)).astype(int), atol=1)
    with pytest.raises(ValueError, match="image"):
        pl.he_grey(np.zeros((4, 4)))
    plt.close("all")
