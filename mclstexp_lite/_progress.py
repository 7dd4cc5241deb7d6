"""Progress bars: one helper, so that every long step shows one bar when a person watches
and none when a notebook runs unattended (private: import :func:`progress_bar` from here).

- In a terminal: tqdm's text bar on stderr.
- In a Jupyter kernel: tqdm's widget bar when ``ipywidgets`` is installed, else the text
  bar. (``tqdm.auto`` would try the widget and warn ``TqdmWarning: IProgress not found``
  into the notebook's output when ``ipywidgets`` is missing; asking first avoids that.)
- Unattended (papermill, CI): set ``MCLSTEXP_PROGRESS=0``; every bar is off whatever a
  call asks. :func:`mclstexp_lite.tutorials.run` sets it for the notebooks it executes,
  since every redraw of a text bar becomes one more output cell line in the executed
  notebook.
"""

from __future__ import annotations

import importlib.util
import os
import sys

#: Environment variable that switches every progress bar off (``0``, ``false``, ``no``,
#: ``off``); unset or anything else leaves the ``progress=`` arguments in charge.
PROGRESS_ENV = "MCLSTEXP_PROGRESS"
_OFF = ("0", "false", "no", "off")


def progress_allowed() -> bool:
    """False when :data:`PROGRESS_ENV` switches progress bars off."""
    return os.environ.get(PROGRESS_ENV, "").strip().lower() not in _OFF


def _in_kernel() -> bool:
    ipython = sys.modules.get("IPython")  # never import IPython just to ask
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def tqdm_class():
    """The tqdm class for where this runs: the widget bar in a Jupyter kernel with
    ``ipywidgets`` installed, the text bar everywhere else (never ``tqdm.auto``'s warning)."""
    if _in_kernel() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), shown only when
    ``progress`` is true and :data:`PROGRESS_ENV` allows it; other keyword arguments go
    to tqdm (``desc``, ``total``, ``unit``, ``leave``...)."""
    disable = kwargs.pop("disable", False) or not progress or not progress_allowed()
    return tqdm_class()(iterable, disable=disable, **kwargs)
