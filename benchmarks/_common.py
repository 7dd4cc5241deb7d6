"""Helpers shared by the benchmark scripts: load, timing, peak memory, result lines.

Every script prints a short human-readable summary and, as its last line, one JSON
object (``json.dumps(..., sort_keys=True)``) with the numbers, the machine load before
and after the run and the library versions, so a run can be pasted into
``docs/benchmarks.md`` or collected by a script.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (``uptime``); empty where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def machine(threads: int) -> dict:
    """What the numbers were measured on."""
    import numpy as np
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


_LIMITS = []


def set_threads(n: int) -> int:
    """Limit torch's intra-op threads and, through threadpoolctl when it is installed,
    the BLAS / OpenMP pools that NumPy uses, so that both sides of a comparison get the
    same number of threads."""
    import torch

    if n < 1:
        raise SystemExit(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - ships with scikit-learn
        return n
    _LIMITS.append(threadpool_limits(limits=n))  # kept alive: the limits last the run
    return n


def emit(result: dict) -> None:
    """Print the one-line JSON result (last line of the output)."""
    print(json.dumps(result, sort_keys=True, default=float), flush=True)


def need_data(sections) -> Path:
    """The data root holding the HER2+ files of ``sections``; exit with the fix if absent."""
    from mclstexp_lite import download as dl

    root = dl.data_dir()
    missing = []
    for s in sections:
        for row in dl.rows("her2st", s, kind=("counts", "spots", "image")):
            if not (root / row.path).is_file():
                missing.append(str(root / row.path))
    if missing:
        raise SystemExit(
            "this benchmark reads real HER2+ sections; missing under the data root "
            f"{root}:\n  " + "\n  ".join(missing[:6])
            + "\nSet MCLSTEXP_DATA to a folder that has them (e.g. ../shared/data).")
    return root


class Timer:
    """Accumulates the wall time (``seconds``) and the CPU time of this process, all
    threads (``cpu_seconds``), of ``with timer:`` blocks.

    On a shared machine the wall time depends on what else runs; the CPU time much less
    so (it still includes threads spinning at synchronisation points).
    """

    def __init__(self, sync=None):
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.count = 0
        self._sync = sync

    def __enter__(self):
        if self._sync:
            self._sync()
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._sync:
            self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.cpu_seconds += time.process_time() - self._c0
        self.count += 1
        return False


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def rss_mib() -> float | None:
    """Current resident set size in MiB (Linux /proc, else psutil, else None)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - optional
        return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_rss():
    """Measure the resident-set peak while the block runs.

    Yields a dict that is filled on exit with ``rss_before_mib``, ``peak_rss_mib`` and
    ``peak_delta_mib`` (peak minus the RSS at entry) and ``method``: ``"VmHWM"`` (the
    kernel's exact high-water mark, reset at entry through /proc/self/clear_refs) or
    ``"sampling"`` (a thread reading the RSS every 5 ms, which can miss short spikes).
    """
    out: dict = {}
    before = rss_mib()
    exact = _reset_hwm() and _status_kb("VmHWM") is not None
    samples = [before or 0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            value = rss_mib()
            if value is not None:
                samples.append(value)
            stop.wait(0.005)

    thread = None
    if not exact:
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    try:
        yield out
    finally:
        if thread is not None:
            stop.set()
            thread.join()
            peak = max(samples)
        else:
            peak = _status_kb("VmHWM") / 1024
        out.update(rss_before_mib=before, peak_rss_mib=peak,
                   peak_delta_mib=(peak - before) if before is not None else None,
                   method="VmHWM" if exact else "sampling")


def header(name: str, args) -> None:
    print(f"# {name}: {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    print(f"# load average before: {load_average()}", flush=True)
