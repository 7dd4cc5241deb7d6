"""Tools that turn trained embeddings into predictions.

:func:`retrieve` is the mclSTExp prediction step: the image embedding of every
held-out spot looks up its nearest reference-spot embeddings and the prediction is
the inverse-squared-distance weighted mean of their measured expression (its kernels:
:mod:`mclstexp_lite._retrieval`). :func:`predict_section` does it for a held-out section:
embed its patches and the reference spots (:mod:`mclstexp_lite._embed`), retrieve, and
wrap the result in an AnnData laid out like the truth (:func:`prediction_anndata`).
Those steps are one function, :func:`predict_spots`, over a :class:`ReferenceBank`; a
saved predictor (:meth:`mclstexp_lite.predict.Predictor.predict`) takes the same path.

``torch`` is imported when this module is imported, which happens only when
``mclstexp_lite.tl`` is first accessed (the package imports submodules lazily).
"""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import _retrieval as rv
from ._progress import progress_bar
from ._util import h5ad_value
from ._config import resolve_device
from ._embed import embed_images, embed_spots
from ._inputs import model_expression
from ._spotdata import SpotData

__all__ = ["retrieve", "default_chunk_size"]

#: Memory budget in bytes for one block of work in :func:`retrieve`: the float32
#: query-by-key similarity block of a chunk (allocated once per call and reused), and
#: separately the float64 prediction block of a chunk. On devices other than the CPU
#: it also bounds each gathered block of key embeddings / key expression.
BLOCK_BYTES = 256 * 2**20

#: On the CPU, gathered key embeddings and key expression are processed in blocks of
#: at most this many bytes (float64), a few queries at a time, so that each block stays
#: in the processor's cache. Large temporaries are much slower there: every fresh
#: allocation of hundreds of MiB is zero-filled page by page by the kernel.
CPU_GATHER_BYTES = 2 * 2**20

#: On the CPU the weighted expression sum is a sparse (CSR) weight matrix times the
#: float64 expression bank when a float64 copy of the bank takes at most this many
#: bytes (or the bank is float64 already): it uses all threads, where the blocked
#: gather of :data:`CPU_GATHER_BYTES` runs on one. ``None`` always uses the gather.
CPU_SPARSE_BANK_BYTES: int | None = 1024 * 2**20

_METRICS = ("l1", "l2")


def retrieve(
    query,
    keys,
    key_expr,
    *,
    top_k: int = 200,
    metric: str = "l1",
    chunk_size: int | None = None,
    device=None,
    return_indices: bool = False,
    progress: bool = False,
):
    """Predict expression by weighted top-k retrieval (the mclSTExp inference step).

    For every query embedding (the image embedding of a held-out spot):

    1. cosine similarity to every key (both L2-normalised, then a dot product, in
       float32);
    2. the ``top_k`` keys with the highest similarity are selected;
    3. the distance ``d`` between the *unnormalised* query and each selected key is
       computed: ``"l1"`` is ``sum(|q - k|)``, ``"l2"`` is ``sqrt(sum((q - k)**2))``;
    4. weights ``w = 1 / d**2`` are normalised to sum to one and the prediction is
       ``sum_j w_j * key_expr[j]`` over the selected keys.

    This is the evaluation of the published mclSTExp code (``find_matches`` followed
    by the weighted ``np.average`` loop in its ``evel_*.py`` scripts, run with
    ``top_k=200``). The paper describes the distance as Euclidean; the published code
    uses the L1 norm (``np.linalg.norm(..., ord=1)``). ``metric="l1"`` (the default)
    reproduces the code, ``metric="l2"`` the text. Numerical parity with a per-query
    NumPy transcription of the published loop is tested to ``1e-5``.

    Parameters
    ----------
    query
        Query embeddings, shape ``(Q, D)``: image embeddings of the spots to predict.
        NumPy array (or array-like) or ``torch.Tensor``.
    keys
        Reference embeddings, shape ``(K, D)``: spot (expression) embeddings of the
        reference bank, e.g. all training spots.
    key_expr
        Expression of the reference spots, shape ``(K, G)``, row ``j`` belonging to
        ``keys[j]``. NumPy array, ``torch.Tensor`` or ``scipy.sparse`` matrix (made
        dense).
    top_k
        Number of nearest keys averaged per query, ``1 <= top_k <= K``. The published
        evaluation uses 200.
    metric
        ``"l1"`` (published code) or ``"l2"`` (paper text): the distance used for the
        weights, not for the selection, which is always by cosine similarity.
    chunk_size
        Number of queries processed at once. ``None`` picks the largest chunk for
        which the float32 ``chunk x K`` similarity block and the float64
        ``chunk x G`` prediction block each stay within :data:`BLOCK_BYTES`
        (256 MiB), e.g. 671 queries for ``K = 100_000`` keys and up to 50 000 genes
        (see :func:`default_chunk_size`). The full ``Q x K`` similarity matrix is
        never allocated; one similarity block is allocated per call and reused.
        Gathered key embeddings and key expression (``chunk x top_k x D`` and
        ``chunk x top_k x G``) are processed a few queries at a time in blocks of
        at most :data:`CPU_GATHER_BYTES` (2 MiB) on the CPU, :data:`BLOCK_BYTES` on
        other devices (peak about 1.5 times that: the gathered copy plus its
        float64 cast). Rows with exact ties at the ``top_k`` boundary add an int32
        and a boolean mask of their similarity rows. On the CPU the weighted
        expression sum is instead one sparse product per chunk with a float64 copy
        of ``key_expr``, made once per call when it takes at most
        :data:`CPU_SPARSE_BANK_BYTES` (1 GiB; no copy when ``key_expr`` is float64).
        Apart from floating-point rounding, the result does not depend on the
        chunking.
    device
        Where to compute (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``; see
        :func:`mclstexp_lite.train.resolve_device`). ``None`` uses the device of the
        first ``torch.Tensor`` among ``query``, ``keys``, ``key_expr``, else the CPU.
    return_indices
        Also return the selected key indices.
    progress
        Show a ``tqdm`` progress bar over chunks.

    Returns
    -------
    pred
        Predicted expression, shape ``(Q, G)``, float32. A ``torch.Tensor`` on the
        device of ``key_expr`` if ``key_expr`` was a tensor, else a NumPy array.
    indices
        Only with ``return_indices=True``: int64, shape ``(Q, top_k)``, the selected
        keys of each query ordered by decreasing cosine similarity (ties by increasing
        key index); same kind and device as ``pred``.

    Raises
    ------
    ValueError
        If an input is not 2-D, the embedding widths or key counts disagree, an input
        holds NaN or infinite values, ``top_k`` is outside ``[1, K]``, ``metric`` is
        unknown or ``chunk_size`` is not a positive integer.
    TypeError
        If an input is not numeric.

    Notes
    -----
    **Ties in cosine similarity.** ``torch.topk`` (used by the published code) does
    not guarantee which of several keys with exactly equal similarity it returns, so
    with exact ties at the ``top_k`` boundary the published result can depend on the
    hardware, the library version and the key order. Here ties are broken toward the
    lower key index: keys strictly more similar than the ``top_k``-th value are always
    kept and the remaining places go to the tied keys with the lowest indices, so the
    result is deterministic. Ties are exact float32 equality of the computed
    similarities (e.g. duplicated reference spots).

    **Zero distance.** The published weights ``1 / d**2`` are infinite when a query
    equals a key, and the weighted average becomes NaN. Here, if any of the
    ``top_k`` distances of a query is exactly 0, the prediction is the plain mean of
    the expression of the zero-distance keys (the limit of the weighted average as
    those distances shrink equally). Otherwise weights are computed as
    ``(d_min / d)**2`` before normalising, identical to ``1 / d**2`` normalised but
    free of overflow for tiny distances.

    **Precision.** Similarities are float32 as in the published code; float32
    matrix multiplication is forced to full precision (no TF32) during the call.
    Distances, weights and the weighted sum are float64 (float32 on Apple ``mps``
    devices, which lack float64); the prediction is returned as float32. A zero
    embedding vector is normalised to zero (``eps = 1e-12`` as in
    ``torch.nn.functional.normalize``) and so has similarity 0 to every key.

    Examples
    --------
    >>> import numpy as np
    >>> from mclstexp_lite.tl import retrieve
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.normal(size=(500, 256)).astype(np.float32)
    >>> key_expr = rng.random((500, 100)).astype(np.float32)
    >>> query = rng.normal(size=(20, 256)).astype(np.float32)
    >>> retrieve(query, keys, key_expr, top_k=50).shape
    (20, 100)
    """
    q_all, k_all, e_all = _retrieve_inputs(query, keys, key_expr)
    n_query, n_keys, n_genes = q_all.shape[0], k_all.shape[0], e_all.shape[1]
    top_k = _check_retrieve_settings(top_k, metric, chunk_size, n_keys)
    device = _retrieve_device(device, query, keys, key_expr)
    acc = torch.float32 if device.type == "mps" else torch.float64

    torch_out = isinstance(key_expr, torch.Tensor)
    out_device = key_expr.device if torch_out else torch.device("cpu")
    if chunk_size is None:
        chunk_size = default_chunk_size(n_keys, n_genes)
    chunk_size = int(min(chunk_size, max(n_query, 1)))

    pred = torch.empty((n_query, n_genes), dtype=torch.float32, device=out_device)
    indices = (
        torch.empty((n_query, top_k), dtype=torch.int64, device=out_device)
        if return_indices
        else None
    )
    starts = range(0, n_query, chunk_size)
    gather_bytes = CPU_GATHER_BYTES if device.type == "cpu" else BLOCK_BYTES
    with torch.no_grad(), rv.full_precision_matmul():
        keys_dev = k_all.detach().to(device)
        keys_unit = F.normalize(keys_dev.float(), p=2, dim=1)
        expr_dev = e_all.detach().to(device)
        expr_sparse = None  # float64 bank for the sparse weighted sum (CPU only)
        if device.type == "cpu" and CPU_SPARSE_BANK_BYTES is not None and (
            expr_dev.dtype == acc or 8 * n_keys * n_genes <= CPU_SPARSE_BANK_BYTES
        ):
            expr_sparse = expr_dev.to(acc)
        # One similarity buffer for all chunks: a fresh block per chunk would be
        # zero-filled by the kernel every time (about 3x the matrix product's cost).
        sims_buffer = torch.empty((chunk_size, n_keys), dtype=torch.float32, device=device)
        for start in progress_bar(starts, desc="retrieve", unit="chunk", disable=not progress):
            stop = min(start + chunk_size, n_query)
            q = q_all[start:stop].detach().to(device)
            sims = rv.similarity_block(
                F.normalize(q.float(), p=2, dim=1), keys_unit, out=sims_buffer[: stop - start]
            )
            idx = rv.topk_lowest_index(sims, top_k)
            del sims
            dist = rv.distances(q.to(acc), keys_dev, idx, metric, acc, gather_bytes)
            weights = rv.inverse_square_weights(dist)
            if expr_sparse is not None:
                chunk_pred = rv.weighted_sum_sparse(weights, expr_sparse, idx)
            else:
                chunk_pred = rv.weighted_sum(weights, expr_dev, idx, acc, gather_bytes)
            pred[start:stop] = chunk_pred.to(device=out_device, dtype=torch.float32)
            if indices is not None:
                indices[start:stop] = idx.to(out_device)

    if not torch_out:
        pred = pred.numpy()
        indices = indices.numpy() if indices is not None else None
    return (pred, indices) if return_indices else pred


def _retrieve_inputs(query, keys, key_expr):
    """The three inputs of :func:`retrieve` as tensors, checked: 2-D, matching widths
    and rows, a non-empty bank, finite values."""
    tensors = {
        "query": rv.as_tensor(query, "query"),
        "keys": rv.as_tensor(keys, "keys"),
        "key_expr": rv.as_tensor(key_expr, "key_expr", allow_sparse=True),
    }
    for name, tensor in tensors.items():
        if tensor.ndim != 2:
            raise ValueError(
                f"`{name}` must be 2-D, got shape {tuple(tensor.shape)}; "
                + {
                    "query": "pass one embedding per row, shape (Q, D).",
                    "keys": "pass one embedding per row, shape (K, D).",
                    "key_expr": "pass one spot per row, shape (K, G).",
                }[name]
            )
    q_all, k_all, e_all = tensors["query"], tensors["keys"], tensors["key_expr"]
    dim = q_all.shape[1]
    n_keys = k_all.shape[0]
    if k_all.shape[1] != dim:
        raise ValueError(
            f"`query` has embedding width {dim} but `keys` has {k_all.shape[1]}; "
            "both must come from the same projection head."
        )
    if e_all.shape[0] != n_keys:
        raise ValueError(
            f"`keys` has {n_keys} rows but `key_expr` has {e_all.shape[0]}; "
            "row j of `key_expr` must be the expression of key j."
        )
    if n_keys == 0:
        raise ValueError("`keys` is empty; the reference bank needs at least one spot.")
    for name, tensor in tensors.items():
        rv.check_finite(tensor, name)
    return q_all, k_all, e_all


def _check_retrieve_settings(top_k, metric, chunk_size, n_keys: int) -> int:
    """``top_k`` as an int in ``[1, n_keys]``; ``metric`` and ``chunk_size`` checked."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"`top_k` must be an integer, got {top_k!r}.")
    top_k = int(top_k)
    if top_k < 1:
        raise ValueError(f"`top_k` must be at least 1, got {top_k}.")
    if top_k > n_keys:
        raise ValueError(
            f"`top_k`={top_k} is larger than the number of keys K={n_keys}; "
            f"lower `top_k` to at most {n_keys}."
        )
    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {_METRICS}, got {metric!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be a positive integer or None, got {chunk_size!r}."
        )
    return top_k


def _retrieve_device(device, query, keys, key_expr) -> torch.device:
    """Where :func:`retrieve` computes: ``device`` resolved, or for ``None`` the device of
    the first tensor input (else the CPU)."""
    if device is None:
        first = next((x for x in (query, keys, key_expr) if isinstance(x, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    else:
        try:
            device = device if device == "auto" else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"`device` {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'."
            ) from err
        device = resolve_device(device)
    return device


def default_chunk_size(n_keys: int, n_genes: int, *, block_bytes: int | None = None) -> int:
    """Number of queries per chunk used by :func:`retrieve` when ``chunk_size=None``.

    Parameters
    ----------
    n_keys
        Number of keys ``K``.
    n_genes
        Number of genes ``G``.
    block_bytes
        Memory budget per block; ``None`` uses :data:`BLOCK_BYTES` (256 MiB).

    Returns
    -------
    int
        The largest ``c >= 1`` with ``4 * c * K <= block_bytes`` (float32 similarity
        block) and ``8 * c * G <= block_bytes`` (float64 prediction block).
    """
    if block_bytes is None:
        block_bytes = BLOCK_BYTES
    by_sims = block_bytes // (4 * max(int(n_keys), 1))
    by_pred = block_bytes // (8 * max(int(n_genes), 1))
    return max(1, min(by_sims, by_pred))


# =========================================================== section prediction
#: Key of ``uns`` where :func:`predict_section` and :func:`prediction_anndata` record
#: how a prediction was made.
PREDICTION_KEY = "mclstexp_prediction"


def embed_reference(model, reference, *, device="auto") -> np.ndarray:
    """Spot embeddings of a reference bank, one section at a time.

    Parameters
    ----------
    model
        A trained :class:`mclstexp_lite.models.MclSTExp`.
    reference
        :class:`mclstexp_lite.train.SpotData` of the reference (training) sections.
    device
        Where to compute (``"auto"``, ``"cpu"``, ``"cuda"``...).

    Returns
    -------
    numpy.ndarray
        ``(len(reference), proj_dim)`` float32, row ``i`` the embedding of
        ``reference.obs_names[i]``. Each section is encoded as one "sentence" (all its
        spots attend to each other in the Transformer), see
        :func:`mclstexp_lite.train.embed_spots`.
    """
    _check_spotdata(reference, "reference")
    return np.asarray(embed_spots(model, reference, device=device, per_section=True),
                      dtype=np.float32)


@dataclass(frozen=True)
class ReferenceBank:
    """The reference side of retrieval: what every prediction looks up and averages.

    Attributes
    ----------
    emb
        ``(N, D)`` float32 spot embeddings of the reference spots.
    expr
        ``(N, G)`` expression of the same spots as the model reads it (per-section centred
        for ``expr_norm="center"``, :func:`mclstexp_lite._inputs.model_expression`): what
        retrieval averages.
    genes
        The ``G`` gene names, in column order.
    sections, n_spots
        The reference sections and their spot counts, in order (recorded with every
        prediction).

    Built from training sections with :meth:`from_spotdata`; a saved predictor holds one
    (:attr:`mclstexp_lite.predict.Predictor.bank`).
    """

    emb: np.ndarray
    expr: object
    genes: list
    sections: list
    n_spots: list

    def __post_init__(self):
        n = int(sum(self.n_spots))
        if len(self.sections) != len(self.n_spots) or self.emb.ndim != 2 or \
                len(self.emb) != n or tuple(self.expr.shape) != (n, len(self.genes)):
            raise ValueError(
                f"reference bank parts do not fit together: embeddings {tuple(self.emb.shape)}, "
                f"expression {tuple(self.expr.shape)}, {len(self.genes)} genes, sections "
                f"{list(self.sections)} with {list(self.n_spots)} spots")

    @classmethod
    def from_spotdata(cls, model, reference, *, reference_emb=None,
                      device="auto") -> "ReferenceBank":
        """The bank of the reference sections ``reference`` (a
        :class:`mclstexp_lite.train.SpotData`): their spot embeddings (given, e.g. from a
        cache, or :func:`embed_reference`) and the expression ``model`` reads
        (``reference.expr`` when ``model`` is ``None``)."""
        _check_spotdata(reference, "reference")
        if reference_emb is None:
            if model is None:
                raise ValueError("`model` is None; pass a trained model, or `reference_emb`.")
            reference_emb = embed_reference(model, reference, device=device)
        reference_emb = np.asarray(reference_emb, dtype=np.float32)
        if reference_emb.ndim != 2 or reference_emb.shape[0] != len(reference):
            raise ValueError(f"`reference_emb` must have shape ({len(reference)}, D), got "
                             f"{reference_emb.shape}.")
        sizes = np.bincount(reference.groups, minlength=len(reference.sections))
        return cls(emb=reference_emb,
                   expr=reference.expr if model is None else model_expression(model, reference),
                   genes=[str(g) for g in reference.genes],
                   sections=[str(s) for s in reference.sections],
                   n_spots=[int(n) for n in sizes])


def predict_spots(model, bank: ReferenceBank, test_adata, *, test_data=None, image_emb=None,
                  top_k: int = 200, metric: str = "l1", config=None, device="auto",
                  method: str = "mclstexp", info: dict | None = None, progress: bool = False,
                  return_image_emb: bool = False):
    """Embed, retrieve, assemble: the one prediction path of :func:`predict_section` and
    :meth:`mclstexp_lite.predict.Predictor.predict`.

    Parameters
    ----------
    model
        The trained model (its image encoder embeds ``test_data``); may be ``None`` when
        ``image_emb`` is given.
    bank
        The :class:`ReferenceBank` retrieved from.
    test_adata
        The section predicted (its spots, coordinates and images; its expression is not
        read).
    test_data
        :class:`mclstexp_lite.train.SpotData` of ``test_adata``'s patches; default built
        from it with the package's patch geometry.
    image_emb
        Precomputed image embeddings ``(n_spots, D)`` (skips the encoder pass).
    top_k, metric
        Passed to :func:`retrieve`.
    config
        Optional training config: only the device and precision of the image pass are
        read.
    method
        Recorded as ``method``.
    info
        More keys for ``uns['mclstexp_prediction']`` (e.g. a predictor's).
    return_image_emb
        Also return the image embeddings.

    Returns
    -------
    anndata.AnnData
        The prediction (:func:`prediction_anndata`): ``X`` float32 in the bank's genes;
        ``var`` copied from ``test_adata`` when it has exactly those genes;
        ``uns['mclstexp_prediction']``: ``method``, ``top_k``, ``metric``,
        ``reference_sections``, ``reference_n_spots``, ``n_reference``, ``model_config``
        (JSON string), ``image_only`` (the section has no measured genes),
        ``test_section``, then the keys of ``info``.
    """
    _check_adata(test_adata, "test_adata")
    dev = resolve_device(device)
    if image_emb is None:
        if model is None:
            raise ValueError("`model` is None; pass a trained model, or `image_emb`.")
        if test_data is None:
            test_data = SpotData.from_anndata({_section_of(test_adata): test_adata},
                                              progress=progress)
        if len(test_data) != test_adata.n_obs:
            raise ValueError(f"`test_data` has {len(test_data)} spots but `test_adata` has "
                             f"{test_adata.n_obs}; build it from the same AnnData.")
        image_emb = embed_images(model, test_data, config=config, device=dev,
                                 progress=progress)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    if image_emb.ndim != 2 or image_emb.shape[0] != test_adata.n_obs:
        raise ValueError(f"`image_emb` must have shape ({test_adata.n_obs}, D), got "
                         f"{image_emb.shape}.")
    pred = retrieve(image_emb, bank.emb, bank.expr, top_k=top_k, metric=metric, device=dev,
                    progress=progress)
    record = {
        "method": str(method),
        "top_k": int(top_k),
        "metric": str(metric),
        "reference_sections": [str(s) for s in bank.sections],
        "reference_n_spots": [int(n) for n in bank.n_spots],
        "n_reference": int(len(bank.emb)),
        "model_config": json.dumps(model.config if model is not None else {}, sort_keys=True),
        "image_only": bool(test_adata.n_vars == 0),
        **(info or {}),
    }
    same_genes = [str(g) for g in test_adata.var_names] == list(bank.genes)
    out = prediction_anndata(pred, test_adata, info=record,
                             genes=None if same_genes else list(bank.genes))
    return (out, image_emb) if return_image_emb else out


def predict_section(
    model,
    reference,
    test_adata,
    *,
    config=None,
    top_k: int = 200,
    metric: str = "l1",
    test_data=None,
    device="auto",
    image_emb=None,
    reference_emb=None,
    method: str = "mclstexp",
    progress: bool = False,
):
    """Predict the expression of a held-out section by retrieval.

    The held-out section's H&E patches are embedded with the image encoder
    (:func:`mclstexp_lite.train.embed_images`), the reference bank is the spot
    embeddings of the training sections (:func:`embed_reference`), and every test spot
    gets the weighted mean expression of its ``top_k`` nearest reference spots
    (:func:`retrieve`, with ``key_expr=reference.expr``, or the per-section centred
    expression of a model trained with ``expr_norm="center"``,
    :func:`mclstexp_lite._inputs.model_expression`; ``reference.expr`` when ``model`` is
    ``None``). The steps are :func:`predict_spots`, which a saved predictor uses too.

    Parameters
    ----------
    model
        Trained :class:`mclstexp_lite.models.MclSTExp` (or its BLEEP-style variant
        ``spot_encoder="none"``). May be ``None`` when both ``image_emb`` and
        ``reference_emb`` are given.
    reference
        :class:`mclstexp_lite.train.SpotData` of the reference sections; its ``expr``
        is what gets averaged, so it must hold the same genes, in the same order, as
        ``test_adata``.
    test_adata
        The held-out section, prepared like the reference
        (:func:`mclstexp_lite.pp.prepare`). Only its patches are used for the
        prediction; its expression is never read.
    config
        Optional :class:`mclstexp_lite.train.TrainConfig`: only the device and precision
        settings of the image pass are read. The input size and normalisation come from
        the model itself (``model.preprocessing``).
    top_k, metric
        Passed to :func:`retrieve` (published evaluation: 200 and ``"l1"``).
    test_data
        :class:`mclstexp_lite.train.SpotData` of ``test_adata`` if already built (saves
        a patch-cache lookup); default built from ``test_adata``.
    device
        Where to compute.
    image_emb, reference_emb
        Precomputed embeddings (``(n_test, D)`` and ``(len(reference), D)``), e.g.
        from a cache; each one given skips its encoder pass.
    method
        Name recorded in ``uns['mclstexp_prediction']['method']``.
    progress
        Show progress bars.

    Returns
    -------
    anndata.AnnData
        ``X``: predicted expression, dense float32 ``(n_spots, n_genes)``. ``obs``,
        ``var``, ``obsm`` and ``uns['spatial']`` are copies of ``test_adata``'s, so the
        prediction plots and scores like the truth. ``uns['mclstexp_prediction']``:
        ``method``, ``top_k``, ``metric``, ``reference_sections`` (list),
        ``reference_n_spots`` (spots per reference section, same order),
        ``n_reference``, ``model_config`` (JSON string), ``image_only`` and
        ``test_section`` (:func:`predict_spots`). Writable with ``write_h5ad``.

    Raises
    ------
    ValueError
        If genes differ between reference and test, embedding shapes do not match, or
        ``model`` is missing while an embedding must be computed.
    """
    _check_spotdata(reference, "reference")
    _check_adata(test_adata, "test_adata")
    if test_adata.n_vars and list(test_adata.var_names) != list(reference.genes):
        raise ValueError(
            "`test_adata` and `reference` have different genes (or gene order); prepare "
            "both with the same panel: pp.prepare(adata, genes)."
        )
    if model is not None:
        check_model_reference(model, reference)
    elif image_emb is None or reference_emb is None:
        raise ValueError("`model` is None; pass a trained model, or both `image_emb` and "
                         "`reference_emb`.")
    dev = resolve_device(device)
    bank = ReferenceBank.from_spotdata(model, reference, reference_emb=reference_emb,
                                       device=dev)
    return predict_spots(model, bank, test_adata, test_data=test_data, image_emb=image_emb,
                         top_k=top_k, metric=metric, config=config, device=dev,
                         method=method, progress=progress)


def check_model_reference(model, reference) -> None:
    """Refuse a model and a reference bank that do not belong together.

    The model's spot encoder reads ``n_genes`` expression values per spot, column by
    column: a reference with another number of genes was not what it was trained on
    (another panel), and one with the same genes in another order would put each gene's
    expression where the model learned another gene's, so predictions would land under
    the wrong names. The count is always compared; the names and their order when the
    model knows them (``model.genes``: set when it is read from a checkpoint or a
    predictor, :func:`mclstexp_lite.train.load_model`, and when a training
    run saves a checkpoint).
    """
    n = (getattr(model, "config", None) or {}).get("n_genes")
    if n is not None and int(n) != reference.n_genes:
        raise ValueError(
            f"the model was trained on {n} genes but the reference has {reference.n_genes} "
            f"(e.g. {list(reference.genes[:3])}); build the reference from the sections the "
            "model was trained on, prepared with the same gene panel (pp.prepare(adata, "
            "genes)).")
    check_gene_order(getattr(model, "genes", None), reference.genes,
                     "the model was trained on", "the reference has")


def check_gene_order(expected, given, expected_what: str, given_what: str) -> None:
    """Raise ``ValueError`` unless ``given`` are the gene names ``expected``, in the same
    order (nothing is checked when ``expected`` is ``None``). The message names the first
    position that differs and says how to fix it."""
    if expected is None:
        return
    expected, given = [str(g) for g in expected], [str(g) for g in given]
    if expected == given:
        return
    if len(expected) == len(given) and sorted(expected) == sorted(given):
        i = next(k for k, (a, b) in enumerate(zip(expected, given)) if a != b)
        raise ValueError(
            f"{expected_what} the same {len(expected)} genes as {given_what}, but in "
            f"another order: gene {i} is {expected[i]!r} in the first and {given[i]!r} in "
            "the second. Each gene's expression would be "
            "read as another gene's. Prepare the reference with the model's panel in its "
            "order: pp.prepare(adata, model_genes) (for a checkpoint, "
            "train.load_checkpoint(path)['genes']).")
    missing = [g for g in expected if g not in set(given)][:5]
    extra = [g for g in given if g not in set(expected)][:5]
    raise ValueError(
        f"{expected_what} other genes than {given_what}: {len(expected)} vs {len(given)}; "
        f"missing e.g. {missing}, unexpected e.g. {extra}. "
        "Build the reference from the sections the model was trained on, prepared with its "
        "gene panel (pp.prepare(adata, genes)).")


def prediction_anndata(pred, true_adata, *, info: dict, genes=None):
    """Wrap a prediction in an AnnData laid out like the truth.

    Parameters
    ----------
    pred
        ``(n_spots, n_genes)`` predicted expression, rows in ``true_adata.obs_names``
        order, columns in ``true_adata.var_names`` order.
    true_adata
        The measured (prepared) section.
    info
        How the prediction was made; stored as ``uns['mclstexp_prediction']`` after
        ``test_section`` is added. Values must be h5ad-writable: str, int, float, bool
        or lists of them (``None`` is stored as the string ``"None"``).
    genes
        Column names when ``true_adata`` has no genes (an image-only section from
        :func:`mclstexp_lite.datasets.from_image`); default ``true_adata.var_names``.

    Returns
    -------
    anndata.AnnData
        ``X`` float32 dense; copies of ``obs``, ``var``, ``obsm`` and
        ``uns['spatial']``; ``uns['mclstexp_prediction']``.
    """
    _check_adata(true_adata, "true_adata")
    if not isinstance(info, dict):
        raise TypeError(f"`info` must be a dict, got {type(info).__name__}.")
    X = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    var = (true_adata.var.copy() if genes is None
           else pd.DataFrame(index=pd.Index([str(g) for g in genes])))
    if X.shape != (true_adata.n_obs, len(var)):
        raise ValueError(f"`pred` has shape {X.shape} but the section has "
                         f"{(true_adata.n_obs, len(var))} (spots, genes).")
    if X.dtype.kind not in "biuf":
        raise TypeError(f"`pred` must be numeric, got dtype {X.dtype}.")
    out = ad.AnnData(
        X=np.ascontiguousarray(X, dtype=np.float32),
        obs=true_adata.obs.copy(),
        var=var,
        obsm={k: np.array(v, copy=True) for k, v in true_adata.obsm.items()},
    )
    if "spatial" in true_adata.uns:
        out.uns["spatial"] = copy.deepcopy(dict(true_adata.uns["spatial"]))
    mask = (true_adata.uns.get("mclstexp") or {}).get("tissue_mask")
    if mask is not None:  # image-only sections: the tissue found, for plots
        out.uns["mclstexp"] = {"tissue_mask": np.array(mask, copy=True)}
    record = {k: h5ad_value(v) for k, v in info.items()}
    record["test_section"] = _section_of(true_adata)
    out.uns[PREDICTION_KEY] = record
    return out


def _section_of(adata) -> str:
    if "section" in adata.obs and adata.n_obs:
        values = adata.obs["section"].astype(str).unique()
        if len(values) == 1:
            return str(values[0])
    spatial = adata.uns.get("spatial", {})
    if len(spatial) == 1:
        return str(next(iter(spatial)))
    return "section"


def _check_adata(adata, name: str) -> None:
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"`{name}` must be an AnnData, got {type(adata).__name__}.")


def _check_spotdata(data, name: str) -> None:
    if not isinstance(data, SpotData):
        raise TypeError(f"`{name}` must be a mclstexp_lite.train.SpotData, got "
                        f"{type(data).__name__}; build it with SpotData.from_anndata.")


__all__ += ["predict_section", "predict_spots", "ReferenceBank", "embed_reference",
            "prediction_anndata", "check_model_reference", "check_gene_order", "PREDICTION_KEY"]
