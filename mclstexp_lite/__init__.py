"""mclstexp_lite: a teaching reproduction of mclSTExp.

mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024) predicts spatial gene
expression from H&E histology by contrastive learning between spot expression (a
Transformer over spots with position embeddings) and image patches (DenseNet-121).

The public namespaces (imported lazily, so ``import mclstexp_lite`` stays cheap) are the
only public addresses; the files behind them are private (``_name.py``) and free to move:

- ``datasets``  loaders that return AnnData (HER2+, cSCC, Visium, HEST-1k, AnnData from
  scanpy/squidpy, your own section or an image alone)
- ``download``  the data manifest and the checksum-verifying downloader
- ``pp``        normalisation, ``prepare``, gene panels and gene-name matching
- ``patches``   reading H&E slides, tissue detection, patches at a physical scale, the
  patch cache, stain normalisation, training-time augmentation
- ``features``  the image-encoder registry and frozen features cached on disk
- ``models``    the image and spot encoders, the mclSTExp model, the contrastive loss
- ``train``     ``TrainConfig`` and its profiles, ``SpotData``, the trainer, checkpoints,
  embeddings
- ``tl``        retrieval prediction (``predict_section``, ``retrieve``)
- ``predict``   new slide in, expression out: saved predictors and the command line
- ``metrics``   PCC-ACG, PCC-HEG, MSE, MAE
- ``cv``        cross-validation folds and runs, baselines, results tables
- ``pl``        figures (plotting only reads)
- ``interpret`` gene rankings, clustering against pathologist labels
- ``workflow``  the notebooks' glue (parameter checks, cached steps, output paths)
- ``tutorials`` the papermill runner (``make tutorials``), the book and JupyterLab
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "datasets",
    "download",
    "pp",
    "patches",
    "features",
    "models",
    "train",
    "tl",
    "predict",
    "metrics",
    "cv",
    "pl",
    "interpret",
    "workflow",
    "tutorials",
)

# modules that had a public name the README used; they warn once and point to the new home
_MOVED = {"stain": ("_stain", "mclstexp_lite.patches"),
          "encoders": ("_encoders", "mclstexp_lite.features")}
_WARNED: set = set()

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _MOVED:
        private, home = _MOVED[name]
        if name not in _WARNED:
            _WARNED.add(name)
            import warnings

            warnings.warn(f"mclstexp_lite.{name} is deprecated: its public names live in "
                          f"{home} now (e.g. {home.replace('mclstexp_lite', 'ml')}.<name>).",
                          FutureWarning, stacklevel=2)
        return importlib.import_module(f"{__name__}.{private}")
    raise AttributeError(f"module 'mclstexp_lite' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
