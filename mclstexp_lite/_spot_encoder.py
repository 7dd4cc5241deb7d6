"""The spot view of mclSTExp: expression plus positions through a small Transformer.

:class:`SpotEncoder` (x/y position tables, then pre-norm :class:`TransformerBlock` s of
:class:`Attention` and :class:`FeedForward`), as in the published code; re-exported by
:mod:`mclstexp_lite.models`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._util import check_dropout, positive_int

__all__ = ["Attention", "FeedForward", "TransformerBlock", "SpotEncoder"]


class Attention(nn.Module):
    """Multi-head self-attention as in the published spot encoder.

    ``q, k, v`` come from one bias-free linear layer ``dim -> 3 * heads * dim_head``;
    weights are ``softmax(q k^T * dim_head**-0.5)`` (positions outside ``mask`` get
    zero weight), followed by dropout; the heads are concatenated and mapped back by a
    linear layer ``heads * dim_head -> dim`` with bias, then dropout.

    Parameters
    ----------
    dim
        Token size (number of genes).
    heads, dim_head
        Number of heads and size of each.
    dropout
        Dropout probability on the attention weights and on the output.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.dropout = float(dropout)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence axis.

        Parameters
        ----------
        x
            ``(N, L, dim)`` sequences.
        mask
            Optional boolean ``(L, L)``; ``mask[i, j]`` True lets token ``i`` attend to ``j``.

        Returns
        -------
        torch.Tensor
            ``(N, L, dim)``.
        """
        n, length, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # (N, L, H*D) -> (N, H, L, D)
        q, k, v = (t.reshape(n, length, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""

    def __init__(self, dim: int, hidden_dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(
        self, dim: int, *, heads: int, dim_head: int, mlp_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.ff(self.ff_norm(x))


class SpotEncoder(nn.Module):
    """Expression plus x/y position embeddings through a small Transformer.

    Each spot is a "word" of ``n_genes`` numbers. Its integer array position adds
    ``x_embed[x] + y_embed[y]`` (two learnable tables of ``n_pos`` rows, one per axis),
    then ``depth`` pre-norm :class:`TransformerBlock` s run over a "sentence" of spots.

    Parameters
    ----------
    n_genes
        Genes per spot; also the token size of the Transformer.
    n_pos
        Rows of each position table; array coordinates must lie in ``[0, n_pos)``.
        64 covers HER2+ (array coordinates up to about 35); Visium arrays need 128.
        The published code uses 65,536 rows per table.
    depth
        Number of Transformer blocks (published: 2).
    heads, dim_head
        Attention heads and their size (published: 8 x 64).
    mlp_dim
        Hidden size of the MLP; ``None`` means ``n_genes`` (published).
    dropout
        Dropout probability in the attention and MLP.
    sentence
        ``"batch"`` (published): all spots of the batch form one sequence, so every spot
        attends to every other spot of the batch, whatever section it comes from.
        ``"section"``: pass ``groups`` (section id per spot) and each spot attends only to
        spots of its own section (block-diagonal attention mask).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_pos: int = 64,
        depth: int = 2,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        sentence: str = "batch",
    ) -> None:
        super().__init__()
        self.n_genes = positive_int(n_genes, "n_genes")
        self.n_pos = positive_int(n_pos, "n_pos")
        depth = positive_int(depth, "depth")
        heads = positive_int(heads, "heads")
        dim_head = positive_int(dim_head, "dim_head")
        mlp_dim = self.n_genes if mlp_dim is None else positive_int(mlp_dim, "mlp_dim")
        dropout = check_dropout(dropout)
        if sentence not in ("batch", "section"):
            raise ValueError(f"sentence must be 'batch' or 'section', got {sentence!r}.")
        self.sentence = sentence
        self.x_embed = nn.Embedding(self.n_pos, self.n_genes)
        self.y_embed = nn.Embedding(self.n_pos, self.n_genes)
        self.blocks = nn.ModuleList(
            TransformerBlock(self.n_genes, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout)
            for _ in range(depth)
        )

    def _check_pos(self, pos: torch.Tensor, n_spots: int) -> torch.Tensor:
        if not isinstance(pos, torch.Tensor):
            pos = torch.as_tensor(np.asarray(pos))
        if pos.ndim != 2 or pos.shape != (n_spots, 2):
            raise ValueError(f"pos must have shape ({n_spots}, 2) (x, y per spot), got {tuple(pos.shape)}.")
        if pos.is_floating_point():
            if not torch.equal(pos, pos.round()):
                raise ValueError("pos must hold integer array coordinates; got non-integral floats.")
        elif pos.dtype == torch.bool or pos.is_complex():
            raise TypeError(f"pos must be an integer tensor, got {pos.dtype}.")
        pos = pos.long()
        if n_spots:
            low, high = int(pos.min()), int(pos.max())
            if low < 0 or high >= self.n_pos:
                raise ValueError(
                    f"Array positions must lie in [0, n_pos) = [0, {self.n_pos}); got values from "
                    f"{low} to {high}. Raise n_pos (to at least {high + 1}) when building the model, "
                    "or shift the coordinates so that they start at 0."
                )
        return pos

    def embed(self, expr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Return ``expr + x_embed(pos[:, 0]) + y_embed(pos[:, 1])`` after validating inputs."""
        if expr.ndim != 2 or expr.shape[1] != self.n_genes:
            raise ValueError(
                f"expr must have shape (B, n_genes={self.n_genes}), got {tuple(expr.shape)}."
            )
        if not expr.is_floating_point():
            raise TypeError(f"expr must be a float tensor, got {expr.dtype}.")
        pos = self._check_pos(pos, expr.shape[0]).to(expr.device)
        return expr + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])

    def attention_mask(self, groups: Any, n_spots: int, device: torch.device) -> torch.Tensor | None:
        """Block-diagonal boolean mask for ``sentence="section"``; ``None`` for ``"batch"``."""
        if self.sentence == "batch":
            return None
        if groups is None:
            raise ValueError(
                "sentence='section' needs groups: one section id (integer) per spot, shape (B,)."
            )
        if not isinstance(groups, torch.Tensor):
            groups = torch.as_tensor(np.asarray(groups))
        if groups.shape != (n_spots,):
            raise ValueError(f"groups must have shape ({n_spots},), got {tuple(groups.shape)}.")
        if groups.is_floating_point() or groups.is_complex():
            raise TypeError(
                f"groups must hold integer section ids, got {groups.dtype}; "
                "use e.g. adata.obs['section'].cat.codes."
            )
        groups = groups.to(device)
        return groups[:, None] == groups[None, :]

    def forward(self, expr: torch.Tensor, pos: torch.Tensor, groups: Any = None) -> torch.Tensor:
        """Encode a batch of spots.

        Parameters
        ----------
        expr
            ``(B, n_genes)`` float expression.
        pos
            ``(B, 2)`` integer array positions ``(x, y)`` in ``[0, n_pos)``.
        groups
            ``(B,)`` integer section ids; required for ``sentence="section"``, ignored for
            ``sentence="batch"`` (where the whole batch is one sentence by definition).

        Returns
        -------
        torch.Tensor
            ``(B, n_genes)``.
        """
        x = self.embed(expr, pos)
        mask = self.attention_mask(groups, x.shape[0], x.device)
        x = x.unsqueeze(0)  # the batch is one sentence: (1, B, n_genes)
        for block in self.blocks:
            x = block(x, mask)
        return x.squeeze(0)
