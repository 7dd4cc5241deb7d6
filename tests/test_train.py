"""Trainer tests: the training loop (frozen mode, position checks, bad patches), DDP on
CPU, one optimisation step on real HER2+ patches, and the command line.

``TrainConfig`` is tested in test_config.py, checkpoints and exact resume in
test_checkpoint.py. Training data here are SYNTHETIC (tests/factories.py) except in the
tests marked ``needs_data``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mclstexp_lite import _embed as embed
from mclstexp_lite import models as mdl
from mclstexp_lite import train as tr

from .conftest import needs_data
from .factories import LOOP, state_equal, synthetic_spotdata, tiny_config


# ------------------------------------------------------------------------ training
def test_frozen_mode_freezes_the_encoder_and_caches_features(tmp_path, monkeypatch):
    monkeypatch.setenv("MCLSTEXP_CACHE", str(tmp_path / "cache"))
    data = synthetic_spotdata()
    cfg = tiny_config(LOOP, mode="frozen", epochs=2)
    torch.manual_seed(0)
    model = tr.build_model(cfg, data.n_genes)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    res = tr.train(data, cfg, out_dir=tmp_path / "run", progress=False, model=model)
    assert state_equal(before, res.model.image_encoder.state_dict())
    # one feature-cache entry per section (view 0), reused by embedding
    assert len(list((tmp_path / "cache" / "features").glob("*.json"))) == len(data.sections)
    proj0 = tr.build_model(cfg, data.n_genes).image_projection.state_dict()
    assert not state_equal(proj0, res.model.image_projection.state_dict())
    assert all(np.isfinite(h["loss"]) for h in res.history)


def test_position_range_checked_before_training():
    data = synthetic_spotdata()
    data.pos[0] = (40, 1)
    with pytest.raises(ValueError, match="n_pos"):
        tr.train(data, tiny_config(LOOP, epochs=1), progress=False)


# ------------------------------------------------- bad input (from test_bad_input.py)
def test_float_patches_stop_training_with_a_type_error():
    data = synthetic_spotdata()
    data.patches = [p.astype(np.float32) for p in data.patches]
    with pytest.raises(TypeError, match="patches must have dtype uint8"):
        tr.train(data, tiny_config(seed=1, mode="full"), progress=False)


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg",
                                         rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights on both ranks
    res = tr.train(synthetic_spotdata(n_per=(16, 16)), tiny_config(LOOP, epochs=1), progress=False)
    torch.save(res.model.state_dict(), f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert state_equal(a, b)
    torch.manual_seed(0)
    init = tr.build_model(tiny_config(LOOP), 6).state_dict()
    assert not state_equal(a, init)


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
    # paper architecture, random init, on 64 px inputs (the encoder's own size decides
    # the resize; at its default 224 px this test took 15-60 s instead of ~2 s)
    model = mdl.MclSTExp(data.n_genes, weights=None, image_size=64)
    cfg = tr.TrainConfig(image_size=64, device="cpu", augment=False,
                         model={"weights": None})
    idx = np.arange(32)
    x = embed.prepare_images(data.images(idx), model.image_encoder, cfg, train=False,
                           generator=None, channels_last=False)
    assert x.shape == (32, 3, 64, 64)
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


