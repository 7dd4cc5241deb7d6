"""Where an executed notebook spent its time: the total and the slowest code cells.

    python tools/cell_times.py outputs/tutorials/quick/executed/*.ipynb --top 4

Reads the per-cell durations that papermill writes into every executed notebook
(``cell.metadata.papermill.duration``, in seconds). The total is the sum over code cells,
so it leaves out starting the kernel and writing the notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cell_times(path: Path) -> list[tuple[float, int, str]]:
    """``(seconds, cell index, first line of its source)`` of every code cell."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable notebook ({err})") from None
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        seconds = (cell.get("metadata", {}).get("papermill", {}) or {}).get("duration")
        source = "".join(cell.get("source", ""))
        first = next((line for line in source.splitlines() if line.strip()), "")
        out.append((float(seconds or 0.0), i, first[:70]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path, help="executed .ipynb files")
    ap.add_argument("--top", type=int, default=4, help="slowest cells shown per notebook")
    args = ap.parse_args(argv)
    for path in args.notebooks:
        cells = cell_times(path)
        if not any(s for s, _, _ in cells):
            print(f"{path.name}: no papermill timings (not executed by papermill?)")
            continue
        print(f"{path.name}: {sum(s for s, _, _ in cells):.1f} s in {len(cells)} code cells")
        for seconds, i, first in sorted(cells, reverse=True)[:args.top]:
            print(f"  {seconds:6.1f} s  cell {i:>2}  {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
