"""H&E patches at a physical scale: crop geometry and extraction (the patch stage's API).

mclSTExp encodes the H&E image under every spot with a DenseNet-121 that takes a
224 x 224 px patch. The published code cuts those patches at the full resolution of the
HER2+ images, where 224 px covers about 155 um of tissue. Here patches are cut at a
fixed *physical* width (``patch_um``) instead, so that a reduced-resolution image (HER2+
A1) or a Visium image at another scale yields patches that show the same amount of
tissue; every crop is then resized to the model's input size.

This module is where users find the whole patch stage; it is written in three modules
and re-exported here:

- :func:`crop_size_px`, :func:`center_pixels`, :func:`extract_patches` (the private
  ``_patch_extract``): the crop geometry and the cutting;
- :func:`patch_cache` (:mod:`mclstexp_lite._patch_cache`): decodes each source image
  once, stores all patches of a section as one ``uint8`` array
  ``(n_spots, out_size, out_size, 3)`` in a ``.npy`` file and returns it memory-mapped;
- :func:`to_torch_batch`, :func:`gpu_augment` (:mod:`mclstexp_lite._augment`): a
  training batch is a gather of cached rows, augmented on the device.

Conventions
-----------
- Centres are ``(x, y)`` pixel coordinates of the source image (``adata.obsm['spatial']``),
  pixel ``(x, y)`` being the pixel whose centre lies at that coordinate. A centre is
  rounded half up to a pixel (:func:`center_pixels`); the crop is the
  ``crop_px x crop_px`` window whose pixel ``(crop_px // 2, crop_px // 2)`` is that pixel.
- Parts of a crop outside the image are filled with ``pad_value`` (white by default:
  the background of an H&E slide is white, so padding looks like empty glass).
- Resizing uses PIL's bilinear filter, which widens its support when shrinking (an
  area-like, antialiased reduction) and is a plain bilinear interpolation when enlarging.
- A TIFF is read region by region through :func:`mclstexp_lite.patches.open_slide`; a
  JPEG/PNG is decoded once, as a PIL image (see :func:`extract_patches`).
"""

from __future__ import annotations

from ._patch_extract import DEFAULT_PATCH_UM, center_pixels, crop_size_px, extract_patches
from ._augment import gpu_augment, to_torch_batch
from ._patch_cache import patch_cache
from ._slides import Slide, lay_spots, open_slide, tissue_mask
from ._stain import StainNormalizer, fit_on_sections, reference_patches, tissue_fraction

__all__ = [
    "DEFAULT_PATCH_UM",
    "center_pixels",
    "crop_size_px",
    "extract_patches",
    "gpu_augment",
    "patch_cache",
    "to_torch_batch",
    "Slide",
    "open_slide",
    "tissue_mask",
    "lay_spots",
    "StainNormalizer",
    "fit_on_sections",
    "reference_patches",
    "tissue_fraction",
]
