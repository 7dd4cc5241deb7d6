"""Tests for mclstexp_lite._augment: gathering cached patches into uint8 batches
(``to_torch_batch``) and the on-device augmentation (``gpu_augment``), checked against
torchvision.

All data here are SYNTHETIC (random uint8 patches).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import mclstexp_lite._augment as A
from mclstexp_lite import patches as P

torch.set_num_threads(2)


# ----------------------------------------------------- batches (from test_patches.py)
def test_to_torch_batch_keeps_order_and_layout(small_patches):
    arr, mm = small_patches
    idx = [5, 1, 5, 19, 0, 7]
    expected = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2)
    for source in (arr, mm):
        for index in (idx, np.array(idx), torch.tensor(idx)):
            got = to = P.to_torch_batch(source, index, device="cpu")
            assert got.dtype == torch.uint8 and got.shape == (6, 3, 8, 8)
            assert torch.equal(to, expected)
    assert P.to_torch_batch(mm, []).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="outside 0..19"):
        P.to_torch_batch(mm, [0, 20])
    with pytest.raises(TypeError, match="integer"):
        P.to_torch_batch(mm, [0.0, 1.0])
    with pytest.raises(TypeError, match="uint8"):
        P.to_torch_batch(arr.astype(np.float32), [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_torch_batch_cuda(small_patches):
    arr, mm = small_patches
    got = P.to_torch_batch(mm, [3, 2, 9], device="cuda")
    assert got.is_cuda
    assert torch.equal(got.cpu(), torch.from_numpy(arr[[3, 2, 9]]).permute(0, 3, 1, 2))


# ------------------------------------------------ augmentation (from test_patches.py)
def _batch(n=16, size=12, seed=6):
    """SYNTHETIC: random uint8 NCHW batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_gpu_augment_is_deterministic_given_a_generator():
    x = _batch()
    a = P.gpu_augment(x, generator=torch.Generator().manual_seed(1))
    b = P.gpu_augment(x, generator=torch.Generator().manual_seed(1))
    c = P.gpu_augment(x, generator=torch.Generator().manual_seed(2))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(x, _batch())  # input untouched


def test_geometry_is_the_drawn_symmetry_of_the_square():
    """Without jitter each sample is exactly its drawn flip/rotation (pixel multiset kept)."""
    x = _batch(n=64)
    out, params = P.gpu_augment(
        x, generator=torch.Generator().manual_seed(3), brightness=0, contrast=0, saturation=0, return_params=True
    )
    got = torch.round(out * 255).to(torch.uint8)
    for i in range(len(x)):
        ref = x[i].numpy()
        if params["hflip"][i]:
            ref = ref[:, :, ::-1]
        if params["vflip"][i]:
            ref = ref[:, ::-1, :]
        ref = np.rot90(ref, int(params["k90"][i]), axes=(1, 2))
        np.testing.assert_array_equal(got[i].numpy(), ref)
        assert torch.equal(torch.sort(got[i].flatten()).values, torch.sort(x[i].flatten()).values)
    # all four quarter turns and both flips occur
    assert set(params["k90"].tolist()) == {0, 1, 2, 3}
    assert 0 < params["hflip"].sum() < 64 and 0 < params["vflip"].sum() < 64


def test_draws_follow_the_documented_distributions():
    x = torch.zeros((4000, 3, 2, 2), dtype=torch.uint8)
    _, p = P.gpu_augment(x, generator=torch.Generator().manual_seed(0), return_params=True)
    assert abs(p["hflip"].float().mean() - 0.5) < 0.04 and abs(p["vflip"].float().mean() - 0.5) < 0.04
    counts = torch.bincount(p["k90"], minlength=4).float() / 4000
    assert torch.all((counts - 0.25).abs() < 0.03)
    f = p["factors"]
    assert f.min() >= 0.5 and f.max() <= 1.5 and torch.all((f.mean(0) - 1.0).abs() < 0.03)
    perms = {tuple(r) for r in p["order"].tolist()}
    assert perms == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}


def test_colour_jitter_matches_torchvision_per_sample():
    x = _batch(n=24, size=10)
    out, p = P.gpu_augment(
        x, generator=torch.Generator().manual_seed(4), flips=False, rotation=None, return_params=True
    )
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(len(x)):
        ref = x[i].float() / 255
        for j in p["order"][i].tolist():
            ref = ops[j](ref, float(p["factors"][i, j]))
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_rotation_any_matches_torchvision_rotate():
    x = _batch(n=12, size=32)
    out, p = P.gpu_augment(
        x,
        generator=torch.Generator().manual_seed(5),
        flips=False,
        rotation="any",
        brightness=0,
        contrast=0,
        saturation=0,
        return_params=True,
    )
    assert p["angle"].min() >= -180 and p["angle"].max() < 180
    for i in range(len(x)):
        ref = TF.rotate(x[i].float() / 255, float(p["angle"][i]))
        agree = torch.isclose(out[i], ref, atol=1e-6).float().mean()
        assert agree > 0.99, (i, float(p["angle"][i]), float(agree))
    # a 45 degree turn leaves black corners
    y = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    rotated = A._rotate_any(y.float() / 255, torch.tensor([45.0]))
    assert rotated[0, :, 0, 0].eq(0).all() and rotated[0, :, 8, 8].eq(1).all()


def test_identity_settings_and_errors():
    x = _batch(n=3)
    same = P.gpu_augment(x, flips=False, rotation=None, brightness=0, contrast=0, saturation=0)
    assert torch.equal(same, x.float() / 255)
    floats = x.float() / 255
    assert torch.equal(P.gpu_augment(floats, flips=False, rotation=None, brightness=0, contrast=0, saturation=0), floats)
    with pytest.raises(ValueError, match="square"):
        P.gpu_augment(torch.zeros((1, 3, 4, 6), dtype=torch.uint8))
    with pytest.raises(ValueError, match="rotation"):
        P.gpu_augment(x, rotation="180")
    with pytest.raises(ValueError, match="brightness"):
        P.gpu_augment(x, brightness=-0.1)
    with pytest.raises(TypeError, match="uint8"):
        P.gpu_augment(x.to(torch.int32))
    with pytest.raises(TypeError, match="N, 3, H, W"):
        P.gpu_augment(x[0])
