"""Loader tests on the real offline data (skipped with a reason where it is absent),
plus bad-input tests on small synthetic files (labelled as such)."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from mclstexp_lite import datasets as ds
from mclstexp_lite import download as dl

from .conftest import needs_data, SHARED_DATA
import logging
from mclstexp_lite import patches as P
from mclstexp_lite import pp
from .factories import damage_jpeg, listing, write_section


# ------------------------------------------------------------------ real data
@needs_data
def test_her2st_c2_matches_source_files(her2_c2):
    a = her2_c2
    assert a.shape == (187, 15706)
    assert sparse.issparse(a.X) and a.X.dtype == np.int32
    assert int(a.X.sum()) == 1_926_633
    src = pd.read_csv(SHARED_DATA / "her2st/data/ST-spotfiles/C2_selection.tsv", sep="\t")
    src.index = [f"C2_{round(x)}x{round(y)}" for x, y in zip(src.x, src.y)]
    src = src.loc[a.obs_names]
    np.testing.assert_allclose(a.obsm["spatial"], src[["pixel_x", "pixel_y"]].to_numpy())
    assert (a.obs["array_x"].to_numpy() == np.round(src.x).astype(int)).all()
    assert set(a.obs["section"]) == {"C2"} and set(a.obs["patient"]) == {"C"}
    assert "label" not in a.obs
    lib = a.uns["spatial"]["C2"]
    meta = lib["metadata"]
    assert Path(meta["source_image_path"]).name == "5714_HE_BT_C2.jpg"
    assert meta["source_image_sha256"] == dl.sha256_file(meta["source_image_path"])
    assert 0.66 < meta["um_per_px"] < 0.72  # ~291 px per 200 um spot pitch
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) == ds.HIRES_MAX_PX
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / 9274)


@needs_data
def test_her2st_counts_match_the_raw_table(her2_c2):
    raw = pd.read_csv(SHARED_DATA / "her2st/data/ST-cnts/C2.tsv.gz", sep="\t", index_col=0)
    spot = her2_c2.obs_names[10].split("_", 1)[1]
    row = np.asarray(her2_c2[her2_c2.obs_names[10]].X.todense()).ravel()
    np.testing.assert_array_equal(row, raw.loc[spot, her2_c2.var_names].to_numpy())


@needs_data
def test_a1_reduced_image_all_spots_labelled_and_on_tissue(her2_a1):
    a = her2_a1
    assert a.n_obs == 346
    assert a.obs["label"].notna().all()
    assert a.uns["mclstexp"]["image_kind"] == "image_reduced"
    meta = a.uns["spatial"]["A1"]["metadata"]
    assert meta["pixel_scale"] == pytest.approx(2000 / 6954, rel=1e-5)
    # labels joined on rounded ARRAY coordinates, independently recomputed here
    lab = pd.read_csv(SHARED_DATA / "her2st/data/ST-pat/lbl/A1_labeled_coordinates.tsv", sep="\t")
    lab.index = [f"A1_{round(x)}x{round(y)}" for x, y in zip(lab.x, lab.y)]
    assert (a.obs["label"].astype(str) == lab.loc[a.obs_names, "label"]).all()
    # spots land on tissue: the reduced image has its background blacked out
    from PIL import Image

    img = np.asarray(Image.open(meta["source_image_path"]).convert("RGB")).astype(int)
    xy = np.round(a.obsm["spatial"]).astype(int)
    on = img[xy[:, 1], xy[:, 0]].sum(axis=1) > 60
    assert on.mean() > 0.95, f"only {on.mean():.0%} of A1 spots fall on tissue"
    # ...while the label file's own pixel columns would not (the documented trap)
    bad = np.round(lab[["pixel_x", "pixel_y"]].to_numpy() * meta["pixel_scale"]).astype(int)
    inside = (bad[:, 0] < img.shape[1]) & (bad[:, 1] < img.shape[0])
    bad_on = img[bad[inside, 1], bad[inside, 0]].sum(axis=1) > 60
    assert bad_on.mean() < on.mean() - 0.2
    # spots ~63 px apart in this image
    assert 200 / meta["um_per_px"] == pytest.approx(63, abs=3)


@needs_data
def test_visium_fixture_loads_with_lowres_image(data_root):
    v = ds.visium(data_root / "seurat_visium")
    assert v.shape == (2695, 100)
    lib = v.uns["spatial"]["seurat_visium"]
    assert lib["images"]["hires"].shape == (599, 600, 3)
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1.0)
    xy = v.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < 600).all() and (xy[:, 1] < 599).all()
    pos = pd.read_csv(data_root / "seurat_visium/spatial/tissue_positions_list.csv", header=None,
                      index_col=0)
    np.testing.assert_allclose(xy[:, 0], pos.loc[v.obs_names, 5] * 0.051635113)
    assert v.uns["spatial"]["seurat_visium"]["metadata"]["um_per_px"] > 1


@needs_data
def test_plots_draw_spots_on_tissue(her2_c2, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    import squidpy as sq

    with pytest.warns(FutureWarning, match="squidpy"):  # scanpy points to squidpy now
        sc.pl.spatial(her2_c2, color="array_x", show=False, save=None)
    sq.pl.spatial_scatter(her2_c2, color="array_y", library_id="C2")
    import matplotlib.pyplot as plt

    plt.savefig(tmp_path / "c2.png")
    plt.close("all")
    assert (tmp_path / "c2.png").stat().st_size > 10_000


@needs_data
def test_list_sections_reports_local_availability(data_root):
    t = ds.list_sections(data_dir=data_root)
    assert len(t[t.dataset == "her2st"]) == 36 and len(t[t.dataset == "cscc"]) == 12
    her = t[t.dataset == "her2st"].set_index("section")
    assert sorted(her.index[her.trainable]) == ["A1", "B4", "C2", "C3", "C4", "C5", "C6"]
    assert her.loc["A1", "image_reduced"] and not her.loc["A1", "image"]
    assert her.counts.all() and her.spots.all()
    assert her.paper.sum() == 32
    assert not t[t.dataset == "cscc"].counts.any()


@needs_data
def test_missing_full_image_is_a_clear_error(data_root):
    with pytest.raises(dl.DataMissingError, match=r"BT10737_C1_HE\.jpg"):
        ds.her2st("B1", data_dir=data_root, image="full", download=False)
    a = ds.her2st("B1", data_dir=data_root, image="none", download=False)
    assert a.obs["label"].notna().mean() > 0.9 and a.uns["spatial"]["B1"]["images"] == {}


def test_unknown_section_names_valid_ones():
    with pytest.raises(ValueError, match="unknown HER2\\+ section 'Z1'.*A1, A2"):
        ds.her2st("Z1")
    with pytest.raises(ValueError, match="unknown cSCC section"):
        ds.cscc("P3_ST_rep1")
    with pytest.raises(ValueError, match="unknown dataset"):
        ds.load("mouse", "A1")


# ------------------------------------------------------- synthetic section files
def _write_section(folder: Path, *, n=12, counts=None, spots=None, image=True, seed=0):
    """SYNTHETIC legacy-ST section: a 4x3 grid of spots 100 px apart on a 500x400 image."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(1, 5), np.arange(1, 4))
    xs, ys = xs.ravel()[:n], ys.ravel()[:n]
    sp = pd.DataFrame({"x": xs + 0.02, "y": ys - 0.03, "new_x": xs, "new_y": ys,
                       "pixel_x": xs * 100.0, "pixel_y": ys * 100.0, "selected": 1})
    cnt = pd.DataFrame(rng.poisson(3, size=(n, 5)) + 1, columns=list("ABCDE"),
                       index=[f"{x}x{y}" for x, y in zip(xs, ys)])
    if counts is not None:
        cnt = counts(cnt)
    if spots is not None:
        sp = spots(sp)
    cnt.to_csv(folder / "counts.tsv", sep="\t")
    sp.to_csv(folder / "spots.tsv", sep="\t", index=False)
    img = None
    if image:
        from PIL import Image

        img = folder / "he.jpg"
        Image.fromarray(rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)).save(img)
    return folder / "counts.tsv", folder / "spots.tsv", img


def test_from_files_synthetic_section(tmp_path):
    c, s, i = _write_section(tmp_path)
    a = ds.from_files(c, s, i, section="S", patient="P")
    assert a.shape == (12, 5) and a.obs_names[0] == "S_1x1"
    assert a.uns["spatial"]["S"]["metadata"]["um_per_px"] == pytest.approx(2.0)
    assert a.uns["spatial"]["S"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(50)


@pytest.mark.parametrize("mutate, match", [
    (dict(counts=lambda c: pd.concat([c, c.iloc[:1]])), "duplicated spot id"),
    (dict(counts=lambda c: c.assign(A=-1)), "negative count"),
    (dict(counts=lambda c: c.assign(A=np.nan)), "NaN"),
    (dict(counts=lambda c: c.assign(A=0.5)), "not integers"),
    (dict(counts=lambda c: c.assign(A="x")), "non-numeric"),
    (dict(counts=lambda c: c.set_axis([f"9{i}x9" for i in range(len(c))])), "no spot ids shared"),
    (dict(spots=lambda s: s.assign(pixel_x=s.pixel_x * 10)), "outside the image"),
    (dict(spots=lambda s: s.drop(columns="pixel_y")), "needs columns"),
])
def test_from_files_bad_input_names_the_file(tmp_path, mutate, match):
    c, s, i = _write_section(tmp_path, **mutate)
    with pytest.raises(ValueError, match=match) as err:
        ds.from_files(c, s, i, section="S")
    assert "counts.tsv" in str(err.value) or "spots.tsv" in str(err.value) or "S:" in str(err.value)


def test_zero_count_spots_are_dropped_and_logged(tmp_path, caplog):
    import logging

    c, s, i = _write_section(tmp_path, counts=lambda c: c.mul((c.index != "2x2").astype(int), axis=0))
    with caplog.at_level(logging.INFO, logger="mclstexp_lite.datasets"):
        a = ds.from_files(c, s, i, section="S")
    assert a.n_obs == 11 and "S_2x2" not in a.obs_names
    assert "1 with zero counts" in caplog.text
    assert a.uns["mclstexp"]["spots_dropped"]["zero_counts"] == 1


def test_corrupt_and_truncated_image_errors_name_the_file(tmp_path):
    c, s, i = _write_section(tmp_path)
    data = i.read_bytes()
    i.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"he\.jpg.*(truncated|corrupt)"):
        ds.from_files(c, s, i, section="S")
    i.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"he\.jpg.*corrupt or not an image"):
        ds.from_files(c, s, i, section="S")


def test_cscc_loader_on_synthetic_geo_files(tmp_path, monkeypatch):
    """SYNTHETIC files laid out under the manifest's GEO names for P2_ST_rep1."""
    rows = {r.kind: r for r in dl.rows("cscc", "P2_ST_rep1")}
    c, s, i = _write_section(tmp_path)
    for kind, src in (("counts", c), ("spots", s), ("image", i)):
        dest = tmp_path / "root" / rows[kind].path
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fin, gzip.open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    a = ds.cscc("P2_ST_rep1", data_dir=tmp_path / "root", download=False)
    assert a.n_obs == 12 and set(a.obs["patient"]) == {"P2"}
    src = Path(a.uns["spatial"]["P2_ST_rep1"]["metadata"]["source_image_path"])
    assert src.suffix == ".jpg" and src.exists()  # unpacked from .jpg.gz into the cache


def _write_array(folder: Path, layout: str, d: float = 45.0, *, rows=8, cols=10):
    """SYNTHETIC section on one spot array, nearest neighbours ``d`` px apart:

    - "1k": consecutive coordinates, rows and columns ``d`` apart (200 um on a real 1k);
    - "2k": a checkerboard (x + y even), one array step ``d / sqrt 2`` along each axis:
      nearest neighbours diagonal at ``d``, same-row neighbours ``sqrt(2) d`` apart
      (141 and 200 um on a real 2k array: STUtility's platform "2k");
    - "visium": Visium's checkerboard convention (array_col = 2 * column + row parity),
      hexagonally packed, all six neighbours ``d`` apart (100 um on a real slide);
    - "stagger": consecutive x, but rows shifted by half a step on odd rows of even y
      with x steps of half the neighbour distance (no real array has it: our earlier
      test of a "staggered" array assumed one; an ambiguous geometry now).
    """
    rng = np.random.default_rng(1)
    if layout == "1k":
        pts = [(x, y, x * d, y * d) for y in range(rows) for x in range(cols)]
    elif layout == "2k":
        s = d / np.sqrt(2)
        pts = [(x, y, x * s, y * s) for y in range(rows) for x in range(2 * cols) if (x + y) % 2 == 0]
    elif layout == "visium":
        pts = [(2 * c + r % 2, r, (c + (r % 2) / 2) * d, r * d * np.sqrt(3) / 2)
               for r in range(rows) for c in range(cols)]
    else:  # stagger: rows at even y, x of alternating parity: neighbours 2 x steps apart
        pts = [(x, y, x * d / 2, y * d * 0.55) for y in range(0, 2 * rows, 2)
               for x in range(y // 2 % 2, 2 * cols, 2)]
    xs, ys, px, py = (np.array(v) for v in zip(*pts))
    sp = pd.DataFrame({"x": xs, "y": ys, "pixel_x": 40 + px, "pixel_y": 40 + py, "selected": 1})
    cnt = pd.DataFrame(rng.poisson(3, size=(len(sp), 4)) + 1, columns=list("ABCD"),
                       index=[f"{x}x{y}" for x, y in zip(xs, ys)])
    folder.mkdir(parents=True, exist_ok=True)
    cnt.to_csv(folder / "counts.tsv", sep="\t")
    sp.to_csv(folder / "spots.tsv", sep="\t", index=False)
    return folder / "counts.tsv", folder / "spots.tsv"


@pytest.mark.parametrize("layout, nearest_um, pitch_um, grid", [
    ("1k", 200.0, 200.0, "square"), ("2k", 200 / np.sqrt(2), 200.0, "checkerboard"),
    ("visium", 100.0, 100.0, "hex")])
def test_array_layout_is_told_from_the_geometry(tmp_path, recwarn, layout, nearest_um, pitch_um,
                                                grid):
    """SYNTHETIC arrays (see _write_array), nearest neighbours 45 px apart: a checkerboard
    whose diagonal neighbours are d px apart gets 141.4 / d um/px, a 1k array 200 / d, a
    hexagonal one 100 / d, without being told and without a warning."""
    c, s = _write_array(tmp_path, layout)
    a = ds.from_files(c, s, None, section="S")
    md = a.uns["spatial"]["S"]["metadata"]
    assert md["um_per_px"] == pytest.approx(nearest_um / 45.0, rel=1e-6)
    assert md["array"] == layout and md["grid"] == grid and md["array_from"].startswith("auto")
    assert md["spot_pitch_um"] == pitch_um
    assert md["spot_spacing_um"] == pytest.approx(nearest_um, abs=1e-3)
    assert md["spot_diameter_um"] == {"1k": 100, "2k": 100, "visium": 55}[layout]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert ds.array_layout(a.obs[["array_x", "array_y"]].to_numpy(), a.obsm["spatial"])[
        "row_ratio"] == pytest.approx({"1k": 1, "2k": np.sqrt(2), "visium": 1}[layout])


def test_array_layout_overrides_and_an_ambiguous_geometry(tmp_path):
    """SYNTHETIC: array= wins (and says so when the geometry contradicts it), spot_pitch_um
    scales the layout, um_per_px wins over everything; a geometry that fits no array
    warns and names both readings."""
    c, s = _write_array(tmp_path / "a", "2k")
    with pytest.warns(UserWarning, match=r"array='1k' was given.*checkerboard.*2k array"):
        a = ds.from_files(c, s, None, section="S", array="1k")
    md = a.uns["spatial"]["S"]["metadata"]
    assert md["array"] == "1k" and md["array_from"] == "given (array='1k')"
    assert md["um_per_px"] == pytest.approx(200 / (45 / np.sqrt(2)))  # one step = 200 um
    b = ds.from_files(c, s, None, section="S", spot_pitch_um=100.0)  # a 2k design at half scale
    assert b.uns["spatial"]["S"]["metadata"]["um_per_px"] == pytest.approx(70.71 / 45, rel=1e-4)
    g = ds.from_files(c, s, None, section="S", um_per_px=3.14)
    assert g.uns["spatial"]["S"]["metadata"]["um_per_px"] == 3.14
    assert g.uns["spatial"]["S"]["metadata"]["array"] == "2k"
    with pytest.raises(ValueError, match=r"array must be 'auto' or one of \['1k', '2k', 'visium'\]"):
        ds.from_files(c, s, None, section="S", array="3k")
    c, s = _write_array(tmp_path / "b", "stagger")
    with pytest.warns(UserWarning, match=r"fit no known array well.*nearest neighbours are 1\.9\d "
                                         r"array steps apart.*array='1k'.*4\.444 um/px.*um_per_px="):
        a = ds.from_files(c, s, None, section="S")
    md = a.uns["spatial"]["S"]["metadata"]
    assert md["array_from"].endswith("(ambiguous)")
    assert md["um_per_px"] == pytest.approx(200 / 45)  # nearest neighbours taken as the pitch


def test_um_per_px_given_wins_and_a_disagreement_is_said(tmp_path, recwarn):
    c, s, i = _write_section(tmp_path)  # square grid, 100 px pitch: 2.0 um/px
    a = ds.from_files(c, s, i, section="S", um_per_px=2.1)
    assert a.uns["spatial"]["S"]["metadata"]["um_per_px"] == 2.1
    assert a.uns["spatial"]["S"]["metadata"]["scale_from"] == "given (um_per_px=)"
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with pytest.warns(UserWarning, match=r"um_per_px=0.5 was given.*show 2\.000 um/px"):
        ds.from_files(c, s, i, section="S", um_per_px=0.5)
    with pytest.raises(ValueError, match="um_per_px must be a positive number"):
        ds.from_files(c, s, i, section="S", um_per_px=0)


def test_unselected_spots_are_counted_kept_on_request_and_warned_about(tmp_path):
    def unselect(sp):  # 6 of the 12 spot rows marked as not selected
        return sp.assign(selected=[1, 0] * 6)

    c, s, i = _write_section(tmp_path, spots=unselect)
    with pytest.warns(UserWarning, match=r"kept 6 of the 12 rows.*6 with selected != 1.*selected=False"):
        a = ds.from_files(c, s, i, section="S")
    assert a.n_obs == 6
    assert a.uns["mclstexp"]["spots_dropped"] == {
        "not_selected": 6, "counts_without_spot_row": 6, "spot_rows_without_counts": 0,
        "zero_counts": 0}
    everything = ds.from_files(c, s, i, section="S", selected=False)
    assert everything.n_obs == 12 and everything.uns["mclstexp"]["spots_dropped"]["not_selected"] == 0


def test_a_few_dropped_spots_are_logged_not_warned(tmp_path, caplog, recwarn):
    import logging

    c, s, i = _write_section(tmp_path, counts=lambda cn: cn.iloc[1:])  # 1 of 12 rows: 8 %
    with caplog.at_level(logging.INFO, logger="mclstexp_lite.datasets"):
        a = ds.from_files(c, s, i, section="S")
    assert a.n_obs == 11 and "1 spot row(s) without a count row" in caplog.text
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_messages_that_say_the_fix(tmp_path):
    """SYNTHETIC files with the common mistakes: a comma-separated file named .tsv,
    counts and spots swapped, the count table transposed, a missing image."""
    c, s, i = _write_section(tmp_path)
    comma = tmp_path / "comma_counts.tsv"
    pd.read_csv(c, sep="\t", index_col=0).to_csv(comma)  # commas, .tsv name
    with pytest.raises(ValueError, match=r"comma_counts\.tsv: read as tab-separated.*',' .*Rename it to \.csv"):
        ds.from_files(comma, s, i, section="S")
    with pytest.raises(ValueError, match=r"columns of a spot file.*counts and spots arguments swapped"):
        ds.from_files(s, c, i, section="S")
    with pytest.raises(ValueError, match=r"columns look like spot ids.*counts_orientation='genes_x_spots'"):
        transposed = tmp_path / "t.tsv"
        pd.read_csv(c, sep="\t", index_col=0).T.to_csv(transposed, sep="\t")
        ds.from_files(transposed, s, i, section="S")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.jpg \(the `image` argument"):
        ds.from_files(c, s, tmp_path / "nope.jpg", section="S")


def test_spots_off_the_tissue_or_squeezed_into_a_corner_are_warned_about(tmp_path):
    """SYNTHETIC: a white image with stained tissue only where the spots are not (another
    section's image), and spot pixels 10x too small (a wrong pixel_scale)."""
    from PIL import Image

    c, s, i = _write_section(tmp_path)
    img = np.full((400, 500, 3), 250, np.uint8)
    img[300:, 400:] = (170, 60, 150)  # tissue in a corner, away from the spots
    Image.fromarray(img).save(i)
    with pytest.warns(UserWarning, match=r"only 8% of the spots lie on stained tissue"):
        a = ds.from_files(c, s, i, section="S")  # 1 of 12 spots is on the corner's tissue
    assert a.uns["spatial"]["S"]["metadata"]["spots_on_tissue"] == pytest.approx(1 / 12, abs=1e-4)
    (tmp_path / "b").mkdir()
    c, s, i = _write_section(tmp_path / "b")
    with pytest.warns(UserWarning, match=r"spots cover only 1\.0% of the image"):
        ds.from_files(c, s, i, section="S", pixel_scale=0.1)


def test_stain_under_the_spots_is_compared_with_the_rest_of_the_image(tmp_path):
    """SYNTHETIC images: tissue drawn exactly around the spots (no warning, a high stain
    contrast) vs tissue over the left half of the image, where half of the spots' centres
    are stained (the on-tissue check passes) but there is as much stain elsewhere."""
    from PIL import Image, ImageDraw

    c, s, i = _write_section(tmp_path)
    img = Image.new("RGB", (500, 400), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for x in range(1, 5):
        for y in range(1, 4):
            draw.ellipse((x * 100 - 45, y * 100 - 45, x * 100 + 45, y * 100 + 45),
                         fill=(170, 60, 150))
    img.save(i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = ds.from_files(c, s, i, section="S")
    md = a.uns["spatial"]["S"]["metadata"]
    assert md["stain_under_spots"] > 0.7 and md["stain_elsewhere"] < 0.01
    assert md["stain_contrast"] > 50
    img = np.full((400, 500, 3), 250, np.uint8)
    img[:370, :250] = (170, 60, 150)
    Image.fromarray(img).save(i)
    with pytest.warns(UserWarning, match=r"S: little stain under the spots compared with the "
                                         r"rest of the image .*he\.jpg.*pixel_scale \(now 1\)"):
        a = ds.from_files(c, s, i, section="S")
    md = a.uns["spatial"]["S"]["metadata"]
    assert md["spots_on_tissue"] >= 0.5 and md["stain_contrast"] < ds.MIN_STAIN_CONTRAST


def test_a_wholly_stained_image_is_not_a_stain_contrast_warning(tmp_path, recwarn):
    """SYNTHETIC random-noise image (every pixel 'stained', like an image cropped to the
    tissue): the comparison says nothing, so it does not warn."""
    c, s, i = _write_section(tmp_path)
    a = ds.from_files(c, s, i, section="S")
    assert a.uns["spatial"]["S"]["metadata"]["stain_elsewhere"] > ds.MAX_STAINED_ELSEWHERE
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@needs_data
def test_her2st_sections_pass_the_stain_check(her2_c2, her2_a1):
    for a, s in ((her2_c2, "C2"), (her2_a1, "A1")):
        assert a.uns["spatial"][s]["metadata"]["stain_contrast"] > ds.MIN_STAIN_CONTRAST


@needs_data
def test_another_sections_image_or_a_wrong_scale_is_warned_about(data_root):
    """Real HER2+ files: C5's spots on B4's image (another patient) and C3's spots with
    a pixel_scale 10x too small."""
    d = data_root / "her2st" / "data"
    b4_image = next((d / "ST-imgs" / "B" / "B4").glob("*.jpg"))
    with pytest.warns(UserWarning, match=r"C5: little stain under the spots.*BT10737_D2_HE\.jpg"):
        a = ds.from_files(d / "ST-cnts" / "C5.tsv.gz", d / "ST-spotfiles" / "C5_selection.tsv",
                          b4_image, section="C5")
    assert a.uns["spatial"]["C5"]["metadata"]["stain_contrast"] < ds.MIN_STAIN_CONTRAST
    c3_image = next((d / "ST-imgs" / "C" / "C3").glob("*.jpg"))
    with pytest.warns(UserWarning) as got:
        ds.from_files(d / "ST-cnts" / "C3.tsv.gz", d / "ST-spotfiles" / "C3_selection.tsv",
                      c3_image, section="C3", pixel_scale=0.1)
    text = " ".join(str(w.message) for w in got)
    assert "spots cover only" in text and "lie on stained tissue" in text


def _write_with_ids(folder: Path):
    """SYNTHETIC section whose count table names genes by versioned Ensembl ids."""
    ids = [f"ENSG{i:011d}.3" for i in range(5)]
    return _write_section(folder, counts=lambda cn: cn.set_axis(ids, axis=1)), ids


def test_gene_map_adds_symbols_that_a_symbol_panel_finds(tmp_path):
    from mclstexp_lite import pp

    (c, s, i), ids = _write_with_ids(tmp_path)
    table = tmp_path / "features.tsv.gz"
    pd.DataFrame({"gene_id": [g.split(".")[0] for g in ids],
                  "gene_name": ["ERBB2", "GNAS", "FASN", "CD74", "ACTB"]}).to_csv(
        table, sep="\t", index=False)
    a = ds.from_files(c, s, i, section="S", gene_map=table)
    assert list(a.var_names) == ids and list(a.var["gene_ids"]) == ids
    assert list(a.var["gene_symbols"]) == ["ERBB2", "GNAS", "FASN", "CD74", "ACTB"]
    assert a.uns["mclstexp"]["files"]["gene_map"] == str(table)
    out = pp.subset_genes(a, ["FASN", "ERBB2"])
    np.testing.assert_array_equal(out.X.toarray(), a.X.toarray()[:, [2, 0]])
    few = tmp_path / "few.tsv"
    few.write_text(f"{ids[0]}\tERBB2\n")
    with pytest.warns(UserWarning, match=r"gives a symbol to only 1 of the 5 genes"):
        b = ds.from_files(c, s, i, section="S", gene_map=few)
    assert list(b.var["gene_symbols"]) == ["ERBB2", "", "", "", ""]


def test_gene_map_mistakes_name_the_table_and_the_fix(tmp_path):
    (c, s, i), ids = _write_with_ids(tmp_path)
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("".join(f"SYM{k}\t{g}\n" for k, g in enumerate(ids)))
    with pytest.raises(ValueError, match=r"second column of .*swapped\.tsv.*Swap the columns"):
        ds.from_files(c, s, i, section="S", gene_map=swapped)
    other = tmp_path / "mouse.tsv"
    other.write_text("ENSMUSG00000000001\tGnai3\n")
    with pytest.raises(ValueError, match=r"none of the gene names of .*counts\.tsv.*mouse\.tsv"
                                         r".*another organism"):
        ds.from_files(c, s, i, section="S", gene_map=other)
    clash = tmp_path / "clash.tsv"
    clash.write_text(f"{ids[0]}\tERBB2\n{ids[0]}\tHER2\n")
    with pytest.raises(ValueError, match=r"clash\.tsv \(the `gene_map` table\): 1 id\(s\) map to "
                                         r"more than one symbol"):
        ds.from_files(c, s, i, section="S", gene_map=clash)


# ------------------------------------------------- bad input (from test_bad_input.py)
def test_jpeg_damaged_mid_stream_is_named_by_loader_and_extraction(tmp_path):
    """A JPEG with overwritten bytes (not truncated) fails decoding with the file named."""
    c, s, img = write_section(tmp_path)
    damage_jpeg(img, "overwritten")
    with pytest.raises(ValueError, match=r"he\.jpg.*(truncated or corrupt|corrupt)"):
        ds.from_files(c, s, img, section="S")
    with pytest.raises(ValueError, match="re-download") as err:
        P.extract_patches(img, [[100.0, 100.0]], crop_px=20)
    assert str(img) in str(err.value)


@needs_data
@pytest.mark.parametrize("kind, damage", [("counts", "flip"), ("image", "truncate")])
def test_her2st_loader_refuses_files_that_fail_their_checksum(tmp_path, kind, damage):
    """Real C2 files copied under a new data root, one of them altered."""
    rows = {r.kind: r for r in dl.rows("her2st", "C2", kind=("counts", "spots", "image"))}
    for r in rows.values():
        dest = tmp_path / r.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / r.path, dest)  # content only: the copy is writable
    target = tmp_path / rows[kind].path
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    target.write_bytes(bytes(data))
    with pytest.raises(dl.ChecksumError) as err:
        ds.her2st("C2", data_dir=tmp_path, download=False, progress=False)
    msg = str(err.value)
    assert str(target) in msg and "delete" in msg.lower() and rows[kind].url in msg


def test_missing_section_files_offline_list_every_file_and_the_fix(tmp_path, monkeypatch):
    """An empty data root with downloads off (MCLSTEXP_OFFLINE=1, as in CI)."""
    monkeypatch.setenv("MCLSTEXP_OFFLINE", "1")
    with pytest.raises(dl.DataMissingError) as err:
        ds.her2st("C3", data_dir=tmp_path, progress=False)
    msg = str(err.value)
    for row in dl.rows("her2st", "C3", kind=("counts", "spots")):
        assert str(tmp_path / row.path) in msg and row.url in msg
    assert "MCLSTEXP_DATA" in msg and "switched off" in msg
    assert listing(tmp_path) == []  # nothing was created while failing
    with pytest.raises(dl.DataMissingError, match="P2_ST_rep1"):
        ds.load("cscc", "P2_ST_rep1", data_dir=tmp_path, progress=False)


def test_partial_count_spot_mismatch_keeps_the_shared_spots_and_logs_it(tmp_path, caplog):
    c, s, img = write_section(
        tmp_path,
        counts=lambda t: pd.concat([t, t.iloc[:1].set_axis(["9x9"])]),  # no spot row
        spots=lambda f: f.drop(index=5))  # 2x2 loses its spot row
    with caplog.at_level(logging.INFO, logger="mclstexp_lite.datasets"):
        a = ds.from_files(c, s, img, section="S")
    assert a.n_obs == 11 and "S_2x2" not in a.obs_names and "S_9x9" not in a.obs_names
    assert "kept 11 of the 11 rows" in caplog.text
    assert "plus 2 count row(s) without a spot row" in caplog.text


def test_spot_file_rows_sharing_rounded_coordinates_are_refused(tmp_path):
    # row 1 moves to (0.98, 0.97): it rounds to 1x1, the id of row 0
    c, s, img = write_section(tmp_path, spots=lambda f: f.assign(
        x=np.where(f.index == 1, f.x.iloc[0] - 0.04, f.x),
        y=np.where(f.index == 1, f.y.iloc[0], f.y)))
    with pytest.raises(ValueError,
                       match=r"spots\.tsv: 1 spot\(s\) share rounded array coordinates"):
        ds.from_files(c, s, img, section="S")


@pytest.mark.parametrize("spots, match", [
    (lambda f: f.assign(pixel_x=["a"] * len(f)),
     r"non-numeric values in column\(s\) \['pixel_x'\]"),
    (lambda f: f.assign(x=f.x.astype(str) + "?"), r"non-numeric values in column\(s\) \['x'\]"),
    (lambda f: f.assign(pixel_y=np.where(f.index == 3, np.nan, f.pixel_y)),
     r"1 spot row\(s\) with missing \(NaN\)"),
])
def test_spot_file_coordinates_must_be_numbers(tmp_path, spots, match):
    """Before the fix these gave a bare pandas error, or (NaN) a silent NaN image scale."""
    c, s, img = write_section(tmp_path, spots=spots)
    with pytest.raises(ValueError, match=match) as err:
        ds.from_files(c, s, img, section="S")
    assert str(s) in str(err.value)


def test_zero_count_spots_all_zero_and_kept_zero(tmp_path, caplog):
    import warnings

    c, s, img = write_section(tmp_path, counts=lambda t: t * 0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"counts\.tsv: no spots with counts left") as err:
            ds.from_files(c, s, img, section="S")
    assert "spots.tsv" in str(err.value)
    assert any("12 with zero counts" in str(w.message) for w in rec)
    # kept on request, normalisation then names the section and the count of such spots
    c, s, img = write_section(tmp_path / "b", counts=lambda t: t.mul(
        (t.index != "3x2").astype(int), axis=0))
    a = ds.from_files(c, s, img, section="S", drop_zero_count_spots=False)
    assert a.n_obs == 12
    with pytest.raises(ValueError, match=r"section S: 1 of 12 spot\(s\) have zero total counts"):
        pp.normalize(a)


@pytest.mark.parametrize("name", ["visium_fixture", "mclstexp_panels", "x"])
def test_list_sections_accepts_only_datasets_with_sections(name):
    """Manifest entries without sections (a gene panel, the Visium fixture) are not
    offered as valid names, and Visium users are told how to load their data."""
    with pytest.raises(ValueError) as err:
        ds.list_sections(name)
    msg = str(err.value)
    assert repr(name) in msg and "her2st, cscc" in msg and "datasets.visium(" in msg
    assert "mclstexp_panels" not in msg.replace(repr(name), "")


def test_from_files_missing_image_says_not_found(tmp_path):
    c, s, img = write_section(tmp_path)
    img.unlink()
    with pytest.raises(FileNotFoundError) as err:
        ds.from_files(c, s, img, section="S")
    assert str(img) in str(err.value) and "not found" in str(err.value)
    assert "corrupt" not in str(err.value)


# ------------------------------------------------ AnnData in scanpy's layout (from_anndata)
def read_visium_like_scanpy(path: Path, library_id: str = "fixture"):
    """The Visium fixture as ``sc.read_visium`` lays it out, step by step with scanpy's own
    pieces (``sc.read_10x_h5``, matplotlib's ``imread``, the positions file read as scanpy
    reads it, ``obsm['spatial']`` = full-resolution x, y). scanpy 1.11 and squidpy 1.8
    cannot read this folder themselves: its older .h5 has no ``library_ids`` attribute
    (pass library_id=) and there is no tissue_hires_image.png, which both readers require
    when they load images; a user with such a folder builds the same object by hand."""
    import json

    import scanpy as sc
    from matplotlib.image import imread

    a = sc.read_10x_h5(path / "filtered_feature_bc_matrix.h5")
    a.var_names_make_unique()
    a.uns["spatial"] = {library_id: {
        "images": {"lowres": imread(str(path / "spatial" / "tissue_lowres_image.png"))},
        "scalefactors": json.loads((path / "spatial" / "scalefactors_json.json").read_bytes()),
        "metadata": {}}}
    pos = pd.read_csv(path / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    pos.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                   "pxl_col_in_fullres"]
    a.obs = a.obs.join(pos, how="left")
    a.obsm["spatial"] = a.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    a.obs = a.obs.drop(columns=["pxl_row_in_fullres", "pxl_col_in_fullres"])
    return a


@needs_data
def test_from_anndata_on_the_real_visium_fixture_loaded_as_scanpy_does(data_root, tmp_path):
    path = data_root / "seurat_visium"
    a = read_visium_like_scanpy(path)
    assert a.uns["spatial"]["fixture"]["images"]["lowres"].dtype == np.float32  # matplotlib
    with pytest.warns(UserWarning, match=r"no full-resolution image was given, so patches come "
                                         r"from the lowres image at 14\.0\d um/px.*image="):
        s = ds.from_anndata(a)
    assert s.shape == (2695, 100) and s.X.dtype == np.int32
    assert list(s.var["gene_ids"][:2]) == list(a.var["gene_ids"][:2])  # var columns kept
    md = s.uns["spatial"]["fixture"]["metadata"]
    assert md["array"] == "visium" and md["grid"] == "hex" and md["spot_pitch_um"] == 100
    lowres_scalef = 0.051635113
    assert md["pixel_scale"] == pytest.approx(lowres_scalef)
    np.testing.assert_allclose(s.obsm["spatial"], a.obsm["spatial"] * lowres_scalef)
    # 100 um between neighbouring spots (the geometry) agrees with Space Ranger's 65 um
    # spot_diameter_fullres (89.47 px) within 0.3 %
    assert md["um_per_px"] == pytest.approx(65 / (89.47248494250101 * lowres_scalef), rel=0.003)
    assert md["spots_on_tissue"] > 0.9
    # the same spots, counts and pixels as the Space Ranger loader
    v = ds.visium(path)
    assert list(v.obs_names) == list(s.obs_names)
    assert (v.X != s.X).nnz == 0
    np.testing.assert_allclose(v.obsm["spatial"], s.obsm["spatial"], rtol=1e-6)
    assert v.uns["spatial"]["seurat_visium"]["metadata"]["um_per_px"] == pytest.approx(
        md["um_per_px"], rel=0.003)
    # squidpy reads PNGs as uint8: same section
    b = a.copy()
    b.uns["spatial"]["fixture"]["images"]["lowres"] = np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(path / "spatial" / "tissue_lowres_image.png"
                                                         ).convert("RGB"))
    with pytest.warns(UserWarning, match="lowres image"):
        s2 = ds.from_anndata(b)
    assert s2.uns["spatial"]["fixture"]["metadata"]["source_image_path"] == md["source_image_path"]
    patches = P.patch_cache(s, out_size=32, cache_dir=tmp_path, progress=False)
    assert patches.shape == (2695, 32, 32, 3)


@needs_data
def test_from_anndata_with_the_full_resolution_image_equals_the_loader(her2_c2, tmp_path):
    """HER2+ C2 put into scanpy's layout (full-resolution obsm['spatial'], the hires copy
    with its scale factor, array_row/array_col) plus image=: same scale and patches."""
    import anndata as ad

    lib = her2_c2.uns["spatial"]["C2"]
    a = ad.AnnData(X=her2_c2.X.astype(np.float32), var=pd.DataFrame(index=her2_c2.var_names),
                   obs=pd.DataFrame({"in_tissue": 1, "array_col": her2_c2.obs["array_x"].to_numpy(),
                                     "array_row": her2_c2.obs["array_y"].to_numpy()},
                                    index=her2_c2.obs_names))
    a.obsm["spatial"] = her2_c2.obsm["spatial"].copy()
    a.uns["spatial"] = {"C2": {"images": {"hires": lib["images"]["hires"]},
                               "scalefactors": dict(lib["scalefactors"])}}
    s = ds.from_anndata(a, image=lib["metadata"]["source_image_path"])
    md = s.uns["spatial"]["C2"]["metadata"]
    assert md["array"] == "1k" and md["scale_from"] == "spot geometry (1k array)"
    assert md["um_per_px"] == pytest.approx(lib["metadata"]["um_per_px"], rel=1e-9)
    np.testing.assert_array_equal(P.patch_cache(s, out_size=32, cache_dir=tmp_path, progress=False),
                                  P.patch_cache(her2_c2, out_size=32, cache_dir=tmp_path,
                                                progress=False))
    # without the full-resolution image: the hires copy (2000 px) through its scale factor
    with pytest.warns(UserWarning, match=r"patches come from the hires image at 3\.\d\d um/px"):
        h = ds.from_anndata(a)
    assert h.uns["spatial"]["C2"]["metadata"]["pixel_scale"] == pytest.approx(
        lib["scalefactors"]["tissue_hires_scalef"])


def test_from_anndata_bad_input():
    """SYNTHETIC AnnData objects with the usual mistakes."""
    import anndata as ad

    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(2, (10, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"no obsm\['spatial'\].*squidpy\.read\.visium"):
        ds.from_anndata(a)
    a.obsm["spatial"] = rng.uniform(0, 100, (10, 2))
    a.uns["spatial"] = {"L1": {}, "L2": {}}
    with pytest.raises(ValueError, match=r"2 libraries \(L1, L2\); pass library_id="):
        ds.from_anndata(a)
    with pytest.raises(ValueError, match=r"no image: .*images'\] has no hires or lowres.*image="):
        ds.from_anndata(a, library_id="L1", um_per_px=1.0)
    with pytest.raises(ValueError, match=r"no pixel size.*um_per_px="):
        ds.from_anndata(a, library_id="L1")
    b = a.copy()
    b.X = np.log1p(b.X)
    with pytest.raises(ValueError, match=r"no raw counts.*non-integer.*layers\['counts'\]"):
        ds.from_anndata(b, library_id="L1")
    with pytest.raises(TypeError, match="needs an AnnData"):
        ds.from_anndata(a.to_df())


# ------------------------------------------------------------ issue 20: bad input
@needs_data
def test_counts_and_spots_of_different_sections_ask_whether_they_belong_together(data_root):
    """Real HER2+ files: C2's counts with C3's spot file (one array design, so the spot
    ids overlap in part) ask "same section?"; C2's own files do not."""
    d = data_root / "her2st" / "data"
    with pytest.warns(UserWarning, match=r"are C2\.tsv\.gz and C3_selection\.tsv from the same "
                                         r"section\?"):
        ds.from_files(d / "ST-cnts" / "C2.tsv.gz", d / "ST-spotfiles" / "C3_selection.tsv", None,
                      section="C2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.from_files(d / "ST-cnts" / "C2.tsv.gz", d / "ST-spotfiles" / "C2_selection.tsv", None,
                      section="C2")


def test_empty_table_and_own_unreadable_image_messages(tmp_path):
    """SYNTHETIC: a 0-byte count table is named as empty (not pandas' "No columns to
    parse"); a user's own unreadable image is not told to re-download it from the
    manifest."""
    c, s, i = _write_section(tmp_path)
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.tsv is empty \(0 bytes\)") as err:
        ds.from_files(empty, s, i, section="S")
    assert "No columns" not in str(err.value)
    i.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"he\.jpg.*opens in an image viewer") as err:
        ds.from_files(c, s, i, section="S")
    assert "manifest" not in str(err.value) and "download" not in str(err.value)
