"""Tests for the retrieval stage: :func:`mclstexp_lite.tl.retrieve` and the kernels it is
built from (mclstexp_lite._retrieval: top-k, similarity blocks, weighted sums).

All data here are synthetic (seeded Gaussian embeddings and expression); they check
the algorithm against a plain transcription of the published evaluation loop, not
any biological result.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mclstexp_lite import tl
from mclstexp_lite import _retrieval as retrieval
from mclstexp_lite.tl import default_chunk_size, retrieve

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_retrieve(query, keys, key_expr, top_k, metric):
    """Per-query NumPy transcription of the published mclSTExp evaluation.

    Cosine similarity to all keys, descending argsort, top_k keys, L1 (or L2)
    distances of the unnormalised embeddings, weights 1/d**2, np.average.
    """
    order = 1 if metric == "l1" else 2
    keys_unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    out = np.zeros((query.shape[0], key_expr.shape[1]))
    idx_all = np.zeros((query.shape[0], top_k), dtype=np.int64)
    for i in range(query.shape[0]):
        q = query[i]
        sims = keys_unit @ (q / np.linalg.norm(q))
        idx = np.argsort(sims)[::-1][:top_k]
        d = np.linalg.norm(keys[idx] - q, ord=order, axis=1)
        w = np.reciprocal(d**2)
        w = w / w.sum()
        out[i] = np.average(key_expr[idx], axis=0, weights=w)
        idx_all[i] = idx
    return out, idx_all


@pytest.fixture(scope="module")
def gaussian():
    """Synthetic embeddings (no exact ties) and expression of magnitude ~1."""
    rng = np.random.default_rng(20240501)
    n_query, n_keys, dim, n_genes = 40, 300, 24, 15
    return {
        "query": rng.normal(size=(n_query, dim)),
        "keys": rng.normal(size=(n_keys, dim)),
        "key_expr": rng.normal(size=(n_keys, n_genes)),
    }


@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("top_k", [1, 5, 200])
def test_parity_with_published_loop(gaussian, metric, top_k):
    ref, ref_idx = reference_retrieve(
        gaussian["query"], gaussian["keys"], gaussian["key_expr"], top_k, metric
    )
    pred, idx = retrieve(
        gaussian["query"],
        gaussian["keys"],
        gaussian["key_expr"],
        top_k=top_k,
        metric=metric,
        return_indices=True,
    )
    assert isinstance(pred, np.ndarray) and pred.dtype == np.float32
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred, ref, rtol=0, atol=1e-5)
    # Same keys, in the same (descending similarity) order.
    np.testing.assert_array_equal(idx, ref_idx)


def test_l1_and_l2_differ(gaussian):
    """The metric option must actually change the weights."""
    args = (gaussian["query"], gaussian["keys"], gaussian["key_expr"])
    p1 = retrieve(*args, top_k=20, metric="l1")
    p2 = retrieve(*args, top_k=20, metric="l2")
    assert np.abs(p1 - p2).max() > 1e-3


def test_float32_inputs_match_reference(gaussian):
    q = gaussian["query"].astype(np.float32)
    k = gaussian["keys"].astype(np.float32)
    e = gaussian["key_expr"].astype(np.float32)
    ref, _ = reference_retrieve(
        q.astype(np.float64), k.astype(np.float64), e.astype(np.float64), 50, "l1"
    )
    np.testing.assert_allclose(retrieve(q, k, e, top_k=50), ref, rtol=0, atol=1e-5)


def test_torch_in_torch_out(gaussian):
    q = torch.from_numpy(gaussian["query"])
    k = torch.from_numpy(gaussian["keys"]).requires_grad_(True)
    e = torch.from_numpy(gaussian["key_expr"])
    pred, idx = retrieve(q, k, e, top_k=5, return_indices=True)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.float32
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    assert pred.device == e.device and idx.shape == (q.shape[0], 5)
    np.testing.assert_array_equal(
        pred.numpy(), retrieve(gaussian["query"], gaussian["keys"], gaussian["key_expr"], top_k=5)
    )
    # numpy key_expr -> numpy output even with tensor embeddings
    assert isinstance(retrieve(q, k, gaussian["key_expr"], top_k=5), np.ndarray)


def test_sparse_key_expr(gaussian):
    e = gaussian["key_expr"].copy()
    e[e < 0.5] = 0
    dense = retrieve(gaussian["query"], gaussian["keys"], e, top_k=7)
    sparse = retrieve(gaussian["query"], gaussian["keys"], sp.csr_matrix(e), top_k=7)
    assert isinstance(sparse, np.ndarray)
    np.testing.assert_array_equal(dense, sparse)


def test_chunking_gives_identical_results():
    """Synthetic: chunk_size=7 over 50 queries equals one chunk; blocks stay small."""
    rng = np.random.default_rng(7)
    q, k, e = rng.normal(size=(50, 16)), rng.normal(size=(120, 16)), rng.random((120, 9))
    whole, idx_whole = retrieve(q, k, e, top_k=30, return_indices=True)
    chunked, idx_chunked = retrieve(q, k, e, top_k=30, chunk_size=7, return_indices=True)
    np.testing.assert_array_equal(idx_whole, idx_chunked)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_similarity_blocks_are_bounded(monkeypatch):
    """Synthetic: the Q x K similarity matrix is never formed in one piece."""
    shapes = []
    original = retrieval.similarity_block

    def recording(query_unit, keys_unit, **kwargs):
        shapes.append(tuple(query_unit.shape[:1]) + tuple(keys_unit.shape[:1]))
        return original(query_unit, keys_unit, **kwargs)

    monkeypatch.setattr(retrieval, "similarity_block", recording)
    rng = np.random.default_rng(3)
    q, k, e = rng.normal(size=(50, 8)), rng.normal(size=(64, 8)), rng.random((64, 4))
    retrieve(q, k, e, top_k=10, chunk_size=7)
    assert [s[0] for s in shapes] == [7] * 7 + [1]
    assert all(s[1] == 64 for s in shapes)

    # With the default chunk size and a tiny memory budget, chunks shrink accordingly.
    shapes.clear()
    monkeypatch.setattr(tl, "BLOCK_BYTES", 64 * 4 * 9)  # room for 9 rows of 64 keys
    retrieve(q, k, e, top_k=10)
    assert max(s[0] for s in shapes) == 9 and sum(s[0] for s in shapes) == 50


def test_default_chunk_size_budget():
    n_keys = 100_000
    c = default_chunk_size(n_keys, 1000)
    assert c * n_keys * 4 <= tl.BLOCK_BYTES < (c + 1) * n_keys * 4
    # the prediction block limits the chunk when there are many genes and few keys
    c = default_chunk_size(1000, 30_000)
    assert c * 30_000 * 8 <= tl.BLOCK_BYTES < (c + 1) * 30_000 * 8
    assert default_chunk_size(10**12, 1) == 1


def test_moderate_scale_matches_reference_subset():
    """Synthetic: 1500 queries x 2500 keys, several chunks, spot-checked rows."""
    rng = np.random.default_rng(11)
    q = rng.normal(size=(1500, 32)).astype(np.float32)
    k = rng.normal(size=(2500, 32)).astype(np.float32)
    e = rng.random((2500, 40)).astype(np.float32)
    pred = retrieve(q, k, e, top_k=200, chunk_size=256)
    rows = rng.choice(1500, size=25, replace=False)
    ref, _ = reference_retrieve(
        q[rows].astype(np.float64), k.astype(np.float64), e.astype(np.float64), 200, "l1"
    )
    np.testing.assert_allclose(pred[rows], ref, rtol=0, atol=1e-5)


def test_topk_ties_go_to_lower_index():
    """Synthetic: many exact ties; selection equals a stable descending sort."""
    rng = np.random.default_rng(5)
    sims = torch.from_numpy(rng.integers(0, 3, size=(6, 5000)).astype(np.float32))
    idx = retrieval.topk_lowest_index(sims, 100)
    expected = np.argsort(-sims.numpy(), axis=1, kind="stable")[:, :100]
    np.testing.assert_array_equal(idx.numpy(), expected)
    # all values equal: the first k columns
    idx = retrieval.topk_lowest_index(torch.zeros(2, 50), 4)
    np.testing.assert_array_equal(idx.numpy(), [[0, 1, 2, 3], [0, 1, 2, 3]])


@pytest.mark.parametrize("k", [1, 7, 64, 199, 200])
def test_topk_mixed_ties_match_stable_sort(k):
    """Synthetic: rows with ties inside the selection only, at the boundary only,
    both, or none; every row must equal a stable descending sort."""
    rng = np.random.default_rng(11)
    rows = [
        rng.normal(size=200),                      # no ties
        rng.integers(0, 40, size=200) / 8.0,       # many ties everywhere
        np.r_[np.full(5, 9.0), rng.normal(size=195)],  # ties at the top only
        np.r_[rng.normal(size=195) + 20, np.full(5, 3.0)],  # ties near the bottom
        np.zeros(200),                             # one big tie
    ]
    sims = torch.tensor(np.stack(rows), dtype=torch.float32)
    idx = retrieval.topk_lowest_index(sims, k)
    expected = np.argsort(-sims.numpy(), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx.numpy(), expected)


@pytest.mark.parametrize("budget", [8, 8 * 24 * 3, 8 * 24 * 50 * 4])
def test_gather_blocks_do_not_change_the_result(gaussian, monkeypatch, budget):
    """Synthetic: tiny CPU gather budgets (down to one key of one query per block)
    give the same prediction as the default blocks."""
    q, k, e = gaussian["query"], gaussian["keys"], gaussian["key_expr"]
    default = retrieve(q, k, e, top_k=50)
    monkeypatch.setattr(tl, "CPU_SPARSE_BANK_BYTES", None)  # use the blocked gather
    monkeypatch.setattr(tl, "CPU_GATHER_BYTES", budget)
    blocked = retrieve(q, k, e, top_k=50)
    np.testing.assert_allclose(blocked, default, rtol=1e-6, atol=1e-7)
    ref, _ = reference_retrieve(q, k, e, 50, "l1")
    np.testing.assert_allclose(blocked, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_and_gathered_sums_agree(gaussian, monkeypatch, dtype):
    """Synthetic: the CPU's two ways to form the weighted sum (a CSR product with a
    float64 bank, or blocked gathers) agree, for float32 and float64 banks, and the
    sparse one is used only while the float64 bank fits its budget."""
    q, k = gaussian["query"], gaussian["keys"]
    e = gaussian["key_expr"].astype(dtype)
    calls = []
    original = retrieval.weighted_sum_sparse
    monkeypatch.setattr(retrieval, "weighted_sum_sparse",
                        lambda *a: calls.append(1) or original(*a))
    sparse = retrieve(q, k, e, top_k=50, chunk_size=16)
    assert len(calls) == 3
    monkeypatch.setattr(tl, "CPU_SPARSE_BANK_BYTES", 8 * e.size - 1)  # one byte short
    calls.clear()
    limited = retrieve(q, k, e, top_k=50, chunk_size=16)
    assert len(calls) == (3 if dtype == np.float64 else 0)  # float64: no copy needed
    monkeypatch.setattr(tl, "CPU_SPARSE_BANK_BYTES", None)
    calls.clear()
    gathered = retrieve(q, k, e, top_k=50, chunk_size=16)
    assert not calls
    np.testing.assert_allclose(sparse, gathered, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(limited, gathered, rtol=1e-6, atol=1e-7)


def test_row_blocks_cover_every_entry_once():
    for n_rows, k, width, budget in [(7, 5, 3, 8 * 5 * 3 * 2), (4, 9, 10, 8 * 10 * 2), (3, 4, 2, 1)]:
        seen = np.zeros((n_rows, k), dtype=int)
        for rows, cols in retrieval.row_blocks(n_rows, k, width, budget):
            block = seen[rows, cols]
            assert block.size * width * 8 <= max(budget, width * 8)
            seen[rows, cols] += 1
        assert (seen == 1).all()


def test_duplicate_keys_tie_break_in_retrieve():
    """Synthetic: copies of one key tie; the lowest-index copies are selected."""
    rng = np.random.default_rng(9)
    dim = 8
    keys = rng.normal(size=(400, dim))
    u = rng.normal(size=dim)
    v = u + 0.3 * rng.normal(size=dim)
    keys[250] = u  # the single most similar key
    copies = [17, 90, 91, 333, 399]
    keys[copies] = v  # exact ties for second place
    key_expr = rng.random((400, 3))
    query = (u + 1e-3 * rng.normal(size=dim))[None, :]
    _, idx = retrieve(query, keys, key_expr, top_k=3, return_indices=True)
    np.testing.assert_array_equal(idx, [[250, 17, 90]])
    # reversing the key order keeps the choice "lowest index" in the new order
    _, idx_rev = retrieve(query, keys[::-1].copy(), key_expr[::-1].copy(), top_k=3,
                          return_indices=True)
    np.testing.assert_array_equal(idx_rev, [[400 - 1 - 250, 400 - 1 - 399, 400 - 1 - 333]])


def test_zero_distance_uses_mean_of_exact_matches():
    """Synthetic: a query equal to two keys predicts the mean of their expression."""
    rng = np.random.default_rng(13)
    keys = rng.normal(size=(60, 6))
    keys[41] = keys[12]
    key_expr = rng.random((60, 5))
    query = np.stack([keys[12], rng.normal(size=6), keys[3]])
    pred = retrieve(query, keys, key_expr, top_k=10)
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred[0], key_expr[[12, 41]].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(pred[2], key_expr[3], atol=1e-6)
    ref, _ = reference_retrieve(query[1:2], keys, key_expr, 10, "l1")
    np.testing.assert_allclose(pred[1], ref[0], atol=1e-5)


def test_tiny_distances_do_not_overflow():
    """Synthetic: d = 1e-170 makes the published 1/d**2 infinite; ours stays exact."""
    rng = np.random.default_rng(17)
    keys = rng.normal(size=(30, 4))
    keys[5, 0] = 0.0
    query = keys[5:6].copy()
    query[0, 0] = 1e-170  # nonzero distance whose square underflows to 0 in float64
    key_expr = rng.random((30, 2))
    with np.errstate(all="ignore"):
        published, _ = reference_retrieve(query, keys, key_expr, 5, "l1")
    assert not np.isfinite(published).all()
    pred = retrieve(query, keys, key_expr, top_k=5)
    np.testing.assert_allclose(pred[0], key_expr[5], rtol=1e-6)


def test_progress_bar(gaussian, capsys):
    retrieve(gaussian["query"], gaussian["keys"], gaussian["key_expr"], top_k=3,
             chunk_size=10, progress=True)
    assert "retrieve" in capsys.readouterr().err


def test_empty_query(gaussian):
    pred = retrieve(np.zeros((0, 24)), gaussian["keys"], gaussian["key_expr"], top_k=3)
    assert pred.shape == (0, 15)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"top_k": 301}, ValueError, r"`top_k`=301 .*K=300.*lower `top_k`"),
        ({"top_k": 0}, ValueError, r"`top_k` must be at least 1"),
        ({"top_k": 2.5}, TypeError, r"`top_k` must be an integer"),
        ({"metric": "cosine"}, ValueError, r"`metric` must be one of"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be a positive integer"),
        ({"device": "not-a-device"}, ValueError, r"`device`"),
    ],
)
def test_option_validation(gaussian, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        retrieve(gaussian["query"], gaussian["keys"], gaussian["key_expr"], **kwargs)


def test_input_validation(gaussian):
    q, k, e = gaussian["query"], gaussian["keys"], gaussian["key_expr"]
    with pytest.raises(ValueError, match=r"`query` must be 2-D"):
        retrieve(q[0], k, e, top_k=3)
    with pytest.raises(ValueError, match=r"`query` has embedding width 24 but `keys` has 23"):
        retrieve(q, k[:, :23], e, top_k=3)
    with pytest.raises(ValueError, match=r"`keys` has 300 rows but `key_expr` has 299"):
        retrieve(q, k, e[:299], top_k=3)
    bad = q.copy()
    bad[[0, 4], 1] = np.nan
    with pytest.raises(ValueError, match=r"`query` contains 2 NaN and 0 infinite"):
        retrieve(bad, k, e, top_k=3)
    bad = e.copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match=r"`key_expr` contains 0 NaN and 1 infinite"):
        retrieve(q, k, bad, top_k=3)
    with pytest.raises(TypeError, match=r"`keys` must hold real numbers"):
        retrieve(q, np.full(k.shape, "a"), e, top_k=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(gaussian):
    q = torch.from_numpy(gaussian["query"]).cuda()
    cpu = retrieve(gaussian["query"], gaussian["keys"], gaussian["key_expr"], top_k=50)
    gpu = retrieve(q, gaussian["keys"], torch.from_numpy(gaussian["key_expr"]).cuda(), top_k=50)
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu, rtol=0, atol=1e-5)
