"""mclstexp_lite: a teaching reproduction of mclSTExp.

mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024) predicts spatial gene
expression from H&E histology by contrastive learning between spot expression (a
Transformer over spots with position embeddings) and image patches (DenseNet-121).

Submodules are imported lazily so that ``import mclstexp_lite`` stays cheap:

- ``datasets``  loaders that return AnnData (HER2+, cSCC, Visium, your own section)
- ``download``  the data manifest and the checksum-verifying downloader
- ``pp``        normalisation and gene panels
- ``slides``    reading H&E images region by region, tissue detection, virtual spots
- ``patches``   H&E patch extraction and the on-disk patch cache
- ``stain``     stain normalisation of patches (Macenko, Reinhard via torchstain)
- ``encoders``  the image-encoder registry: backbones, pretrained weights, preprocessing
- ``features``  frozen-encoder features, computed once and cached on disk
- ``models``    the image and spot encoders, the mclSTExp model and the contrastive loss
- ``train``     the contrastive trainer
- ``tl``        retrieval prediction
- ``predict``   new slide in, expression out: saved predictors and the command line
- ``metrics``   PCC-ACG, PCC-HEG, MSE, MAE
- ``cv``, ``baselines``  cross-validation (section / patient schemes) and baselines
- ``interpret`` gene rankings, clustering against pathologist labels
- ``pl``        figures; ``workflow`` glue for the notebooks; ``tutorials`` the runner
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "datasets",
    "download",
    "pp",
    "slides",
    "patches",
    "stain",
    "encoders",
    "features",
    "models",
    "train",
    "tl",
    "predict",
    "metrics",
    "cv",
    "baselines",
    "pl",
    "interpret",
    "workflow",
    "tutorials",
)

__all__ = list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mclstexp_lite' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
