"""Tests for mclstexp_lite.models.

All tensors here are SYNTHETIC (seeded random numbers): they check shapes, parameter
counts, equivalence with plain reference implementations and error handling, not
biology. Image backbones use ``weights=None`` (random init) and small images.
"""

from __future__ import annotations

import json
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from mclstexp_lite import models
from mclstexp_lite.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    MclSTExp,
    ProjectionHead,
    SpotEncoder,
    contrastive_loss,
    count_parameters,
    normalize_uint8,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def published_size_model():
    """mclSTExp with the published architecture for 785 genes (random init, n_pos=64)."""
    torch.manual_seed(0)
    return MclSTExp(785, weights=None)


# --------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------


def test_parameter_counts_match_published_parts(published_size_model):
    table = published_size_model.parameter_table()
    assert list(table.index) == [
        "image_encoder",
        "spot_encoder",
        "position_embeddings",
        "image_projection",
        "spot_projection",
        "total",
    ]
    assert list(table.columns) == ["parameters", "published"]
    p = table["parameters"]
    assert p["image_encoder"] == 6_953_856
    assert p["spot_encoder"] == 5_691_250
    assert p["image_projection"] == 328_704
    assert p["spot_projection"] == 267_520
    assert p["position_embeddings"] == 2 * 64 * 785
    assert p["total"] == count_parameters(published_size_model) < 14_000_000
    assert p.drop("total").sum() == p["total"]
    pub = table["published"]
    assert pub["position_embeddings"] == 2 * 65_536 * 785
    assert pub["total"] == 116_132_850
    # every part except the position tables has the published size
    for part in ("image_encoder", "spot_encoder", "image_projection", "spot_projection"):
        assert pub[part] == p[part]


def test_parameter_table_published_is_nan_for_other_configs():
    model = MclSTExp(20, image_arch="resnet18", weights=None)
    table = model.parameter_table()
    assert table["published"].isna().all()
    assert table.loc["image_encoder", "parameters"] == 11_689_512 - (512 * 1000 + 1000)


def test_count_parameters_trainable_only():
    head = ProjectionHead(10, 4)
    assert count_parameters(head) == (10 * 4 + 4) + (4 * 4 + 4) + 2 * 4
    head.projection.weight.requires_grad_(False)
    assert count_parameters(head, trainable_only=True) == count_parameters(head) - 40


# --------------------------------------------------------------------------------------
# Image side
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048), ("densenet121", 1024)])
def test_image_encoder_out_dim(arch, dim):
    torch.manual_seed(0)
    enc = ImageEncoder(arch, weights=None).eval()
    assert enc.out_dim == dim
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim)


def test_densenet_encoder_matches_torchvision_forward():
    """Our DenseNet path equals torchvision's forward with an identity classifier."""
    torch.manual_seed(0)
    enc = ImageEncoder("densenet121", weights=None, pre_pool_relu=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = enc.backbone(x)  # torchvision forward: features, relu, pool, flatten
        assert torch.allclose(enc(x), expected, atol=1e-6)
        enc.pre_pool_relu = False  # the published code pools the pre-ReLU features
        no_relu = torch.flatten(F.adaptive_avg_pool2d(enc.backbone.features(x), 1), 1)
        assert torch.allclose(enc(x), no_relu, atol=1e-6)
        assert not torch.allclose(no_relu, expected)


def test_image_encoder_channels_last_input():
    torch.manual_seed(0)
    enc = ImageEncoder("resnet18", weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = enc(x)
        b = enc(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-5)


def test_normalize_uint8_layouts_and_values():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    out = normalize_uint8(torch.from_numpy(nhwc))
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32
    # plain reference, one element at a time
    for b, i, j, c in [(0, 0, 0, 0), (1, 4, 3, 2), (0, 2, 1, 1)]:
        ref = (nhwc[b, i, j, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert out[b, c, i, j].item() == pytest.approx(ref, abs=1e-6)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
    assert torch.allclose(normalize_uint8(nchw), out)
    assert torch.allclose(normalize_uint8(nhwc), out)  # numpy input
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(out)
    with pytest.raises(ValueError, match="layout"):
        normalize_uint8(torch.zeros(1, 3, 4, 3, dtype=torch.uint8))
    assert normalize_uint8(torch.zeros(1, 3, 4, 3, dtype=torch.uint8), layout="nhwc").shape == (1, 3, 3, 4)


def test_image_encoder_bad_arch_and_weights():
    with pytest.raises(ValueError, match="densenet121.*resnet18.*resnet50"):
        ImageEncoder("vit", weights=None)
    with pytest.raises(ValueError, match="imagenet"):
        ImageEncoder("resnet18", weights="imagenet1k")
    with pytest.raises(TypeError, match="weights"):
        ImageEncoder("resnet18", weights=3)


def test_imagenet_weights_offline_error(tmp_path, monkeypatch):
    """Without network the 'imagenet' request fails loudly and says what to do."""
    hub_dir = tmp_path / "hub"
    monkeypatch.delenv("MCLSTEXP_OFFLINE", raising=False)  # reach the download attempt
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(hub_dir))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        ImageEncoder("densenet121", weights="imagenet")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "densenet121-a639ec97.pth" in message
    assert str(hub_dir / "checkpoints") in message
    assert "weights=None" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_imagenet_weights_respect_offline_switch(tmp_path, monkeypatch):
    """With MCLSTEXP_OFFLINE=1 and no cached file, no download is even attempted."""
    monkeypatch.setenv("MCLSTEXP_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub"))

    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted although MCLSTEXP_OFFLINE=1")

    monkeypatch.setattr(torch.hub, "download_url_to_file", must_not_download)
    with pytest.raises(RuntimeError, match=r"MCLSTEXP_OFFLINE=1.*resnet18-f37072fd\.pth.*weights=None"):
        ImageEncoder("resnet18", weights="imagenet")


def test_weights_path_round_trip(tmp_path):
    torch.manual_seed(1)
    source = ImageEncoder("resnet18", weights=None).eval()
    path = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = ImageEncoder("resnet18", weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # also as a str path
    assert ImageEncoder("resnet18", weights=str(path)).state_dict().keys() == source.state_dict().keys()


def test_weights_path_full_torchvision_state_dict(tmp_path):
    """A full torchvision state dict (with classifier) loads; so do old DenseNet key names."""
    torch.manual_seed(3)
    tv = torchvision.models.densenet121(weights=None).eval()
    state = tv.state_dict()
    old_style = {}
    for key, value in state.items():
        for part in ("norm", "relu", "conv"):
            for n in ("1", "2"):
                key = key.replace(f".{part}{n}.", f".{part}.{n}.")
        old_style[key] = value
    assert any(".norm.1." in k for k in old_style)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(F.adaptive_avg_pool2d(F.relu(tv.features(x)), 1), 1)
    for i, sd in enumerate((state, old_style)):
        path = tmp_path / f"tv{i}.pth"
        torch.save(sd, path)
        enc = ImageEncoder("densenet121", weights=path, pre_pool_relu=True).eval()
        with torch.no_grad():
            assert torch.allclose(enc(x), expected, atol=1e-6)


def test_weights_path_wrong_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="Missing keys.*Unexpected keys"):
        ImageEncoder("resnet50", weights=path)


def test_weights_path_wrong_shapes(tmp_path):
    state = ImageEncoder("resnet18", weights=None).state_dict()
    state["backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "shapes.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong shape.*backbone\.conv1\.weight \(64, 3, 3, 3\)"):
        ImageEncoder("resnet18", weights=path)
    with pytest.raises(ValueError, match="neither 'imagenet'/'pretrained' nor an existing file"):
        ImageEncoder("resnet18", weights=tmp_path / "missing.pt")


def test_freeze_image_backbone():
    torch.manual_seed(0)
    model = MclSTExp(12, image_arch="resnet18", weights=None, freeze_image=True)
    model.train()
    backbone = model.image_encoder.backbone
    assert not backbone.training
    assert all(not m.training for m in backbone.modules())
    assert model.image_projection.training and model.spot_encoder.training
    assert all(not p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # incl. BN statistics
    head_before = model.image_projection.projection.weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randn(4, 3, 32, 32), torch.rand(4, 12), torch.randint(0, 10, (4, 2)))
    out["loss"].backward()
    opt.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.image_projection.projection.weight)


# --------------------------------------------------------------------------------------
# Spot side
# --------------------------------------------------------------------------------------


def _reference_spot_encoder(enc: SpotEncoder, expr, pos, groups=None):
    """Plain re-implementation of the spot encoder forward (eval mode, no dropout)."""
    x = expr + enc.x_embed.weight[pos[:, 0]] + enc.y_embed.weight[pos[:, 1]]
    n = x.shape[0]
    for block in enc.blocks:
        attn = block.attn
        h = F.layer_norm(x, (x.shape[1],), block.attn_norm.weight, block.attn_norm.bias)
        qkv = h @ attn.to_qkv.weight.T
        inner = attn.heads * attn.dim_head
        q, k, v = qkv[:, :inner], qkv[:, inner : 2 * inner], qkv[:, 2 * inner :]
        heads_out = []
        for hd in range(attn.heads):
            sl = slice(hd * attn.dim_head, (hd + 1) * attn.dim_head)
            scores = q[:, sl] @ k[:, sl].T * attn.dim_head**-0.5
            if groups is not None:
                same = groups[:, None] == groups[None, :]
                scores = scores.masked_fill(~same, float("-inf"))
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            heads_out.append(weights @ v[:, sl])
        lin = attn.to_out[0]
        x = x + torch.cat(heads_out, dim=1) @ lin.weight.T + lin.bias
        h = F.layer_norm(x, (x.shape[1],), block.ff_norm.weight, block.ff_norm.bias)
        l1, l2 = block.ff.net[0], block.ff.net[3]
        x = x + F.gelu(h @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    assert x.shape[0] == n
    return x


@pytest.mark.parametrize("sentence", ["batch", "section"])
def test_spot_encoder_matches_reference(sentence):
    torch.manual_seed(0)
    enc = SpotEncoder(24, n_pos=16, depth=2, heads=3, dim_head=5, sentence=sentence).eval()
    expr = torch.rand(7, 24, dtype=torch.float64)
    enc = enc.double()
    pos = torch.randint(0, 16, (7, 2))
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 0]) if sentence == "section" else None
    with torch.no_grad():
        ours = enc(expr, pos, groups)
        ref = _reference_spot_encoder(enc, expr, pos, groups)
    assert ours.shape == (7, 24)
    assert torch.allclose(ours, ref, atol=1e-10)


def test_spot_encoder_published_sizes():
    enc = SpotEncoder(785)
    blocks = enc.blocks
    assert len(blocks) == 2
    attn = blocks[0].attn
    assert attn.to_qkv.weight.shape == (3 * 512, 785) and attn.to_qkv.bias is None
    assert attn.to_out[0].weight.shape == (785, 512) and attn.to_out[0].bias is not None
    assert blocks[0].ff.net[0].weight.shape == (785, 785)
    assert count_parameters(blocks) == 5_691_250


def test_section_sentences_isolate_sections():
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    expr = torch.rand(6, 16)
    pos = torch.randint(0, 8, (6, 2))
    perturbed = expr.clone()
    perturbed[4] += torch.randn(16)  # a spot of section 1 (not a constant shift: LayerNorm removes those)
    for sentence, section0_changes in (("section", False), ("batch", True)):
        torch.manual_seed(1)
        enc = SpotEncoder(16, n_pos=8, heads=2, dim_head=4, sentence=sentence).eval()
        with torch.no_grad():
            a = enc(expr, pos, groups)
            b = enc(perturbed, pos, groups)
        diff0 = (a[:3] - b[:3]).abs().max().item()
        diff1 = (a[[3, 5]] - b[[3, 5]]).abs().max().item()
        assert diff1 > 1e-4  # section 1 always sees its own spot change
        if section0_changes:
            assert diff0 > 1e-4
        else:
            assert diff0 < 1e-6


def test_section_sentence_needs_groups():
    enc = SpotEncoder(8, sentence="section")
    with pytest.raises(ValueError, match="groups"):
        enc(torch.rand(3, 8), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sentence"):
        SpotEncoder(8, sentence="slide")


def test_position_out_of_range():
    enc = SpotEncoder(8, n_pos=10)
    expr = torch.rand(2, 8)
    with pytest.raises(ValueError, match=r"n_pos.*Raise n_pos \(to at least 12\)"):
        enc(expr, torch.tensor([[1, 2], [11, 3]]))
    with pytest.raises(ValueError, match="n_pos"):
        enc(expr, torch.tensor([[-1, 2], [1, 3]]))
    with pytest.raises(ValueError, match="integer"):
        enc(expr, torch.tensor([[1.5, 2.0], [1.0, 3.0]]))
    assert enc(expr, torch.tensor([[9.0, 0.0], [1.0, 3.0]])).shape == (2, 8)


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def _reference_loss(spot: np.ndarray, image: np.ndarray, temperature: float) -> float:
    n = spot.shape[0]
    logits = [[sum(spot[i, d] * image[j, d] for d in range(spot.shape[1])) / temperature
               for j in range(n)] for i in range(n)]

    def ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            total += lse - row[i]
        return total / len(rows)

    columns = [[logits[i][j] for i in range(n)] for j in range(n)]
    return (ce(logits) + ce(columns)) / 2


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contrastive_loss_matches_reference(temperature, dtype):
    gen = torch.Generator().manual_seed(42)
    spot = torch.randn(6, 5, generator=gen, dtype=dtype)
    image = torch.randn(6, 5, generator=gen, dtype=dtype)
    ours = contrastive_loss(spot, image, temperature=temperature).item()
    ref = _reference_loss(spot.double().numpy(), image.double().numpy(), temperature)
    assert ours == pytest.approx(ref, abs=1e-5)


def test_contrastive_loss_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(torch.rand(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(torch.rand(3, 4), torch.rand(3, 4), temperature=0.0)


# --------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------


def _synthetic_batch(n_genes=10, batch=6, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    expr = torch.rand(batch, n_genes, generator=gen)
    pos = torch.randint(0, 20, (batch, 2), generator=gen)
    return images, expr, pos


def test_weights_must_be_explicit():
    with pytest.raises(TypeError, match=r"weights='imagenet'.*weights=None"):
        MclSTExp(10)


def test_model_shapes_and_logits():
    torch.manual_seed(0)
    model = MclSTExp(10, image_arch="resnet18", weights=None).eval()
    images, expr, pos = _synthetic_batch()
    with torch.no_grad():
        out = model(images, expr, pos)
        assert model.encode_image(images).shape == (6, 256)
        assert model.encode_spot(expr, pos).shape == (6, 256)
    assert out["image_emb"].shape == out["spot_emb"].shape == (6, 256)
    assert out["logits"].shape == (6, 6)
    assert torch.allclose(out["logits"], out["spot_emb"] @ out["image_emb"].T)
    assert torch.allclose(out["loss"], contrastive_loss(out["spot_emb"], out["image_emb"]))
    assert out["temperature"].item() == 1.0
    # raw embeddings: not unit norm
    assert not torch.allclose(out["spot_emb"].norm(dim=1), torch.ones(6))


def test_normalized_embeddings_and_learned_temperature():
    torch.manual_seed(0)
    model = MclSTExp(10, image_arch="resnet18", weights=None, normalize_embeddings=True,
                     learn_temperature=True).eval()
    assert model.config["temperature"] == pytest.approx(0.07)
    assert model.logit_scale.requires_grad
    images, expr, pos = _synthetic_batch()
    with torch.no_grad():
        out = model(images, expr, pos)
        assert torch.allclose(out["spot_emb"].norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(out["logits"], out["spot_emb"] @ out["image_emb"].T / 0.07, atol=1e-4)
        model.logit_scale.fill_(math.log(1000.0))
        assert model.temperature.item() == pytest.approx(0.01)  # scale capped at 100
    with pytest.raises(ValueError, match="normalize_embeddings"):
        MclSTExp(10, weights=None, learn_temperature=True)


def test_bleep_variant_spot_side_is_projection_only():
    torch.manual_seed(0)
    model = MclSTExp(10, image_arch="resnet18", weights=None, spot_encoder="none").eval()
    assert model.spot_encoder is None
    table = model.parameter_table()
    assert table.loc["spot_encoder", "parameters"] == 0
    assert table.loc["position_embeddings", "parameters"] == 0
    images, expr, pos = _synthetic_batch()
    with torch.no_grad():
        assert torch.equal(model.encode_spot(expr, pos), model.spot_projection(expr))
        assert model(images, expr, pos)["loss"].ndim == 0
    with pytest.raises(ValueError, match="sentence"):
        MclSTExp(10, weights=None, spot_encoder="none", sentence="section")


def test_section_sentence_through_model():
    torch.manual_seed(0)
    model = MclSTExp(10, image_arch="resnet18", weights=None, sentence="section").eval()
    images, expr, pos = _synthetic_batch()
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        out = model(images, expr, pos, groups=groups)
    assert out["spot_emb"].shape == (6, 256)
    with pytest.raises(ValueError, match="groups"):
        model(images, expr, pos)


def test_one_step_lowers_loss():
    """SYNTHETIC batch: one Adam step (paper's lr 1e-4) on it lowers the loss on it."""
    torch.manual_seed(0)
    model = MclSTExp(10, weights=None, dropout=0.0)  # densenet121, the paper's backbone
    model.train()
    images, expr, pos = _synthetic_batch(batch=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-3)
    loss0 = model(images, expr, pos)["loss"]
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(images, expr, pos)["loss"]
    assert loss1.item() < loss0.item()


def test_from_config_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MclSTExp(10, image_arch="resnet18", weights=None, n_pos=32, depth=1, heads=2,
                     dim_head=8, proj_dim=16, normalize_embeddings=True, learn_temperature=True,
                     sentence="section").eval()
    config = json.loads(json.dumps(model.config))  # JSON-serialisable
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(99)
    rebuilt = MclSTExp.from_config(ckpt["config"]).eval()
    assert rebuilt.config == model.config
    assert str(rebuilt) == str(model)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    images, expr, pos = _synthetic_batch()
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        assert not torch.allclose(rebuilt.encode_image(images), model.encode_image(images))
        rebuilt.load_state_dict(ckpt["model"])
        a = model(images, expr, pos, groups)
        b = rebuilt(images, expr, pos, groups)
    for key in ("loss", "image_emb", "spot_emb", "logits"):
        assert torch.equal(a[key], b[key])


def test_from_config_keeps_weights_provenance_without_fetching(tmp_path, monkeypatch):
    cfg = MclSTExp(10, image_arch="resnet18", weights=None).config
    cfg["weights"] = "imagenet"

    def no_network(*args, **kwargs):
        raise AssertionError("from_config must not fetch weights by default")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    rebuilt = MclSTExp.from_config(cfg)
    assert rebuilt.config["weights"] == "imagenet"


def test_model_bad_options():
    with pytest.raises(ValueError, match="spot_encoder"):
        MclSTExp(10, weights=None, spot_encoder="mlp")
    with pytest.raises(ValueError, match="sentence"):
        MclSTExp(10, weights=None, sentence="slide")
    with pytest.raises(ValueError, match="n_pos"):
        MclSTExp(10, weights=None, n_pos=0)
    with pytest.raises(ValueError, match="dropout"):
        MclSTExp(10, weights=None, dropout=1.5)
    with pytest.raises(ValueError, match="temperature"):
        MclSTExp(10, weights=None, temperature=-1.0)


def test_module_all_is_importable():
    for name in models.__all__:
        assert hasattr(models, name)
