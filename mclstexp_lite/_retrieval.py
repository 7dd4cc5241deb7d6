"""The kernels of retrieval prediction (:func:`mclstexp_lite.tl.retrieve`).

One chunk of queries at a time: cosine similarities to every key
(:func:`similarity_block`), the ``top_k`` best with ties toward the lower key index
(:func:`topk_lowest_index`), distances of the unnormalised embeddings to the selected
keys (:func:`distances`), normalised inverse-square weights
(:func:`inverse_square_weights`) and the weighted sum of the selected keys' expression,
either gathered in bounded blocks (:func:`weighted_sum`, :func:`row_blocks`) or as one
sparse product (:func:`weighted_sum_sparse`). Plus the input checks of
:func:`~mclstexp_lite.tl.retrieve` (:func:`as_tensor`, :func:`check_finite`) and
:func:`full_precision_matmul`.

Users call :func:`mclstexp_lite.tl.retrieve`, which sets the memory budgets
(``tl.BLOCK_BYTES``, ``tl.CPU_GATHER_BYTES``, ``tl.CPU_SPARSE_BANK_BYTES``); the
functions here are public for it, the tests and ``benchmarks/bench_retrieval.py``.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

__all__ = ["as_tensor", "check_finite", "full_precision_matmul", "similarity_block",
           "topk_lowest_index", "row_blocks", "distances", "inverse_square_weights",
           "weighted_sum", "weighted_sum_sparse"]


def as_tensor(x, name: str, *, allow_sparse: bool = False) -> torch.Tensor:
    """Return ``x`` as a real-valued tensor (float32, or float64 if it was float64)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        if allow_sparse and hasattr(x, "toarray") and hasattr(x, "nnz"):
            x = x.toarray()
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"`{name}` must be a numeric array or tensor.") from err
        if arr.dtype.kind not in "biuf":
            raise TypeError(
                f"`{name}` must hold real numbers, got dtype {arr.dtype}; "
                "convert it with np.asarray(..., dtype=np.float32)."
            )
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise TypeError(f"`{name}` must hold real numbers, got dtype {t.dtype}.")
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(
            f"`{name}` contains {n_nan} NaN and {n_inf} infinite values; "
            "remove or impute them before retrieval."
        )


@contextlib.contextmanager
def full_precision_matmul():
    """Temporarily forbid TF32/bf16 shortcuts in float32 matrix products."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def similarity_block(
    query_unit: torch.Tensor, keys_unit: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarities of a chunk of unit queries to all unit keys, ``(c, K)``."""
    if out is None:
        return query_unit @ keys_unit.T
    return torch.mm(query_unit, keys_unit.T, out=out)


def topk_lowest_index(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries per row, ties toward the lower column.

    Rows are returned ordered by decreasing value, equal values by increasing index,
    i.e. the first ``k`` entries of a stable descending sort of each row.
    """
    n_cols = sims.shape[1]
    # One extra place tells whether a key outside the selection ties with the k-th.
    vals, idx = torch.topk(sims, min(k + 1, n_cols), dim=1, largest=True, sorted=True)
    if vals.shape[1] > k:
        ambiguous = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k], idx[:, :k]
        if bool(ambiguous.any()):
            rows = ambiguous.nonzero().squeeze(1)
            s, t = sims[rows], vals[rows, k - 1 :]
            above = s > t
            equal = s == t
            n_free = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
            rank = equal.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
            keep = above | (equal & (rank <= n_free))
            cols = keep.nonzero()[:, 1].view(rows.numel(), k)  # row-major: ascending
            idx[rows] = cols
            vals[rows] = s.gather(1, cols)
    # ``topk`` orders by decreasing value; only rows with equal values inside the
    # selection (or rebuilt above) need the canonical order of equal values.
    unsorted = (vals[:, 1:] >= vals[:, :-1]).any(dim=1)
    if bool(unsorted.any()):
        rows = unsorted.nonzero().squeeze(1)
        i, v = idx[rows], vals[rows]
        by_index = torch.argsort(i, dim=1)
        i, v = i.gather(1, by_index), v.gather(1, by_index)
        by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
        idx[rows] = i.gather(1, by_value)
    return idx


def row_blocks(n_rows: int, k: int, width: int, budget: int):
    """Blocks ``(rows, cols)`` of a ``n_rows x k`` index array such that the gathered
    ``rows x cols x width`` float64 block stays within ``budget`` bytes (at least one
    row and one column per block)."""
    per_row = 8 * k * max(width, 1)
    if per_row <= budget:
        step = max(1, budget // per_row)
        for i in range(0, n_rows, step):
            yield slice(i, i + step), slice(0, k)
    else:
        step = max(1, budget // (8 * max(width, 1)))
        for i in range(n_rows):
            for j in range(0, k, step):
                yield slice(i, i + 1), slice(j, j + step)


def distances(q, keys, idx, metric: str, acc, budget: int):
    """Distances between each query row and its selected keys, ``(c, k)`` in ``acc``."""
    n_rows, k = idx.shape
    out = torch.empty((n_rows, k), dtype=acc, device=q.device)
    for rows, cols in row_blocks(n_rows, k, q.shape[1], budget):
        diff = keys[idx[rows, cols]].to(acc)  # a new tensor: safe to change in place
        diff.sub_(q[rows, None, :])
        if metric == "l1":
            out[rows, cols] = diff.abs_().sum(dim=-1)
        else:
            out[rows, cols] = diff.square_().sum(dim=-1).sqrt_()
    return out


def inverse_square_weights(dist: torch.Tensor) -> torch.Tensor:
    """Row-normalised ``1 / d**2``; rows with a zero distance average those keys only."""
    zero = dist == 0
    has_zero = zero.any(dim=1, keepdim=True)
    d_min = dist.min(dim=1, keepdim=True).values
    # In rows with a zero distance the (d_min / d) branch is 0/0 and is discarded.
    ratio = torch.where(has_zero, zero.to(dist.dtype), (d_min / dist).square())
    return ratio / ratio.sum(dim=1, keepdim=True)


def weighted_sum(weights, expr, idx, acc, budget: int):
    """``sum_j weights[:, j] * expr[idx[:, j]]`` in ``acc``, in bounded blocks."""
    n_rows, k = idx.shape
    out = torch.zeros((n_rows, expr.shape[1]), dtype=acc, device=weights.device)
    for rows, cols in row_blocks(n_rows, k, expr.shape[1], budget):
        block = expr[idx[rows, cols]].to(acc)  # (r, j, G)
        out[rows].unsqueeze(1).baddbmm_(weights[rows, None, cols], block)
    return out


def weighted_sum_sparse(weights, expr, idx):
    """The same as :func:`weighted_sum` as one product of a CSR matrix (``c x K``,
    ``top_k`` weights per row) with the bank ``expr`` (already in the weights' dtype)."""
    n_rows, k = idx.shape
    cols, order = torch.sort(idx, dim=1)  # CSR wants ascending columns in each row
    weights = weights.gather(1, order)
    crow = torch.arange(0, n_rows * k + 1, k, dtype=torch.int64, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(
            crow, cols.reshape(-1), weights.reshape(-1), size=(n_rows, expr.shape[0]),
            check_invariants=False,
        )
        return matrix @ expr
