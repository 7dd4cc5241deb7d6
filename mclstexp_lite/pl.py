"""Figures for the tutorials. Plotting only reads; nothing here computes results.

Every function returns the matplotlib ``Figure`` so a notebook can show it and save it
with :func:`mclstexp_lite.workflow.save_figure`. The rule :func:`metric_bars` applies
(methods compared on the held-out sections they share) is a computation, in
:func:`mclstexp_lite.cv.shared_sections`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._util import import_squidpy
from ._results import shared_sections as _shared_sections

__all__ = ["spots_on_tissue", "pred_vs_true", "prediction_maps", "patch_gallery",
           "loss_curve", "metric_bars", "neighbour_shares", "model_diagram", "he_grey",
           "ON_HE"]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _lib(adata) -> str:
    libs = list(adata.uns.get("spatial", {}))
    if len(libs) != 1:
        raise ValueError(f"expected one library in adata.uns['spatial'], found {libs}")
    return libs[0]


#: Class colours that stand out on H&E (no pinks or purples, which vanish on eosin and
#: haematoxylin), in the order classes get them; ``spots_on_tissue(..., palette=ON_HE)``.
ON_HE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#e6c200", "#17becf", "#d62728", "#111111",
         "#8c564b", "#bcbd22", "#7fdbff", "#a6d854", "#ffffff")


def he_grey(image, *, lighten: float = 0.45):
    """The H&E image as light grey (``uint8``, 3 channels): its luminance, pulled
    ``lighten`` of the way towards white, so coloured spots on it read whatever their
    colour map. Accepts ``uint8`` or float images in 0..1 (RGB or RGBA)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) or (H, W, 4) image, got shape {img.shape}")
    rgb = img[..., :3].astype(np.float32)
    if img.dtype.kind == "f":
        rgb = rgb * 255.0
    if not 0 <= lighten <= 1:
        raise ValueError(f"lighten must be between 0 and 1, got {lighten}")
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.clip((1 - lighten) * lum + lighten * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


#: Longest side, in pixels, of the H&E drawn under spots: a larger ``hires`` image is
#: shrunk (box filter) for drawing only. A panel is a few hundred pixels wide, and
#: drawing the 2,000 px image of a HER2+ section in every panel of a figure took most of
#: its time. Coordinates stay those of the ``hires`` image.
DISPLAY_MAX_PX = 1000


def _display_image(img, max_px: int = DISPLAY_MAX_PX):
    """``img`` (H, W, 3 or 4) shrunk so that its longer side is at most ``max_px`` (uint8
    or float in 0..1; other types are returned as they are)."""
    from PIL import Image

    img = np.asarray(img)
    h, w = img.shape[:2]
    if max(h, w) <= max_px or img.ndim != 3 or img.shape[2] not in (3, 4):
        return img
    if img.dtype.kind == "f":
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        return img
    f = max_px / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


def spots_on_tissue(adata, values=None, *, ax=None, title: str | None = None,
                    cmap: str = "viridis", size: float | None = None, vmin=None, vmax=None,
                    legend: bool = True, colorbar: bool = True, alpha: float = 0.9,
                    image: str | None = "he", palette=None):
    """Draw the section's H&E with spots coloured by ``values``.

    ``values``: None (spots outlined only), an ``obs`` column name, or an array with
    one value per spot (numbers: colour map, ``vmin``/``vmax`` default to the finite
    range; strings/categories: one colour per class, classes in sorted order, ``tab10``
    or ``tab20``, or ``palette``: a list of colours such as :data:`ON_HE`). Spots are
    drawn as circles of their true diameter
    (``spot_diameter_fullres``, default 10 px) times ``size`` (default 1) on the
    ``hires`` image of ``adata.uns['spatial']`` (the one library the loaders fill), by
    :func:`squidpy.pl.spatial_scatter`; the view is the spots' extent. ``adata`` is
    not changed.

    ``image``: ``"he"`` (the H&E in colour), ``"grey"`` (the H&E as light grey,
    :func:`he_grey`: every colour map and class colour reads on it, where dark or purple
    spots vanish on purple H&E) or ``None`` (no image). An image larger than
    :data:`DISPLAY_MAX_PX` is drawn shrunk, on the ``hires`` pixel grid.
    """
    import anndata as ad
    import pandas as pd
    from matplotlib.colors import ListedColormap

    sq = import_squidpy()

    plt = _plt()
    if image not in ("he", "grey", None):
        raise ValueError(f"image must be 'he', 'grey' or None, got {image!r}")
    library = _lib(adata)
    lib = adata.uns["spatial"][library]
    scale = lib["scalefactors"]["tissue_hires_scalef"]
    hires = lib.get("images", {}).get("hires") if image else None
    if hires is not None:
        hires_shape = np.shape(hires)[:2]
        hires = _display_image(hires)
        if image == "grey":
            hires = he_grey(hires)
    diameter = lib["scalefactors"].get("spot_diameter_fullres", 10)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    # what squidpy reads, beside the values to colour by; the caller's AnnData stays as is
    view = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()), obsm={"spatial": xy},
                      uns={"spatial": {library: {
                          "images": {},
                          "scalefactors": {**lib["scalefactors"],
                                           "spot_diameter_fullres": diameter}}}})
    style: dict = {}
    if isinstance(values, str):
        values = adata.obs[values].to_numpy()
    if values is None:
        style = dict(color=None)
    else:
        values = np.asarray(values)
        if values.shape != (adata.n_obs,):
            raise ValueError(f"`values` must have one value per spot ({adata.n_obs}), got "
                             f"shape {values.shape}")
        if values.dtype.kind in "biuf":
            view.obs["value"] = values.astype(float)
            style = dict(color="value", cmap=cmap, colorbar=False, linewidth=0,
                         vmin=np.nanmin(values) if vmin is None else vmin,
                         vmax=np.nanmax(values) if vmax is None else vmax)
        else:
            labels = values.astype(str)
            cats = sorted(set(labels))
            if palette is None:
                colors = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
                chosen = [colors(i % colors.N) for i in range(len(cats))]
            else:
                palette = list(palette)
                if len(palette) < len(cats):
                    raise ValueError(f"palette has {len(palette)} colours for {len(cats)} "
                                     "classes")
                chosen = palette[:len(cats)]
            view.obs["value"] = pd.Categorical(labels, categories=cats)
            style = dict(color="value", linewidth=0.4,
                         edgecolor="white" if image != "grey" else "0.2",
                         palette=ListedColormap(chosen),
                         legend_loc="right margin" if legend else None, legend_fontsize=7,
                         legend_fontweight="normal")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    if hires is not None:  # drawn here, on the hires image's pixel grid, however shrunk
        h, w = hires_shape
        ax.imshow(hires, extent=(-0.5, w - 0.5, h - 0.5, -0.5), zorder=0)
    sq.pl.spatial_scatter(view, shape="circle", library_id=library, scale_factor=scale,
                          img=False, size=size or 1.0, alpha=alpha, ax=ax,
                          title=title or "", **style)
    if colorbar and style.get("cmap") is not None:  # slimmer than squidpy's own
        plt.colorbar(ax.collections[-1], ax=ax, fraction=0.046, pad=0.02)
    if values is None:  # squidpy fills uncoloured spots with transparent na_color: outline them
        spots = ax.collections[-1]
        spots.set_alpha(np.ones(len(xy)))  # squidpy set an alpha per spot (all 0)
        spots.set_facecolor("none")
        spots.set_edgecolor("k")
        spots.set_linewidth(0.5)
    xy = xy * scale
    diam = diameter * scale * (size or 1.0)
    pad = 0.04 * max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1])) + diam
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(title or "", fontsize=10)
    return ax.figure


def pred_vs_true(pred, true, genes: Sequence[str], *, cmap: str = "magma",
                 image: str | None = "he"):
    """For each gene: true expression and prediction side by side on the H&E
    (``image``: as in :func:`spots_on_tissue`; ``"grey"`` keeps dark spots readable).

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
        spots_on_tissue(true, t, ax=axes[i, 0], title=f"{g}: measured", cmap=cmap, vmin=lo,
                        vmax=hi, image=image)
        r_text = ("r undefined: constant" if np.isnan(r) else f"r = {r:.2f}")
        spots_on_tissue(true, p, ax=axes[i, 1], title=f"{g}: predicted ({r_text})",
                        cmap=cmap, vmin=lo, vmax=hi, image=image)
    fig.tight_layout()
    return fig


def prediction_maps(pred, genes: Sequence[str] | None = None, *, n_genes: int = 4,
                    ncols: int = 4, cmap: str = "viridis", image: str | None = "grey"):
    """Predicted maps of ``genes`` on the slide's image, one panel per gene; default the
    ``n_genes`` genes whose prediction varies most across spots. ``pred`` is a
    prediction (:meth:`mclstexp_lite.predict.Predictor.predict`,
    :func:`mclstexp_lite.tl.predict_section`). Returns the figure.

    Drawn with :func:`spots_on_tissue` (squidpy): each gene's colour scale spans the
    2nd-98th percentile of its prediction; ``image="grey"`` (default) shows the H&E as
    light grey so the colour map reads on it (``"he"`` in colour, ``None`` without)."""
    plt = _plt()
    if genes is None:
        var = np.asarray(pred.X).var(axis=0)
        genes = [pred.var_names[i] for i in np.argsort(-var)[:n_genes]]
    genes = list(genes)
    if not genes:
        raise ValueError("no genes to draw: pass genes= or n_genes >= 1")
    unknown = [g for g in genes if g not in pred.var_names]
    if unknown:
        raise ValueError(f"genes {unknown} are not in the prediction's "
                         f"{pred.n_vars} genes (e.g. {list(pred.var_names[:5])})")
    lib = next(iter(pred.uns["spatial"]))
    ncols = max(1, min(int(ncols), len(genes)))
    nrows = int(np.ceil(len(genes) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.ravel()[len(genes):]:
        ax.axis("off")
    for ax, g in zip(axes.ravel(), genes):
        v = np.asarray(pred[:, g].X, dtype=float).ravel()
        lo, hi = np.percentile(v, [2, 98])
        spots_on_tissue(pred, v, ax=ax, title=g, cmap=cmap, vmin=lo, vmax=hi, image=image)
        ax.axis("off")
    fig.suptitle(f"predicted expression, {lib} ({pred.n_obs} spots)")
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


def metric_bars(per_fold, *, metrics: Sequence[str] = ("pcc_acg", "pcc_heg", "mse", "mae"),
                hue: str = "method", col: str = "scheme", clip: float = 3.0):
    """Mean over folds with one dot per fold, one panel per metric.

    Within each ``col`` group only the held-out sections that every method has are shown
    (:func:`mclstexp_lite.cv.shared_sections`); the figure says which were left out.

    ``clip``: an error panel (MSE, MAE) whose largest value is more than ``clip`` times
    the median of the bar heights is cut at that height, so that one method that
    extrapolates wildly does not flatten the others; each bar or dot beyond the cut is
    marked with its value at the top of the panel. ``None`` never cuts.
    """
    import seaborn as sns

    plt = _plt()
    per_fold, notes = _shared_sections(per_fold, hue=hue, col=col)
    metrics = [m for m in metrics if m in per_fold.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        sns.barplot(per_fold, x=col, y=m, hue=hue, ax=ax, errorbar=None, alpha=0.8)
        sns.stripplot(per_fold, x=col, y=m, hue=hue, ax=ax, dodge=True, palette="dark:k",
                      size=3, legend=False)
        ax.set_title(m)
        ax.set_xlabel("")
        if m in ("mse", "mae") and clip is not None:
            _clip_errors(ax, per_fold[m].to_numpy(dtype=float), clip)
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    if notes:
        fig.text(0.01, -0.02, "; ".join(notes), fontsize=8, va="top")
    return fig


def neighbour_shares(shares, *, ax=None, title: str | None = None):
    """Same patient or new patient? Where each held-out section's retrieved neighbours
    come from.

    ``shares``: rows of :func:`mclstexp_lite.cv.neighbour_shares` (one or several
    folders concatenated). Per held-out section (and scheme, and method when there are
    several), a bar for the share of its reference bank that belongs to other sections
    of its own patient, and one for the share of its retrieved top-k neighbours that do;
    a neighbour bar well above its bank bar means the retrieval recognises the patient.
    Under the patient scheme both are 0 by construction: the bank holds no spot of the
    held-out patient, as on a new patient's slide.
    """
    import pandas as pd

    plt = _plt()
    shares = shares.reset_index(drop=True)
    several = shares["method"].nunique() > 1
    # sections whose bank holds nothing of their patient: one row per scheme and method
    new = shares["bank_same_patient"] == 0
    records = shares[~new].to_dict("records")
    labels = [f"{r['test_section']} ({r['scheme']}" + (f", {r['method']}" if several else "")
              + ")" for r in records]
    for (scheme, method), grp in shares[new].groupby(["scheme", "method"], sort=False):
        records.append({**grp.iloc[0].to_dict(),
                        "test_section": ", ".join(grp["test_section"].astype(str))})
        labels.append(f"{len(grp)} section{'s' * (len(grp) > 1)} ({scheme}"
                      + (f", {method}" if several else "") + ")")
    rows = pd.DataFrame(records)
    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 1.7 + 0.42 * len(rows)))
    y = np.arange(len(rows))[::-1]
    h = 0.38
    ax.barh(y + h / 2, rows["bank_same_patient"], height=h, color="#c7d6e8",
            label="reference bank: share from the same patient")
    ax.barh(y - h / 2, rows["neighbours_same_patient"], height=h, color="#2b5d8a",
            label=f"top-{int(rows['top_k'].max())} neighbours: share from it")
    for yi, r in zip(y, rows.itertuples()):
        if r.bank_same_patient == 0:
            ax.text(0.01, yi, f"{r.test_section}: none of their patient in the bank, as for "
                    "a new patient", va="center", fontsize=7, color="0.35")
        else:
            ax.text(r.neighbours_same_patient + 0.01, yi - h / 2,
                    f"{r.neighbours_same_patient:.0%}", va="center", fontsize=7)
            ax.text(r.bank_same_patient + 0.01, yi + h / 2, f"{r.bank_same_patient:.0%}",
                    va="center", fontsize=7, color="0.35")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("share from other sections of the held-out section's patient")
    ax.set_title(title or "Same patient or new patient?", pad=28)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, ncol=2)
    ax.figure.tight_layout()
    return ax.figure


def _clip_errors(ax, values, clip: float) -> None:
    """Cut a non-negative error panel at ``clip`` x the median bar height, marking what
    lies beyond (bars with their mean, dots with their value) at the top."""
    from matplotlib.patches import Rectangle

    bars = [b for b in ax.patches if isinstance(b, Rectangle) and np.isfinite(b.get_height())
            and b.get_height() > 0 and b.get_width() > 0]
    heights = np.array([b.get_height() for b in bars])
    finite = values[np.isfinite(values)]
    if not len(heights) or not len(finite):
        return
    top = clip * float(np.median(heights))
    if finite.max() <= top:
        return
    ax.set_ylim(0, top)
    marked = []
    for b in bars:
        if b.get_height() > top:
            x = b.get_x() + b.get_width() / 2
            marked.append((b.get_x(), b.get_x() + b.get_width()))
            ax.annotate(f"{b.get_height():.2g}\u2191", (x, top), xytext=(0, -2),
                        textcoords="offset points", ha="center", va="top", fontsize=7,
                        color="#b00", fontweight="bold")
    for coll in ax.collections:  # the dots of the strip plot
        for x, y in np.asarray(coll.get_offsets(), dtype=float).reshape(-1, 2):
            if y > top and not any(x0 <= x <= x1 for x0, x1 in marked):
                ax.annotate(f"{y:.2g}\u2191", (x, top), xytext=(0, -2),
                            textcoords="offset points", ha="center", va="top", fontsize=7,
                            color="#b00")
    ax.set_title(f"{ax.get_title()} (cut at {top:.2g})")


def model_diagram(parameter_table=None, *, model=None):
    """A block diagram of mclSTExp: two encoders, two heads, one loss.

    ``model``: draw this :class:`~mclstexp_lite.models.MclSTExp` (its image encoder and
    feature size, its Transformer depth and projection size, whether the encoder is
    frozen, and its parameters per part, ``parameter_table(trainable=True)``). Without
    it, the paper's architecture is drawn: DenseNet-121, fine-tuned.
    ``parameter_table``: counts to print in the boxes (``parameters``, and ``trainable``
    when the table has it); default the model's.
    """
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch

    if model is not None:
        c = model.config
        encoder = f"{c['image_arch']} -> {model.image_encoder.out_dim}"
        frozen = bool(c.get("freeze_image"))
        depth = c["depth"] if c.get("spot_encoder", "transformer") == "transformer" else 0
        proj = c["proj_dim"]
        size = model.image_encoder.image_size
        if parameter_table is None:
            parameter_table = model.parameter_table(trainable=True)
    else:
        encoder, frozen, depth, proj, size = "DenseNet-121 -> 1024", False, 2, 256, 224

    fig, ax = plt.subplots(figsize=(9.4, 3.8))
    ax.set_xlim(-0.2, 10.0)
    ax.set_ylim(-0.1, 4.0)
    ax.axis("off")

    def n(row):
        if parameter_table is None or row not in parameter_table.index:
            return ""
        total = int(parameter_table.loc[row, "parameters"])
        text = f"\n{total:,} params"
        if "trainable" in parameter_table.columns:
            trainable = int(parameter_table.loc[row, "trainable"])
            if trainable == 0 and total:
                text += "\n(all frozen)"
            elif trainable < total:
                text += f"\n({trainable:,} trainable)"
        return text

    spot_box = (f"Transformer x{depth}\n(spots of a batch = a sentence)" if depth
                else "no spot Transformer\n(BLEEP-style)")
    image_box = f"image encoder, {'FROZEN' if frozen else 'fine-tuned'}\n{encoder}"
    boxes = [
        (0.0, 2.4, f"H&E patch\n{size} px, ~155 um", "#f4d6e4", "", False),
        (2.45, 2.4, image_box, "#e6e6e6" if frozen else "#d9e7f5", n("image_encoder"), frozen),
        (5.0, 2.4, f"projection head\n-> {proj}", "#e3f1dc", n("image_projection"), False),
        (0.0, 0.3, "spot expression\n+ x/y position embeddings", "#f9ecd2",
         n("position_embeddings"), False),
        (2.45, 0.3, spot_box, "#d9e7f5", n("spot_encoder"), False),
        (5.0, 0.3, f"projection head\n-> {proj}", "#e3f1dc", n("spot_projection"), False),
        (7.6, 1.35, "symmetric CLIP loss\nspot . image / T", "#eeeeee", "", False),
    ]
    for x, y, text, color, extra, hatch in boxes:
        ax.add_patch(FancyBboxPatch((x, y), 2.1, 1.3, boxstyle="round,pad=0.05", fc=color,
                                    ec="0.3", hatch="//" if hatch else None, lw=1.0))
        ax.text(x + 1.05, y + 0.65, text + extra, ha="center", va="center", fontsize=7.5,
                bbox=dict(fc=color, ec="none", pad=0.5) if hatch else None)
    for (x0, y0), (x1, y1) in [((2.15, 3.05), (2.45, 3.05)), ((4.6, 3.05), (5.0, 3.05)),
                               ((2.15, 0.95), (2.45, 0.95)), ((4.6, 0.95), (5.0, 0.95)),
                               ((7.15, 3.05), (7.6, 2.35)), ((7.15, 0.95), (7.6, 1.65))]:
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2))
    fig.tight_layout()
    return fig
