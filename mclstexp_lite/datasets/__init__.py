"""Loaders that turn spatial-transcriptomics sections into AnnData.

Every loader returns one :class:`anndata.AnnData` per section with the layout described
in ``docs/data_model.md``: raw integer counts in ``X`` (sparse), genes as ``var_names``,
section/patient/array and pixel coordinates in ``obs``, ``obsm['spatial']`` and
``uns['spatial'][section]`` (a downscaled image plus scale factors) so that
``scanpy.pl.spatial`` and ``squidpy.pl.spatial_scatter`` draw the spots on the tissue, and
the path of the source image that patches are cut from.

- :func:`her2st` - HER2-positive breast cancer, legacy ST (Andersson et al. 2021), 36 sections
- :func:`cscc` - cutaneous squamous cell carcinoma, legacy ST (Ji et al. 2020), 12 sections
- :func:`visium` - a 10x Visium Space Ranger ``outs`` folder
- :func:`from_files` - your own section: count table + spot file + H&E image
- :func:`from_image` - an H&E image alone: virtual spots over its tissue, no counts
- :func:`from_anndata` - an AnnData in scanpy's spatial layout (sc.read_visium, squidpy)
- :func:`hest` - one HEST-1k sample (st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json)
- :func:`list_sections` - which sections exist and which are available locally

Modules, by source: ``legacy_st`` (her2st, cscc, from_files), ``visium_10x``,
``hest_1k``, ``image`` (from_image), ``scanpy_layout`` (from_anndata), ``catalog`` (list_sections, load, load_sections),
``geometry`` (array layouts, spot pitch, grid spacing, the spots-on-image checks) and ``_io`` (images,
tables, gzipped files). Every public name is importable from here.
"""

from __future__ import annotations

from ._io import HIRES_MAX_PX
from ._catalog import list_sections, load, load_sections
from ._geometry import (
    ARRAY_LAYOUTS,
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_DIAMETER_UM,
    MAX_STAINED_ELSEWHERE,
    MIN_STAIN_CONTRAST,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    array_layout,
    grid_spacing_px,
    spot_pitch_px,
)
from ._hest_1k import HEST_SPOT_LAYOUT, hest
from ._image import MAX_TISSUE_MM, MAX_VIRTUAL_SPOTS, MIN_VIRTUAL_SPOTS, from_image
from ._legacy_st import (
    CSCC_SECTIONS,
    HER2ST_SECTIONS,
    PAPER_HER2ST_SECTIONS,
    cscc,
    from_files,
    her2st,
)
from ._scanpy_layout import from_anndata
from ._visium_10x import visium

__all__ = [
    "her2st",
    "cscc",
    "visium",
    "from_files",
    "from_image",
    "from_anndata",
    "hest",
    "list_sections",
    "load",
    "load_sections",
    "spot_pitch_px",
    "grid_spacing_px",
    "array_layout",
    "ARRAY_LAYOUTS",
    "HER2ST_SECTIONS",
    "PAPER_HER2ST_SECTIONS",
    "CSCC_SECTIONS",
    "LEGACY_ST_PITCH_UM",
    "VISIUM_PITCH_UM",
    "LEGACY_ST_SPOT_DIAMETER_UM",
    "VISIUM_SPOT_DIAMETER_UM",
    "HIRES_MAX_PX",
    "MIN_VIRTUAL_SPOTS",
    "MAX_VIRTUAL_SPOTS",
    "MAX_TISSUE_MM",
    "HEST_SPOT_LAYOUT",
    "MIN_STAIN_CONTRAST",
    "MAX_STAINED_ELSEWHERE",
]
