"""Where and at which precision to compute: the one device rule and the autocast dtype.

Private; public as :func:`mclstexp_lite.train.resolve_device` and
:func:`mclstexp_lite.train.autocast_dtype`. A module of its
own so that the feature cache (:mod:`mclstexp_lite.features`), which the training config
reads, can use them without importing the config.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "autocast_dtype"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks cuda > mps > cpu; an unavailable explicit device is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device name (try 'auto', 'cpu', "
                         "'cuda', 'cuda:1', 'mps')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here; use "
                         "device='auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for but MPS is not available; use 'auto'")
    return dev


def autocast_dtype(amp: str, device: torch.device):
    """Autocast dtype for an ``amp`` setting (``"auto"``, ``"bf16"``, ``"off"``) on
    ``device``: ``torch.bfloat16``, or ``None`` for full precision."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
