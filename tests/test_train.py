"""Trainer tests: config, device, checkpoints and exact resume, frozen mode, DDP on CPU,
and one optimisation step on real HER2+ patches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mclstexp_lite import train as tr
from mclstexp_lite import models as mdl

from .conftest import needs_data


def synthetic_data(n_per=(12, 10), genes=6, size=32, seed=0) -> tr.SpotData:
    """SYNTHETIC SpotData: random patches and expression for two small sections."""
    rng = np.random.default_rng(seed)
    patches = [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in n_per]
    n = sum(n_per)
    return tr.SpotData(
        patches=patches, expr=rng.random((n, genes), dtype=np.float32),
        pos=rng.integers(0, 10, (n, 2)), groups=np.repeat(np.arange(len(n_per)), n_per),
        sections=[f"S{i}" for i in range(len(n_per))], genes=[f"g{i}" for i in range(genes)],
        obs_names=[f"spot{i}" for i in range(n)])


def tiny_config(**kw) -> tr.TrainConfig:
    base = dict(epochs=3, batch_size=8, lr=1e-3, image_size=32, device="cpu", seed=3,
                model={"image_arch": "resnet18", "weights": None, "n_pos": 16, "dropout": 0.1})
    base.update(kw)
    return tr.TrainConfig.from_dict(base).validate()


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- config
def test_profiles_are_overrides_of_one_config():
    paper = tr.TrainConfig.profile("paper")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.weight_decay, paper.optimizer) == (
        90, 128, 1e-4, 1e-3, "adam")
    assert paper.model == {"image_arch": "densenet121", "weights": "imagenet"}
    assert (paper.mode, paper.image_size) == ("full", None)  # the encoder's own 224 px
    quick = tr.TrainConfig.profile("quick", epochs=2, model={"n_pos": 40})
    assert quick.model["image_arch"] == "efficientnet_lite0" and quick.mode == "frozen"
    assert quick.model["weights"] == "imagenet" and quick.model["n_pos"] == 40 and quick.epochs == 2
    dense = tr.TrainConfig.profile("densenet_frozen")
    assert (dense.mode, dense.model["image_arch"], dense.model["weights"]) == (
        "frozen", "densenet121", "imagenet")
    assert tr.TrainConfig.profile("paper", optimizer="adamw").optimizer == "adamw"
    with pytest.raises(ValueError, match="renamed 'frozen'"):
        tr.TrainConfig(mode="lite").validate()
    with pytest.raises(ValueError, match="feature_views must be at most 8"):
        tr.TrainConfig(feature_views=9).validate()


@pytest.mark.parametrize("kw, match", [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": -3}, "batch_size"),
    ({"lr": float("nan")}, "lr"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"mode": "fast"}, "mode"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
])
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_unknown_profile_and_field():
    with pytest.raises(ValueError, match="unknown profile 'fast'.*paper"):
        tr.TrainConfig.profile("fast")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        tr.TrainConfig.from_dict({"epoch": 3})


def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tr.resolve_device("auto").type in ("cpu", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tr.resolve_device("auto").type == "cuda"
    assert tr.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        tr.resolve_device("gpu0")


# -------------------------------------------------------------- training & resume
def test_resume_reaches_the_same_weights(tmp_path):
    data = synthetic_data()
    cfg = tiny_config()
    full = tr.train(data, cfg, out_dir=tmp_path / "full", progress=False)

    def stop_after_first(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train(data, cfg, out_dir=tmp_path / "cut", progress=False, callback=stop_after_first)
    assert tr.load_checkpoint(tmp_path / "cut")["epoch"] == 1
    resumed = tr.train(data, cfg, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert _state_equal(full.model.state_dict(), resumed.model.state_dict())
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    # and a different seed gives different weights (the comparison can fail)
    other = tr.train(data, tiny_config(seed=4), progress=False)
    assert not _state_equal(full.model.state_dict(), other.model.state_dict())


def test_existing_checkpoint_is_never_silently_replaced(tmp_path):
    data = synthetic_data()
    tr.train(data, tiny_config(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        tr.train(data, tiny_config(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        tr.train(data, tiny_config(epochs=2, lr=5e-4), out_dir=tmp_path, resume=True,
                 progress=False)
    tr.train(data, tiny_config(epochs=1), out_dir=tmp_path, overwrite=True, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    data = synthetic_data()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tr.train(data, tiny_config(epochs=1), out_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_checkpoint_round_trip_and_embeddings(tmp_path):
    data = synthetic_data()
    res = tr.train(data, tiny_config(epochs=1), out_dir=tmp_path, progress=False)
    again = tr.model_from_checkpoint(tmp_path)
    cfg = tiny_config()
    e1 = tr.embed_images(res.model, data, config=cfg, progress=False)
    e2 = tr.embed_images(again, data, config=cfg, progress=False)
    assert e1.shape == (len(data), 256) and np.allclose(e1, e2, atol=1e-6)
    s = tr.embed_spots(again, data, device="cpu")
    assert s.shape == (len(data), 256) and np.isfinite(s).all()
    ck = tr.load_checkpoint(tmp_path)
    assert set(ck) >= {"model", "optimizer", "config", "epoch", "history", "rng", "model_config"}


def test_frozen_mode_freezes_the_encoder_and_caches_features(tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "cache"))
    data = synthetic_data()
    cfg = tiny_config(mode="frozen", epochs=2)
    torch.manual_seed(0)
    model = tr.build_model(cfg, data.n_genes)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    res = tr.train(data, cfg, out_dir=tmp_path / "run", progress=False, model=model)
    assert _state_equal(before, res.model.image_encoder.state_dict())
    # one feature-cache entry per section (view 0), reused by embedding
    assert len(list((tmp_path / "cache" / "features").glob("*.json"))) == len(data.sections)
    proj0 = tr.build_model(cfg, data.n_genes).image_projection.state_dict()
    assert not _state_equal(proj0, res.model.image_projection.state_dict())
    assert all(np.isfinite(h["loss"]) for h in res.history)


def test_position_range_checked_before_training():
    data = synthetic_data()
    data.pos[0] = (40, 1)
    with pytest.raises(ValueError, match="n_pos"):
        tr.train(data, tiny_config(epochs=1), progress=False)


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg",
                                         rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights on both ranks
    res = tr.train(synthetic_data(n_per=(16, 16)), tiny_config(epochs=1), progress=False)
    torch.save(res.model.state_dict(), f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert _state_equal(a, b)
    torch.manual_seed(0)
    init = tr.build_model(tiny_config(), 6).state_dict()
    assert not _state_equal(a, init)


# ------------------------------------------------------------------ real patches
@needs_data
def test_one_step_on_real_her2_patches_lowers_the_loss(her2_c2):
    import scanpy as sc

    a = her2_c2.copy()
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    top = np.argsort(-np.asarray(a.X.mean(axis=0)).ravel())[:200]
    a = a[:, np.sort(top)].copy()
    data = tr.SpotData.from_anndata({"C2": a}, progress=False)
    torch.manual_seed(0)
    model = mdl.MclSTExp(data.n_genes, weights=None)  # paper architecture, random init
    cfg = tr.TrainConfig(image_size=64, device="cpu", augment=False,
                         model={"weights": None})
    idx = np.arange(32)
    x = tr._prepare_images(data.images(idx), model.image_encoder, cfg, train=False,
                           generator=None, channels_last=False)
    expr = torch.from_numpy(data.expr[idx])
    pos = torch.from_numpy(data.pos[idx])
    # training mode throughout (batch statistics; dropout is 0 in the paper setting), so
    # the two losses differ only by the optimiser step
    model.train()
    with torch.no_grad():
        before = float(model(x, expr, pos)["loss"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    model(x, expr, pos)["loss"].backward()
    opt.step()
    with torch.no_grad():
        after = float(model(x, expr, pos)["loss"])
    assert after < before


@needs_data
def test_command_line_trains_one_fold(tmp_path, capsys):
    rc = tr.main(["--sections", "C2", "C3", "--test", "C3", "--profile", "quick", "--epochs",
                  "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert rc == 0
    ck = tr.load_checkpoint(tmp_path / "run")
    assert ck["sections"] == ["C2"] and ck["epoch"] == 1
    assert '"epoch": 1' in capsys.readouterr().out


@pytest.mark.parametrize("n", [1, 7, 8, 19])
def test_grouped_resize_is_bitwise_equal_to_whole_batch(n):
    """SYNTHETIC uint8 patches: resizing a few images at a time (for speed on the CPU)
    gives exactly the whole-batch float32 resize, whatever the batch size."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)
    whole = F.interpolate(x.float(), size=(64, 64), mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    got = tr._resize_u8(x, 64)
    assert got.dtype == torch.uint8 and got.shape == (n, 3, 64, 64)
    assert torch.equal(got, whole)


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_gather_gives_identical_model_input(size, channels_last):
    """SYNTHETIC: the inference path gathers patches without the transposing copy;
    the normalised model input must be bitwise what the NCHW gather gives, with and
    without a resize, for batches from one section and from several."""
    data = synthetic_data(size=32)
    cfg = tr.TrainConfig(image_size=size, device="cpu", model={"weights": None})
    enc = mdl.ImageEncoder("resnet18", image_size=size)
    for idx in (np.array([3, 0, 7, 7]), np.array([15, 2, 20, 11, 0])):
        nchw = data.images(idx)
        cl = data.images(idx, memory_format=torch.channels_last)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, nchw)
        a = tr._prepare_images(nchw, enc, cfg, train=False, generator=None,
                               channels_last=channels_last)
        b = tr._prepare_images(cl, enc, cfg, train=False, generator=None,
                               channels_last=channels_last)
        assert torch.equal(a, b)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert b.is_contiguous(memory_format=fmt)


def test_batch_images_gathers_and_resizes_in_groups_bitwise():
    """SYNTHETIC: gathering and resizing a few spots at a time equals gathering the
    whole batch and resizing it, for batches across sections, with repeats."""
    data = synthetic_data(size=32)
    idx = np.array([21, 3, 3, 17, 0, 9, 12, 11, 20, 5, 14])  # 11 spots: groups of 8 + 3
    whole = tr._resize_u8(data.images(idx), 16)
    assert torch.equal(tr._batch_images(data, idx, 16, torch.device("cpu")), whole)
    # no resize needed: the plain gather, in the requested memory format
    same = tr._batch_images(data, idx, 32, None, memory_format=torch.channels_last)
    assert torch.equal(same, data.images(idx))
    assert same.is_contiguous(memory_format=torch.channels_last)


def test_resume_refuses_a_checkpoint_of_other_sections_or_genes(tmp_path):
    """SYNTHETIC: the same config on other data must not silently continue (or return)
    the model trained on the first data."""
    data = synthetic_data()
    cfg = tiny_config(epochs=1)
    tr.train(data, cfg, out_dir=tmp_path / "run", progress=False)
    other = synthetic_data()
    other.sections = ["S0", "T1"]
    with pytest.raises(ValueError, match=r"other sections .*S0, S1.*S0, T1"):
        tr.train(other, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    renamed = synthetic_data()
    renamed.genes = [f"h{i}" for i in range(len(renamed.genes))]
    with pytest.raises(ValueError, match="other genes"):
        tr.train(renamed, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    # the same data still resumes (here: nothing left to do)
    assert len(tr.train(data, cfg, out_dir=tmp_path / "run", resume=True,
                        progress=False).history) == 1


def test_unprepared_counts_in_spotdata_are_warned_about():
    """SYNTHETIC: raw integer counts are warned about (SpotData.from_anndata runs this check
    on every section); log-normalised expression is not."""
    import warnings

    counts = np.random.default_rng(0).poisson(60, size=(6, 5)).astype(np.float32)
    with pytest.warns(UserWarning, match="section S is whole numbers up to .*pp.prepare"):
        tr._warn_if_raw_counts(counts, "S")
    prepared = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr._warn_if_raw_counts(prepared, "S")
