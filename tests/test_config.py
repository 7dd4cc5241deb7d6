"""Tests for mclstexp_lite._config: ``TrainConfig`` (profiles, field checks) and the device
setting. No data; no training.
"""

from __future__ import annotations

import pytest
import torch

from mclstexp_lite import train as tr

from .factories import LOOP, tiny_config


# ------------------------------------------- profiles and fields (from test_train.py)
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
    with pytest.raises(ValueError, match=r"mode must be one of \('full', 'frozen'\), got 'lite'"):
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
        tiny_config(LOOP, **kw)


def test_unknown_profile_and_field():
    with pytest.raises(ValueError, match="unknown profile 'fast'.*paper"):
        tr.TrainConfig.profile("fast")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        tr.TrainConfig.from_dict({"epoch": 3})


# --------------------------------------- notebook parameters (from test_bad_input.py)
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


# -------------------------------------------------------- device (from test_train.py)
def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tr.resolve_device("auto").type in ("cpu", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tr.resolve_device("auto").type == "cuda"
    assert tr.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="not a torch device"):
        tr.resolve_device("gpu0")
