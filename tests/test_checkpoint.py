"""Tests for mclstexp_lite._checkpoint: save / load / rebuild, atomic writes, exact resume,
the "same run?" rule (a checkpoint of another config, other sections or other genes is
never continued or replaced), and damaged or foreign checkpoint files.

All training here is on SYNTHETIC data (tests/factories.py: random patches and
expression); ``trained_run`` (conftest.py) is one tiny frozen-mode run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mclstexp_lite import train as tr

from .factories import (LOOP, fresh_copy, listing, state_equal, synthetic_sections,
                        synthetic_spotdata, tiny_config)


# ------------------------------------------- training and resume (from test_train.py)
def test_resume_reaches_the_same_weights(tmp_path):
    data = synthetic_spotdata()
    cfg = tiny_config(LOOP)
    full = tr.train(data, cfg, out_dir=tmp_path / "full", progress=False)

    def stop_after_first(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train(data, cfg, out_dir=tmp_path / "cut", progress=False, callback=stop_after_first)
    assert tr.load_checkpoint(tmp_path / "cut")["epoch"] == 1
    resumed = tr.train(data, cfg, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert state_equal(full.model.state_dict(), resumed.model.state_dict())
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    # and a different seed gives different weights (the comparison can fail)
    other = tr.train(data, tiny_config(LOOP, seed=4), progress=False)
    assert not state_equal(full.model.state_dict(), other.model.state_dict())


def test_checkpoints_by_time_after_the_last_epoch_and_on_interrupt(tmp_path, monkeypatch):
    """SYNTHETIC: ``checkpoint_every=0`` writes after every epoch; an hour writes only
    after the last one; a callback that raises first gets its finished epoch saved."""
    data = synthetic_spotdata()
    saved = []
    real_save = tr.save_checkpoint

    def counting_save(path, **kw):
        saved.append(kw["epoch"])
        return real_save(path, **kw)

    monkeypatch.setattr(tr, "save_checkpoint", counting_save)
    tr.train(data, tiny_config(LOOP), out_dir=tmp_path / "every", progress=False,
             checkpoint_every=0)
    assert saved == [1, 2, 3]
    saved.clear()
    tr.train(data, tiny_config(LOOP), out_dir=tmp_path / "hourly", progress=False,
             checkpoint_every=3600)
    assert saved == [3]
    assert len(json.loads((tmp_path / "hourly" / "history.json").read_text())) == 3
    saved.clear()

    def stop_after_second(epoch, history):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train(data, tiny_config(LOOP), out_dir=tmp_path / "cut", progress=False,
                 checkpoint_every=3600, callback=stop_after_second)
    assert saved == [2] and tr.load_checkpoint(tmp_path / "cut")["epoch"] == 2
    for bad in (-1, "30", None):
        with pytest.raises(ValueError, match="checkpoint_every"):
            tr.train(data, tiny_config(LOOP), progress=False, checkpoint_every=bad)


def test_existing_checkpoint_is_never_silently_replaced(tmp_path):
    data = synthetic_spotdata()
    tr.train(data, tiny_config(LOOP, epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        tr.train(data, tiny_config(LOOP, epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        tr.train(data, tiny_config(LOOP, epochs=2, lr=5e-4), out_dir=tmp_path, resume=True,
                 progress=False)
    tr.train(data, tiny_config(LOOP, epochs=1), out_dir=tmp_path, overwrite=True, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    data = synthetic_spotdata()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tr.train(data, tiny_config(LOOP, epochs=1), out_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_checkpoint_round_trip_and_embeddings(tmp_path):
    data = synthetic_spotdata()
    res = tr.train(data, tiny_config(LOOP, epochs=1), out_dir=tmp_path, progress=False)
    again = tr.load_model(tmp_path)
    cfg = tiny_config(LOOP)
    e1 = tr.embed_images(res.model, data, config=cfg, progress=False)
    e2 = tr.embed_images(again, data, config=cfg, progress=False)
    assert e1.shape == (len(data), 256) and np.allclose(e1, e2, atol=1e-6)
    s = tr.embed_spots(again, data, device="cpu")
    assert s.shape == (len(data), 256) and np.isfinite(s).all()
    ck = tr.load_checkpoint(tmp_path)
    assert set(ck) >= {"model", "optimizer", "config", "epoch", "history", "rng", "model_config"}


def test_resume_refuses_a_checkpoint_of_other_sections_or_genes(tmp_path):
    """SYNTHETIC: the same config on other data must not silently continue (or return)
    the model trained on the first data."""
    data = synthetic_spotdata()
    cfg = tiny_config(LOOP, epochs=1)
    tr.train(data, cfg, out_dir=tmp_path / "run", progress=False)
    other = synthetic_spotdata()
    other.sections = ["S0", "T1"]
    with pytest.raises(ValueError, match=r"cannot be resumed: .*other sections .*S0, S1.*S0, T1"):
        tr.train(other, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    renamed = synthetic_spotdata()
    renamed.genes = [f"h{i}" for i in range(len(renamed.genes))]
    with pytest.raises(ValueError, match="other genes"):
        tr.train(renamed, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    # the same data still resumes (here: nothing left to do)
    assert len(tr.train(data, cfg, out_dir=tmp_path / "run", resume=True,
                        progress=False).history) == 1


# --------------------------------- damaged and foreign files (from test_bad_input.py)
def test_truncated_checkpoint_is_a_value_error_naming_the_file(trained_run, tmp_path):
    run = fresh_copy(trained_run, tmp_path / "run")
    ckpt = run / tr.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = ckpt.read_bytes()
    for call in (lambda: tr.load_checkpoint(ckpt), lambda: tr.load_checkpoint(run),
                 lambda: tr.load_model(ckpt),
                 lambda: tr.train(synthetic_spotdata(), tiny_config(epochs=2, seed=1, mode="full"),
                                  out_dir=run, resume=True, progress=False)):
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


def test_results_folder_of_another_run_is_never_replaced(trained_run, tmp_path):
    run = fresh_copy(trained_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in listing(run)}
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        tr.train(synthetic_spotdata(seed=5), tiny_config(lr=5e-4, seed=1, mode="full"),
                 out_dir=run, progress=False)
    assert str(run / tr.CHECKPOINT) in str(err.value)
    assert {name: (run / name).read_bytes() for name in listing(run)} == before


# ----------------------------------------------- the one "same finished run" rule
def test_run_mismatch_names_what_differs(trained_run):
    """checkpoint.run_mismatch: None for the same finished run; otherwise a sentence
    naming the config field, the sections, the genes (also only their order) or the
    epochs; finished=False (resume) lets the epochs differ."""
    ck = tr.load_checkpoint(trained_run)
    data = synthetic_spotdata()
    cfg = tiny_config(seed=1)
    same = dict(sections=data.sections, genes=data.genes)
    assert tr.run_mismatch(ck, cfg, **same) is None
    assert tr.run_mismatch(ck, cfg.to_dict(), **same) is None
    assert tr.run_mismatch(ck, tiny_config(seed=1, device="meta"), **same) is None  # where, not what
    assert "'seed': (1, 2)" in tr.run_mismatch(ck, tiny_config(seed=2), **same)
    assert "'epochs': (1, 3)" in tr.run_mismatch(ck, tiny_config(seed=1, epochs=3), **same)
    assert tr.run_mismatch(ck, tiny_config(seed=1, epochs=3), finished=False, **same) is None
    assert "other sections (2: S0, S1) than the data given (2: S1, S0)" in tr.run_mismatch(
        ck, cfg, sections=["S1", "S0"], genes=data.genes)
    assert "other genes (6: g0, g1, g2, g3, g4, g5) than the data given (6: g5, g4, g3, g2, g1, g0); the same ones in another order" in tr.run_mismatch(
        ck, cfg, sections=data.sections, genes=data.genes[::-1])
    assert "other genes (6: g0" in tr.run_mismatch(ck, cfg, sections=data.sections,
                                                   genes=data.genes[:5])
    unfinished = dict(ck, epoch=0)
    assert tr.run_mismatch(unfinished, cfg, **same) == "it is unfinished (0 of 1 epochs)"
    assert tr.run_mismatch(unfinished, cfg, finished=False, **same) is None
    no_genes = {k: v for k, v in ck.items() if k != "genes"}
    assert "does not record the genes" in tr.run_mismatch(no_genes, cfg, **same)


def test_train_or_load_reuses_only_the_same_finished_run(tmp_path, monkeypatch):
    """SYNTHETIC sections: workflow.train_or_load loads a finished run of the same
    training without training again, and refuses (never returns) a model that the
    folder holds for another gene panel, here the same genes in another order, which
    once passed because only the config and sections were compared."""
    from mclstexp_lite import workflow

    sections = synthetic_sections(tmp_path / "images")
    train = {s: sections[s] for s in ("S1", "S2")}
    cfg = tiny_config()
    model, history, data = workflow.train_or_load(train, cfg, out_dir=tmp_path / "run",
                                                  progress=False)
    assert len(history) == 1 and list(data.genes) == list(sections["S1"].var_names)
    with monkeypatch.context() as mp:
        def forbidden(*a, **k):
            raise AssertionError("trained again although the run is finished")

        mp.setattr(tr, "train", forbidden)
        again, history2, _ = workflow.train_or_load(train, cfg, out_dir=tmp_path / "run",
                                                    progress=False)
    assert history2 == history and state_equal(again.state_dict(), model.state_dict())
    before = (tmp_path / "run" / tr.CHECKPOINT).read_bytes()
    reordered = {s: a[:, list(a.var_names[::-1])].copy() for s, a in train.items()}
    with pytest.raises(ValueError, match=r"cannot be resumed: .*other genes .*the same ones "
                                         r"in another order"):
        workflow.train_or_load(reordered, cfg, out_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / tr.CHECKPOINT).read_bytes() == before


def test_load_model_takes_a_path_a_folder_or_a_loaded_checkpoint(trained_run):
    ck = tr.load_checkpoint(trained_run)
    models = [tr.load_model(trained_run), tr.load_model(trained_run / tr.CHECKPOINT),
              tr.load_model(ck)]
    assert all(not m.training and m.genes == list(ck["genes"]) for m in models)
    assert all(state_equal(m.state_dict(), ck["model"]) for m in models)
    rebuilt = tr.build_model(ck["model_config"], preprocessing=ck["preprocessing"])
    assert rebuilt.config == models[0].config
    with pytest.raises(ValueError, match="other preprocessing"):
        tr.build_model(ck["model_config"], preprocessing=dict(ck["preprocessing"], std=[1, 1, 1]))
    with pytest.raises(ValueError, match=r"lacks \['model'\]"):
        tr.load_model({"model_config": ck["model_config"]})
    with pytest.raises(TypeError, match="number of genes"):
        tr.build_model(tiny_config())


def test_the_former_model_loaders_are_gone():
    """model_from_checkpoint / model_from_state had no user outside the package (README
    and notebooks never named them): no alias is kept, load_model is the one way back."""
    assert not hasattr(tr, "model_from_checkpoint") and not hasattr(tr, "model_from_state")
