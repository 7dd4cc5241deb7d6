"""mclstexp_lite: a teaching reproduction of mclSTExp.

mclSTExp (Min, Shi et al., Briefings in Bioinformatics 2024) predicts spatial gene
expression from H&E histology by contrastive learning between spot expression (a
Transformer over spots with position embeddings) and image patches (DenseNet-121).

Submodules are imported lazily so that ``import mclstexp_lite`` stays cheap:

- ``datasets``  loaders that return AnnData (HER2+, cSCC, Visium, HEST-1k, your own
  section or image; a subpackage with one module per source)
- ``download``  the data manifest and the checksum-verifying downloader
- ``pp``        normalisation; ``prepare`` (re-exports the next two)
- ``panels``    gene panels: published, selected (HVG), saved and loaded
- ``gene_names``  matching a panel to a section's genes: ``subset_genes``, id maps
- ``slides``    reading H&E images region by region, tissue detection, virtual spots
- ``patches``   H&E patch extraction; the patch stage's API (re-exports the next two)
- ``patch_cache``  the on-disk patch cache (``patches.patch_cache``)
- ``augment``   training batches: gather cached patches, augment them on the device
- ``stain``     stain normalisation of patches (Macenko, Reinhard via torchstain)
- ``encoders``  the image-encoder registry: backbones, pretrained weights, preprocessing
- ``features``  frozen-encoder features, computed once and cached on disk
- ``image_encoder``, ``spot_encoder``  the two views' encoders (re-exported by ``models``)
- ``models``    the image and spot encoders, the mclSTExp model and the contrastive loss
- ``config``    ``TrainConfig``, the one profile table, the device setting
- ``spotdata``  ``SpotData``: the spots a model trains on or retrieves from
- ``checkpoint``  save / load / rebuild a model; the "same run?" rule
- ``train``     the contrastive trainer (re-exports the four above and ``embed``)
- ``embed``     image and spot embeddings of a trained model
- ``retrieval`` the retrieval kernels (top-k, distances, weights, weighted sums)
- ``tl``        retrieval prediction: ``retrieve``, ``predict_section``
- ``predict``   new slide in, expression out: saved predictors and the command line
- ``metrics``   PCC-ACG, PCC-HEG, MSE, MAE
- ``folds``     cross-validation folds (section / patient schemes)
- ``cv``, ``baselines``  cross-validation runs (re-exports ``folds`` and ``results``) and baselines
- ``run_folder`` a results folder: what config.json records, "same run?", preparing it
- ``results``   results tables: load, summarise and compare run_cv folders
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
    "panels",
    "gene_names",
    "slides",
    "patches",
    "patch_cache",
    "augment",
    "stain",
    "encoders",
    "features",
    "image_encoder",
    "spot_encoder",
    "models",
    "config",
    "spotdata",
    "checkpoint",
    "train",
    "embed",
    "retrieval",
    "tl",
    "predict",
    "metrics",
    "folds",
    "cv",
    "run_folder",
    "results",
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
