"""Tests for mclstexp_lite._spotdata: ``SpotData`` gathers cached patches across sections,
validates its arrays, and warns about unprepared counts.

All data here are SYNTHETIC (random patches and expression).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mclstexp_lite import _spotdata as spotdata
from mclstexp_lite import train as tr

from .factories import synthetic_spotdata


# ------------------------------------ gathering and validation (from test_patches.py)
def _spot_data(mm, expr, n_first=8) -> tr.SpotData:
    """SYNTHETIC: the 20 cached patches as two sections (rows 0..7 and 8..19) of a SpotData."""
    n = len(mm)
    return tr.SpotData(
        patches=[mm[:n_first], mm[n_first:]], expr=expr,
        pos=np.random.default_rng(6).integers(0, 30, (n, 2)),
        groups=np.repeat([0, 1], [n_first, n - n_first]), sections=["B4", "C2"],
        genes=[f"g{i}" for i in range(expr.shape[1])], obs_names=[f"s{i}" for i in range(n)])


def test_spotdata_gathers_cached_patches_across_sections(small_patches):
    """SYNTHETIC: training batches (SpotData.images, via to_torch_batch per section) are
    the cached rows of the requested spots, in batch order, repeats allowed, from one
    section or several, in either memory format; the other per-spot arrays index alike."""
    arr, mm = small_patches
    expr = np.random.default_rng(5).poisson(2.0, (20, 7)).astype(np.float32)
    data = _spot_data(mm, expr)
    assert len(data) == 20 and data.n_genes == 7
    for idx in (np.array([4, 0, 4, 11]), np.array([19, 8, 8]), np.array([3]), np.arange(20)[::-1]):
        expected = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = data.images(idx, memory_format=fmt)
            assert got.dtype == torch.uint8 and got.shape == (len(idx), 3, 8, 8)
            assert torch.equal(got, expected)
        # each spot's patch is its own cached row, the same as a one-spot batch
        assert torch.equal(torch.stack([data.images([i])[0] for i in idx]), expected)
    idx = np.array([4, 0, 4, 11])
    assert data.groups[idx].tolist() == [0, 0, 0, 1]
    assert torch.equal(torch.as_tensor(data.expr[idx]), torch.tensor(expr[idx], dtype=torch.float32))
    with pytest.raises(IndexError):
        data.images([20])


def test_spotdata_validates(small_patches):
    """SYNTHETIC: SpotData refuses arrays of other lengths, a patch array per section of
    the wrong size, spots not grouped by section, and non-finite expression."""
    _, mm = small_patches
    ok = _spot_data(mm, np.zeros((20, 2), np.float32))
    with pytest.raises(ValueError, match="same length"):
        _spot_data(mm, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="one patch array per section"):
        tr.SpotData(patches=[mm[:7], mm[8:]], expr=ok.expr, pos=ok.pos, groups=ok.groups,
                    sections=ok.sections, genes=ok.genes, obs_names=ok.obs_names)
    with pytest.raises(ValueError, match="grouped by section"):
        tr.SpotData(patches=[mm[:8], mm[8:]], expr=ok.expr, pos=ok.pos,
                    groups=np.r_[ok.groups[1:], ok.groups[:1]], sections=ok.sections,
                    genes=ok.genes, obs_names=ok.obs_names)
    with pytest.raises(ValueError, match="non-finite"):
        _spot_data(mm, np.full((20, 2), np.nan, np.float32))


# -------------------------- expression checks (from test_bad_input.py, test_train.py)
def test_non_finite_or_text_expression_is_refused_by_spotdata():
    with pytest.raises(ValueError, match="SpotData: expression has 1 non-finite"):
        expr = np.ones((22, 6), np.float32)
        expr[3, 1] = np.nan
        synthetic_spotdata(expr=expr)
    with pytest.raises(TypeError, match="SpotData: expr must be a numeric"):
        synthetic_spotdata(expr=np.full((22, 6), "x"))


def test_unprepared_counts_in_spotdata_are_warned_about():
    """SYNTHETIC: raw integer counts are warned about (SpotData.from_anndata runs this check
    on every section); log-normalised expression is not."""
    import warnings

    counts = np.random.default_rng(0).poisson(60, size=(6, 5)).astype(np.float32)
    with pytest.warns(UserWarning, match="section S is whole numbers up to .*pp.prepare"):
        spotdata._warn_if_raw_counts(counts, "S")
    prepared = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spotdata._warn_if_raw_counts(prepared, "S")
