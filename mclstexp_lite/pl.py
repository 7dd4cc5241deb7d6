"""Figures for the tutorials. Plotting only reads; nothing here computes results.

Every function returns the matplotlib ``Figure`` so a notebook can show it and save it
with :func:`mclstexp_lite.workflow.save_figure`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _lib(adata):
    libs = list(adata.uns.get("spatial", {}))
    if len(libs) != 1:
        raise ValueError(f"expected one library in adata.uns['spatial'], found {libs}")
    return adata.uns["spatial"][libs[0]]


def spots_on_tissue(adata, values=None, *, ax=None, title: str | None = None,
                    cmap: str = "viridis", size: float | None = None, vmin=None, vmax=None,
                    legend: bool = True, colorbar: bool = True, alpha: float = 0.9):
    """Draw the section's H&E with spots coloured by ``values``.

    ``values``: None (spots outlined only), an ``obs`` column name, or an array with
    one value per spot (numbers: colour map; strings/categories: one colour per class).
    Spots are drawn as circles of their true diameter (``spot_diameter_fullres``) times
    ``size`` (default 1).
    """
    plt = _plt()
    lib = _lib(adata)
    img = lib["images"].get("hires")
    scale = lib["scalefactors"]["tissue_hires_scalef"]
    xy = np.asarray(adata.obsm["spatial"]) * scale
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    if img is not None:
        ax.imshow(img)
    from matplotlib.collections import EllipseCollection

    diam = lib["scalefactors"].get("spot_diameter_fullres", 10) * scale * (size or 1.0)

    def circles(sel, **kw):
        n = int(sel.sum())
        coll = EllipseCollection(np.full(n, diam), np.full(n, diam), np.zeros(n), units="xy",
                                 offsets=xy[sel], offset_transform=ax.transData, **kw)
        ax.add_collection(coll)
        return coll

    if isinstance(values, str):
        values = adata.obs[values].to_numpy()
    everything = np.ones(len(xy), dtype=bool)
    if values is None:
        circles(everything, facecolors="none", edgecolors="k", linewidths=0.5)
    else:
        values = np.asarray(values)
        if values.dtype.kind in "biuf":
            coll = circles(everything, cmap=cmap, alpha=alpha, linewidths=0)
            coll.set_array(values.astype(float))
            coll.set_clim(vmin if vmin is not None else np.nanmin(values),
                          vmax if vmax is not None else np.nanmax(values))
            if colorbar:
                plt.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
        else:
            from matplotlib.lines import Line2D

            cats = sorted({str(v) for v in values})
            colors = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
            handles = []
            for i, c in enumerate(cats):
                col = colors(i % colors.N)
                circles(values.astype(str) == c, facecolors=[col], alpha=alpha, linewidths=0.4,
                        edgecolors="white")
                handles.append(Line2D([], [], marker="o", ls="", color=col, label=c))
            if legend:
                ax.legend(handles=handles, fontsize=7, loc="upper left",
                          bbox_to_anchor=(1.0, 1.0), frameon=False)
    pad = 0.04 * max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1])) + diam
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return ax.figure


def pred_vs_true(pred, true, genes: Sequence[str], *, cmap: str = "magma"):
    """For each gene: true expression and prediction side by side on the H&E.

    Both panels of a gene share one colour scale (1st-99th percentile of the truth), and
    the title gives the Pearson r over the section's spots ("r undefined" when the
    prediction or the truth is the same at every spot: nothing varies to correlate).
    """
    from scipy import sparse, stats

    plt = _plt()
    genes = [g for g in genes if g in list(true.var_names)]
    if not genes:
        raise ValueError("none of the requested genes is in the panel")
    fig, axes = plt.subplots(len(genes), 2, figsize=(8, 3.6 * len(genes)), squeeze=False)
    for i, g in enumerate(genes):
        t = true[:, g].X
        p = pred[:, g].X
        t = np.asarray(t.toarray() if sparse.issparse(t) else t).ravel()
        p = np.asarray(p.toarray() if sparse.issparse(p) else p).ravel()
        lo, hi = np.percentile(t, [1, 99])
        r = stats.pearsonr(p, t)[0] if np.ptp(p) > 0 and np.ptp(t) > 0 else float("nan")
        spots_on_tissue(true, t, ax=axes[i, 0], title=f"{g}: measured", cmap=cmap, vmin=lo, vmax=hi)
        r_text = ("r undefined: constant" if np.isnan(r) else f"r = {r:.2f}")
        spots_on_tissue(true, p, ax=axes[i, 1], title=f"{g}: predicted ({r_text})",
                        cmap=cmap, vmin=lo, vmax=hi)
    fig.tight_layout()
    return fig


def patch_gallery(patches: np.ndarray, titles: Sequence[str] | None = None, *, ncols: int = 6):
    """A grid of uint8 patches ``(n, H, W, 3)`` with optional titles."""
    plt = _plt()
    n = len(patches)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.4 * nrows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(patches[k])
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    fig.tight_layout()
    return fig


def loss_curve(history: Sequence[dict], *, title: str = "training loss"):
    """Per-epoch mean contrastive loss, with the chance level ln(batch) if known."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("symmetric cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def shared_sections(per_fold, *, hue: str = "method", col: str = "scheme",
                    with_missing: bool = False):
    """The rows of ``per_fold`` whose held-out section every ``hue`` group of their ``col``
    group has, and a note per ``col`` group that lost rows (empty when none did).

    Methods scored on different held-out sections cannot be averaged side by side. The
    rule is shared by :func:`metric_bars` and :func:`mclstexp_lite.cv.summarize_results`
    (so also :func:`mclstexp_lite.cv.compare` and the results tables).

    With ``with_missing=True`` a third value is returned: ``{col value: {section: [hue
    groups without it]}}`` for every section left out.
    """
    key = "test_section" if "test_section" in per_fold.columns else "fold"
    parts, notes, missing = [], [], {}
    for c, part in per_fold.groupby(col, sort=False):
        groups = {h: set(g[key]) for h, g in part.groupby(hue, sort=False)}
        shared = set.intersection(*groups.values()) if groups else set()
        kept = part[part[key].isin(shared)]
        if len(kept) < len(part):
            dropped = sorted(set(part[key]) - shared)
            missing[c] = {s: [str(h) for h, have in groups.items() if s not in have]
                          for s in dropped}
            lacking = "; ".join(f"{s}: {', '.join(missing[c][s])}" for s in dropped)
            notes.append(f"{c}: compared on the {len(shared)} held-out section(s) every method "
                         f"has; left out {dropped} (not scored for {lacking})")
        parts.append(kept)
    import pandas as pd

    kept = pd.concat(parts) if parts else per_fold.iloc[:0]
    return (kept, notes, missing) if with_missing else (kept, notes)


def metric_bars(per_fold, *, metrics: Sequence[str] = ("pcc_acg", "pcc_heg", "mse", "mae"),
                hue: str = "method", col: str = "scheme"):
    """Mean over folds with one dot per fold, one panel per metric.

    Within each ``col`` group only the held-out sections that every method has are shown
    (:func:`shared_sections`); the figure says which were left out.
    """
    import seaborn as sns

    plt = _plt()
    per_fold, notes = shared_sections(per_fold, hue=hue, col=col)
    metrics = [m for m in metrics if m in per_fold.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        sns.barplot(per_fold, x=col, y=m, hue=hue, ax=ax, errorbar=None, alpha=0.8)
        sns.stripplot(per_fold, x=col, y=m, hue=hue, ax=ax, dodge=True, color="k", size=3,
                      legend=False)
        ax.set_title(m)
        ax.set_xlabel("")
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    if notes:
        fig.text(0.01, -0.02, "; ".join(notes), fontsize=8, va="top")
    return fig


def model_diagram(parameter_table=None):
    """A block diagram of mclSTExp: two encoders, two heads, one loss."""
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4)
    ax.axis("off")

    def n(row):
        if parameter_table is None or row not in parameter_table.index:
            return ""
        return f"\n{int(parameter_table.loc[row, 'parameters']):,} params"

    boxes = [
        (0.0, 2.4, "H&E patch\n224 px, ~155 um", "#f4d6e4", ""),
        (2.45, 2.4, "image encoder\nDenseNet-121 -> 1024", "#d9e7f5", n("image_encoder")),
        (5.0, 2.4, "projection head\n-> 256", "#e3f1dc", n("image_projection")),
        (0.0, 0.3, "spot expression\n+ x/y position embeddings", "#f9ecd2", n("position_embeddings")),
        (2.45, 0.3, "Transformer x2\n(spots of a batch = a sentence)", "#d9e7f5", n("spot_encoder")),
        (5.0, 0.3, "projection head\n-> 256", "#e3f1dc", n("spot_projection")),
        (7.6, 1.35, "symmetric CLIP loss\nspot . image / T", "#eeeeee", ""),
    ]
    for x, y, text, color, extra in boxes:
        ax.add_patch(FancyBboxPatch((x, y), 2.1, 1.2, boxstyle="round,pad=0.05", fc=color,
                                    ec="0.3"))
        ax.text(x + 1.05, y + 0.6, text + extra, ha="center", va="center", fontsize=8)
    for (x0, y0), (x1, y1) in [((2.15, 3.0), (2.45, 3.0)), ((4.6, 3.0), (5.0, 3.0)),
                               ((2.15, 0.9), (2.45, 0.9)), ((4.6, 0.9), (5.0, 0.9)),
                               ((7.1, 3.0), (7.6, 2.3)), ((7.1, 0.9), (7.6, 1.6))]:
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2))
    fig.tight_layout()
    return fig
