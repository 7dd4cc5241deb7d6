"""Shared test factories: a tiny training config, SYNTHETIC spot data, sections and files.

Plain functions (tests call them with arguments); ``conftest.py`` imports them and adds
the fixtures built on them. Everything made here is SYNTHETIC (seeded random numbers
and random-noise images, labelled so); it tests bookkeeping and plumbing, not biology.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from mclstexp_lite import train as tr

# ------------------------------------------------------------------------ TrainConfig
#: The tiny training every test starts from: 1 epoch, 32 px, batches of 8, ResNet-18
#: (random init), 16 positions. ``mode="frozen"`` (frozen encoder, trained heads) keeps
#: runs fast; tests that need the pixel path pass ``mode="full"``.
TINY = dict(epochs=1, batch_size=8, lr=1e-3, image_size=32, device="cpu", seed=0,
            mode="frozen", model={"image_arch": "resnet18", "weights": None, "n_pos": 16})

#: The training-loop tests (test_train, test_checkpoint): three epochs (so that a resume
#: after epoch 1 has work left), the pixel path, and dropout (so that the RNG state
#: saved in the checkpoint matters for an exact resume).
LOOP = dict(epochs=3, seed=3, mode="full",
            model={"image_arch": "resnet18", "weights": None, "n_pos": 16, "dropout": 0.1})


def tiny_config(*overrides: dict, **kw) -> tr.TrainConfig:
    """:data:`TINY`, updated by each dict in ``overrides`` and then by ``kw`` (a ``model``
    given replaces the whole model dict), validated."""
    base = dict(TINY)
    for o in overrides:
        base.update(o)
    base.update(kw)
    return tr.TrainConfig.from_dict(base).validate()


# -------------------------------------------------------------------------- SpotData
def synthetic_spotdata(*, n_per=(12, 10), genes=6, size=32, seed=0, patches=None,
                       expr=None) -> tr.SpotData:
    """SYNTHETIC SpotData: random uint8 patches and expression for small sections
    (two by default, ``n_per`` spots each), positions in 0..9."""
    rng = np.random.default_rng(seed)
    n = sum(n_per)
    if patches is None:
        patches = [rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8) for k in n_per]
    if expr is None:
        expr = rng.random((n, genes), dtype=np.float32)
    return tr.SpotData(patches=patches, expr=expr, pos=rng.integers(0, 10, (n, 2)),
                       groups=np.repeat(np.arange(len(n_per)), n_per),
                       sections=[f"S{i}" for i in range(len(n_per))],
                       genes=[f"g{i}" for i in range(genes)],
                       obs_names=[f"spot{i}" for i in range(n)])


# ------------------------------------------------------------- prepared sections (cv)
SPOTS = {"S1": 14, "S2": 12, "S3": 13}
PATIENTS = {"S1": "P", "S2": "P", "S3": "Q"}
GENES = 6

#: run_cv settings for the synthetic sections (64 um patches cached at 32 px).
RUN = dict(top_k=5, n_heg=3, progress=False, device="cpu", patch_um=64.0, patch_size=32)


def synthetic_sections(folder: Path, *, spots=SPOTS, patients=PATIENTS, genes=GENES, seed=0):
    """SYNTHETIC prepared sections: a random 240 px RGB image per section (1 um/px),
    random spot centres, random float32 "expression", obs/obsm/uns as in
    docs/data_model.md."""
    import anndata as ad
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in spots.items():
        img = rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(img).save(path)
        a = ad.AnnData(X=rng.random((n, genes), dtype=np.float32))
        a.var_names = [f"g{i}" for i in range(genes)]
        a.obs_names = [f"{name}_{i}" for i in range(n)]
        a.obs["section"] = pd.Categorical([name] * n)
        a.obs["patient"] = pd.Categorical([patients[name]] * n)
        a.obs["array_x"] = rng.integers(0, 12, n)
        a.obs["array_y"] = rng.integers(0, 12, n)
        a.obsm["spatial"] = rng.uniform(40, 200, (n, 2))
        a.uns["spatial"] = {name: {
            "images": {"hires": img[::4, ::4].copy()},
            "scalefactors": {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": 50.0},
            "metadata": {"source_image_path": str(path), "source_image_sha256": "",
                         "um_per_px": 1.0, "pixel_scale": 1.0, "spot_pitch_um": 200.0}}}
        out[name] = a
    return out


# ------------------------------------------------------- section files (legacy ST)
def write_section(folder: Path, *, counts=None, spots=None, seed: int = 0):
    """SYNTHETIC legacy-ST section: 12 spots on a 4 x 3 grid 100 px apart, 500 x 400 px JPEG.

    ``counts`` / ``spots`` are functions that alter the count table / spot file before
    they are written. Returns the three paths (counts, spots, image).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(1, 5), np.arange(1, 4))
    xs, ys = xs.ravel(), ys.ravel()
    spot = pd.DataFrame({"x": xs + 0.02, "y": ys - 0.03, "pixel_x": xs * 100.0,
                         "pixel_y": ys * 100.0, "selected": 1})
    cnt = pd.DataFrame(rng.poisson(3, size=(12, 6)) + 1, columns=[f"G{i}" for i in range(6)],
                       index=[f"{x}x{y}" for x, y in zip(xs, ys)])
    if counts is not None:
        cnt = counts(cnt)
    if spots is not None:
        spot = spots(spot)
    cnt.to_csv(folder / "counts.tsv", sep="\t")
    spot.to_csv(folder / "spots.tsv", sep="\t", index=False)
    image = folder / "he.jpg"
    Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)).save(image, quality=95)
    return folder / "counts.tsv", folder / "spots.tsv", image


def damage_jpeg(path: Path, how: str) -> None:
    """Truncate a JPEG to a third, or overwrite 512 bytes in the middle of its data.

    The overwrite uses 0xFF bytes, which cannot occur in a row in entropy-coded JPEG
    data, so the decoder notices. Most other overwrites (zeros, stuffed 0xFF 0x00 pairs,
    restart markers) decode silently into wrong pixels: only a checksum catches those,
    which is why the loaders verify every file against the manifest.
    """
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        mid = len(data) // 2
        data[mid : mid + 512] = b"\xff" * 512
        path.write_bytes(bytes(data))


# ----------------------------------------------------------------------- folders
def fresh_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def listing(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def state_equal(a: dict, b: dict) -> bool:
    """Two state dicts hold the same keys and bitwise-equal tensors."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
