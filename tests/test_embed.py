"""Tests for mclstexp_lite._embed: the model input that inference prepares.

SYNTHETIC patches (random numbers); no training. Embedding a trained model is tested
with checkpoints (test_checkpoint.py), frozen features (test_features.py) and
``predict_section`` (test_cv.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mclstexp_lite import _embed as embed
from mclstexp_lite import models as mdl
from mclstexp_lite import train as tr

from .factories import synthetic_spotdata


# ------------------------------------------ channels-last gather (from test_train.py)
@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_gather_gives_identical_model_input(size, channels_last):
    """SYNTHETIC: the inference path gathers patches without the transposing copy;
    the normalised model input must be bitwise what the NCHW gather gives, with and
    without a resize, for batches from one section and from several."""
    data = synthetic_spotdata(size=32)
    cfg = tr.TrainConfig(image_size=size, device="cpu", model={"weights": None})
    enc = mdl.ImageEncoder("resnet18", image_size=size)
    for idx in (np.array([3, 0, 7, 7]), np.array([15, 2, 20, 11, 0])):
        nchw = data.images(idx)
        cl = data.images(idx, memory_format=torch.channels_last)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, nchw)
        a = embed.prepare_images(nchw, enc, cfg, train=False, generator=None,
                               channels_last=channels_last)
        b = embed.prepare_images(cl, enc, cfg, train=False, generator=None,
                               channels_last=channels_last)
        assert torch.equal(a, b)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert b.is_contiguous(memory_format=fmt)
