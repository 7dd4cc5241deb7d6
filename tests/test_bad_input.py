"""Reliability: bad input gives a clear error that names the file, section or parameter.

Many bad-input cases are tested next to the code they guard (test_datasets, test_download,
test_patches, test_train, test_pp, test_metrics, test_retrieve). This file covers what
those leave out, mostly through the public entry points a tutorial calls, plus a few
tables that exercise several entry points with the same kind of mistake. Every message is
checked for the thing it must name, so a test fails if an error loses its context.

Covered elsewhere and not repeated here: truncated or non-image JPEGs in ``from_files``
and ``extract_patches``, NaN / negative / non-integer / text counts, duplicated count
ids, spots outside the image and zero-count spots being dropped (test_datasets,
test_patches); checksum mismatches and interrupted downloads in ``fetch``
(test_download); dense NaN / negative counts in ``normalize`` and ``subset_genes``
with absent genes (test_pp); NaN inputs of the metrics and of ``retrieve``
(test_metrics, test_retrieve); bad ``TrainConfig`` fields, an existing checkpoint
without ``resume`` / ``overwrite`` and an interrupted checkpoint write (test_train).

Sections built here are SYNTHETIC (random counts, a random-noise "H&E" JPEG on a 4 x 3
grid of spots) unless the test is marked ``needs_data``; those copy real HER2+ files from
the shared data folder and skip without it.
"""

from __future__ import annotations

import ast
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from PIL import Image

from mclstexp_lite import datasets as ds
from mclstexp_lite import download as dl
from mclstexp_lite import metrics, pp
from mclstexp_lite import models as mdl
from mclstexp_lite import patches as P
from mclstexp_lite import train as tr

from .conftest import REPO, SHARED_DATA, needs_data

torch.set_num_threads(2)

PACKAGE = REPO / "mclstexp_lite"


# ----------------------------------------------------------------------------- helpers
def write_section(folder: Path, *, counts=None, spots=None, seed: int = 0):
    """SYNTHETIC legacy-ST section: 12 spots on a 4 x 3 grid 100 px apart, 500 x 400 px JPEG.

    ``counts`` / ``spots`` are functions that alter the count table / spot file before
    they are written. Returns the three paths (counts, spots, image).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(1, 5), np.arange(1, 4))
    xs, ys = xs.ravel(), ys.ravel()
    spot = pd.DataFrame({"x": xs + 0.02, "y": ys - 0.03, "pixel_x": xs * 100.0,
                         "pixel_y": ys * 100.0, "selected": 1})
    cnt = pd.DataFrame(rng.poisson(3, size=(12, 6)) + 1, columns=[f"G{i}" for i in range(6)],
                       index=[f"{x}x{y}" for x, y in zip(xs, ys)])
    if counts is not None:
        cnt = counts(cnt)
    if spots is not None:
        spot = spots(spot)
    cnt.to_csv(folder / "counts.tsv", sep="\t")
    spot.to_csv(folder / "spots.tsv", sep="\t", index=False)
    image = folder / "he.jpg"
    Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)).save(image, quality=95)
    return folder / "counts.tsv", folder / "spots.tsv", image


def damage_jpeg(path: Path, how: str) -> None:
    """Truncate a JPEG to a third, or overwrite 512 bytes in the middle of its data.

    The overwrite uses 0xFF bytes, which cannot occur in a row in entropy-coded JPEG
    data, so the decoder notices. Most other overwrites (zeros, stuffed 0xFF 0x00 pairs,
    restart markers) decode silently into wrong pixels: only a checksum catches those,
    which is why the loaders verify every file against the manifest.
    """
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        mid = len(data) // 2
        data[mid : mid + 512] = b"\xff" * 512
        path.write_bytes(bytes(data))


def synthetic_spotdata(*, n_per=(12, 10), genes=6, size=32, seed=0, patches=None, expr=None):
    """SYNTHETIC SpotData: random uint8 patches and expression for two small sections."""
    rng = np.random.default_rng(seed)
    n = sum(n_per)
    if patches is None:
        patches = [rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8) for k in n_per]
    if expr is None:
        expr = rng.random((n, genes), dtype=np.float32)
    return tr.SpotData(patches=patches, expr=expr, pos=rng.integers(0, 10, (n, 2)),
                       groups=np.repeat(np.arange(len(n_per)), n_per),
                       sections=[f"S{i}" for i in range(len(n_per))],
                       genes=[f"g{i}" for i in range(genes)],
                       obs_names=[f"spot{i}" for i in range(n)])


def tiny_config(**kw) -> tr.TrainConfig:
    base = dict(epochs=1, batch_size=8, lr=1e-3, image_size=32, device="cpu", seed=1,
                model={"image_arch": "resnet18", "weights": None, "n_pos": 16})
    base.update(kw)
    return tr.TrainConfig.from_dict(base).validate()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One epoch of a tiny model on SYNTHETIC data; returns the output folder.

    ``mode="frozen"`` (frozen backbone): a 46 MB checkpoint written in about a second,
    instead of 131 MB (with the backbone's Adam moments) and ten times as long.
    """
    out = tmp_path_factory.mktemp("run")
    tr.train(synthetic_spotdata(), tiny_config(mode="frozen"), out_dir=out, progress=False)
    return out


def fresh_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def listing(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------- damaged images: loader and patches
def test_jpeg_damaged_mid_stream_is_named_by_loader_and_extraction(tmp_path):
    """A JPEG with overwritten bytes (not truncated) fails decoding with the file named."""
    c, s, img = write_section(tmp_path)
    damage_jpeg(img, "overwritten")
    with pytest.raises(ValueError, match=r"he\.jpg.*(truncated or corrupt|corrupt)"):
        ds.from_files(c, s, img, section="S")
    with pytest.raises(ValueError, match="re-download") as err:
        P.extract_patches(img, [[100.0, 100.0]], crop_px=20)
    assert str(img) in str(err.value)


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_patch_cache_of_damaged_image_names_it_and_writes_nothing(tmp_path, how):
    """The image is fine when the section loads and damaged later, when patches are cut."""
    c, s, img = write_section(tmp_path / "sec")
    adata = ds.from_files(c, s, img, section="S")
    damage_jpeg(img, how)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="re-download") as err:
        P.patch_cache(adata, cache_dir=cache, progress=False)
    assert str(img) in str(err.value)
    assert listing(cache) == []


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


# ---------------------------------------------------------------- counts and spot files
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


# --------------------------------------------------------------- NaN / negative values
@pytest.mark.parametrize("bad, match", [(np.nan, "1 NaN value"), (-2.0, "1 negative value")])
def test_normalize_refuses_bad_values_in_sparse_counts(bad, match):
    """SYNTHETIC sparse counts (test_pp covers dense ones); the section is named."""
    X = np.random.default_rng(1).poisson(2.0, (20, 8)).astype(np.float32) + 1
    X[4, 2] = bad
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"section": ["S7"] * 20},
                                                       index=[str(i) for i in range(20)]))
    with pytest.raises(ValueError, match=f"section S7: adata.X holds {match}"):
        pp.normalize(a)
    assert pp.NORMALIZE_KEY not in a.uns and "counts" not in a.layers


def test_non_finite_or_text_expression_is_refused_by_spotdata():
    with pytest.raises(ValueError, match="SpotData: expression has 1 non-finite"):
        expr = np.ones((22, 6), np.float32)
        expr[3, 1] = np.nan
        synthetic_spotdata(expr=expr)
    with pytest.raises(TypeError, match="SpotData: expr must be a numeric"):
        synthetic_spotdata(expr=np.full((22, 6), "x"))


def test_metrics_name_the_nan_input_and_accept_negative_values():
    """SYNTHETIC values. NaN is an error naming `pred` or `true` (also for AnnData input);
    negative values are valid (e.g. z-scored expression) and give the plain formulas."""
    rng = np.random.default_rng(3)
    true = rng.normal(size=(30, 5))
    pred = true + rng.normal(scale=0.5, size=true.shape)
    assert (true < 0).any()
    assert metrics.mse(pred, true) == pytest.approx(np.mean((pred - true) ** 2), rel=1e-12)
    assert metrics.mae(pred, true) == pytest.approx(np.mean(np.abs(pred - true)), rel=1e-12)
    r = [np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in range(5)]
    assert metrics.pcc_acg(pred, true) == pytest.approx(np.mean(r), rel=1e-10)
    bad = ad.AnnData(X=np.where(np.arange(5) == 2, np.nan, true).astype(np.float32))
    with pytest.raises(ValueError, match=r"`true` contains 30 NaN"):
        metrics.summarize(pred, bad)


# ------------------------------------------------------------------- gene panels
@pytest.mark.parametrize("method", ["library_size", "published"])
def test_prepare_with_panel_genes_missing_from_a_section(method, caplog):
    """SYNTHETIC section named in obs; the error lists the absent genes and the fix."""
    X = np.random.default_rng(2).poisson(3.0, (15, 4)) + 1
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)),
                   obs=pd.DataFrame({"section": ["B7"] * 15}, index=[f"s{i}" for i in range(15)]),
                   var=pd.DataFrame(index=["ERBB2", "KRT5", "GATA3", "ESR1"]))
    panel = ["ERBB2", "FOXA1", "ESR1", "MKI67"]
    with pytest.raises(ValueError) as err:
        pp.prepare({"B7": a}, panel, method=method)
    msg = str(err.value)
    assert "section B7: 2 of the 4 panel genes" in msg and "FOXA1" in msg and "MKI67" in msg
    assert "missing='zero'" in msg
    out = pp.prepare({"B7": a}, panel, method=method, missing="zero")["B7"]
    assert list(out.var_names) == panel and "FOXA1" in caplog.text
    assert np.all(out[:, ["FOXA1", "MKI67"]].X.toarray() == 0)


# ----------------------------------------------------------------- wrong types / dtypes
@pytest.mark.parametrize("call, error, match", [
    (lambda: P.to_torch_batch(np.zeros((3, 8, 8, 3), np.float32), [0]), TypeError,
     "patches must have dtype uint8, got float32"),
    (lambda: P.extract_patches(np.zeros((20, 20, 3), np.uint8), [["10", "a"]], crop_px=4),
     TypeError, "centers must hold numbers"),
    (lambda: P.extract_patches(np.zeros((20, 20, 3), np.float32), [[10, 10]], crop_px=4),
     TypeError, "dtype uint8"),
    (lambda: P.PatchDataset(np.zeros((4, 8, 8, 3), np.uint8), np.ones((4, 2)),
                            np.array([["a", "b"]] * 4)), TypeError, "pos must hold finite integer"),
    (lambda: P.gpu_augment(torch.zeros((2, 8, 8, 3), dtype=torch.uint8)), TypeError,
     r"\(N, 3, H, W\)"),
    (lambda: mdl.normalize_uint8(torch.zeros((2, 3, 8, 8), dtype=torch.float32)), TypeError,
     "uint8"),
], ids=["float-patches", "text-centres", "float-image", "text-positions", "nhwc-batch",
        "float-normalize"])
def test_wrong_dtypes_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float_patches_stop_training_with_a_type_error():
    data = synthetic_spotdata()
    data.patches = [p.astype(np.float32) for p in data.patches]
    with pytest.raises(TypeError, match="patches must have dtype uint8"):
        tr.train(data, tiny_config(), progress=False)


# -------------------------------------------------------------- names and parameters
@pytest.mark.parametrize("call, error, bad, valid", [
    (lambda: ds.her2st("Z1"), ValueError, "'Z1'", "C2"),
    (lambda: ds.cscc("P2_ST_rep9"), ValueError, "'P2_ST_rep9'", "P2_ST_rep1"),
    (lambda: ds.load("her3", "A1"), ValueError, "'her3'", "her2st"),
    (lambda: ds.list_sections("her3"), ValueError, "'her3'", "her2st"),
    (lambda: ds.her2st("C2", image="tiny"), ValueError, "'tiny'", "'reduced'"),
    (lambda: dl.rows("her2st", "Z9"), ValueError, "'Z9'", "A1"),
    (lambda: pp.published_panel("skin"), ValueError, "'skin'", "cscc"),
    (lambda: tr.TrainConfig.profile("fast"), ValueError, "'fast'", "quick"),
    (lambda: tr.TrainConfig.profile("quick", optimizer="sgd"), ValueError, "'sgd'", "adamw"),
    (lambda: mdl.MclSTExp(10, weights=None, image_arch="vgg16"), ValueError, "vgg16",
     "densenet121"),
], ids=["her2st", "cscc", "load", "list_sections", "image-kind", "manifest", "panel",
        "train-profile", "optimizer", "image-arch"])
def test_unknown_names_are_refused_with_the_valid_ones(call, error, bad, valid):
    with pytest.raises(error) as err:
        call()
    assert bad in str(err.value) and valid in str(err.value)


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


def test_invalid_notebook_parameters():
    from mclstexp_lite import tutorials

    with pytest.raises(SystemExit) as err:
        tutorials.load_profile("nope")
    msg = str(err.value.code)
    assert "unknown profile 'nope'" in msg
    assert all(name in msg for name in tutorials.available_profiles())
    with pytest.raises(ValueError, match=r"TrainConfig\.epochs must be a positive integer, got 0"):
        tr.TrainConfig.profile("quick", epochs=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size"):
        tr.TrainConfig.profile("quick", batch_size="64")
    with pytest.raises(TypeError, match="model= must be a dict"):
        tr.TrainConfig.profile("quick", model="resnet18")


# ------------------------------------------------------------------------ checkpoints
def test_truncated_checkpoint_is_a_value_error_naming_the_file(trained_run, tmp_path):
    run = fresh_copy(trained_run, tmp_path / "run")
    ckpt = run / tr.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = ckpt.read_bytes()
    for call in (lambda: tr.load_checkpoint(ckpt), lambda: tr.load_checkpoint(run),
                 lambda: tr.model_from_checkpoint(ckpt),
                 lambda: tr.train(synthetic_spotdata(), tiny_config(epochs=2), out_dir=run,
                                  resume=True, progress=False)):
        with pytest.raises(ValueError, match="truncated") as err:
            call()
        assert str(ckpt) in str(err.value)
    assert ckpt.read_bytes() == before  # a failed resume does not replace it


def test_foreign_checkpoint_contents_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=r"not an mclstexp_lite checkpoint \(it holds a Tensor"):
        tr.load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not an mclstexp_lite checkpoint .no 'model_config'"):
        tr.load_checkpoint(path)


def test_unreadable_feature_cache_is_recomputed_with_a_warning(trained_run, tmp_path, caplog):
    """SYNTHETIC patches: a damaged feature-cache entry (empty, not an array, or a
    half-written one without its JSON) is never used; it is recomputed with a warning."""
    from mclstexp_lite import features as fx

    model = tr.model_from_checkpoint(trained_run)
    patches = synthetic_spotdata().patches[0]
    enc = model.image_encoder
    expected = fx.section_features(enc, patches, device="cpu", cache_dir=False, progress=False)
    cache = tmp_path / "features"
    fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0", progress=False)
    (npy,) = cache.glob("*.npy")
    for content in (b"", b"not a numpy file"):
        npy.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
            got = fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0",
                                      progress=False)
        assert "cannot read feature cache entry" in caplog.text and str(npy) in caplog.text
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(np.load(npy), expected)  # rewritten, readable
    npy.with_suffix(".json").unlink()  # an interrupted write: array without its JSON
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.features"):
        fx.section_features(enc, patches, device="cpu", cache_dir=cache, name="S0",
                            progress=False)
    assert "interrupted write" in caplog.text


def test_results_folder_of_another_run_is_never_replaced(trained_run, tmp_path):
    run = fresh_copy(trained_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in listing(run)}
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        tr.train(synthetic_spotdata(seed=5), tiny_config(lr=5e-4), out_dir=run, progress=False)
    assert str(run / tr.CHECKPOINT) in str(err.value)
    assert {name: (run / name).read_bytes() for name in listing(run)} == before


# ----------------------------------------------------------------------- unpickling
def _calls(tree: ast.AST):
    """(enclosing function name, call node) for every call in a module."""
    def walk(node, func):
        for child in ast.iter_child_nodes(node):
            is_def = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            name = child.name if is_def else func
            if isinstance(child, ast.Call):
                yield name, child
            yield from walk(child, name)
    yield from walk(tree, "<module>")


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_unsafe_unpickling_in_the_package():
    """Every torch.load passes weights_only=True; np.load never allows pickles, except
    the one conversion of the checksum-verified published panel (pp.published_panel);
    no module imports pickle or calls pandas.read_pickle. (An AST walk, not a grep, so
    that the docstrings that explain the rule do not count.)"""
    torch_loads, pickle_loads = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert "weights_only=False" not in source, path.name
        assert "read_pickle" not in source, path.name  # pandas unpickles too
        for func, call in _calls(ast.parse(source)):
            f = call.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name):
                if f.value.id == "torch":
                    torch_loads.append((path.name, func, _kw(call, "weights_only")))
                elif f.value.id in ("np", "numpy"):
                    if _kw(call, "allow_pickle") not in (None, False):
                        pickle_loads.append((path.name, func, _kw(call, "allow_pickle")))
        imported = {a.name for node in ast.walk(ast.parse(source))
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        modules = {node.module for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.ImportFrom)}
        assert not {"pickle", "dill", "cloudpickle"} & (imported | modules), path.name
    assert torch_loads, "expected torch.load calls (checkpoints, feature cache)"
    assert all(w is True for _, _, w in torch_loads), torch_loads
    assert pickle_loads == [("pp.py", "published_panel", True)]


# -------------------------------------------------------- interrupted patch-cache writes
@pytest.fixture()
def synthetic_section(tmp_path):
    c, s, img = write_section(tmp_path / "sec")
    adata = ds.from_files(c, s, img, section="S")
    crop = P.crop_size_px(adata.uns["spatial"]["S"]["metadata"]["um_per_px"])
    expected = P.extract_patches(img, adata.obsm["spatial"], crop_px=crop, out_size=32)
    return adata, expected


def _interrupt_half_way(monkeypatch, exc):
    real = P.extract_patches

    def half_then_fail(image, centers, *, out, ids=None, **kw):
        half = len(centers) // 2
        real(image, centers[:half], out=out[:half], ids=None if ids is None else ids[:half], **kw)
        raise exc

    monkeypatch.setattr(P, "extract_patches", half_then_fail)


def test_interrupted_patch_cache_write_leaves_no_entry(synthetic_section, tmp_path, monkeypatch):
    adata, expected = synthetic_section
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        _interrupt_half_way(m, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert listing(cache) == []  # neither the entry nor its temporary file
    got = P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(got, expected)
    # an interrupted rebuild (overwrite=True) leaves the valid entry as it was
    files = {name: (cache / name).read_bytes() for name in listing(cache)}
    assert len(files) == 2
    with monkeypatch.context() as m:
        _interrupt_half_way(m, OSError("disk full (simulated)"))
        with pytest.raises(OSError, match="simulated"):
            P.patch_cache(adata, out_size=32, cache_dir=cache, overwrite=True, progress=False)
    assert {name: (cache / name).read_bytes() for name in listing(cache)} == files


def test_patch_cache_entry_without_metadata_is_never_used(synthetic_section, tmp_path,
                                                          monkeypatch, caplog):
    """A crash after the array is in place but before its JSON is written."""
    adata, expected = synthetic_section
    cache = tmp_path / "cache"

    def crash(*args, **kwargs):
        raise OSError("killed before the metadata was written (simulated)")

    with monkeypatch.context() as m:
        m.setattr(P, "_atomic_write_json", crash)
        with pytest.raises(OSError, match="simulated"):
            P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert [Path(n).suffix for n in listing(cache)] == [".npy"]
    with caplog.at_level(logging.WARNING, logger="mclstexp_lite.patches"):
        got = P.patch_cache(adata, out_size=32, cache_dir=cache, progress=False)
    assert "interrupted write" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(got, expected)
    assert sorted(Path(n).suffix for n in listing(cache)) == [".json", ".npy"]


def test_patch_cache_refuses_spots_without_pixel_coordinates(synthetic_section, tmp_path):
    adata, _ = synthetic_section
    adata.obsm["spatial"][2] = np.nan
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"1 non-finite row\(s\) \(first at index 2\)"):
        P.patch_cache(adata, cache_dir=cache, progress=False)
    assert listing(cache) == [] if cache.exists() else True
