"""Model size: our mclSTExp vs the published one, and the quick tutorial's wall time.

Parameters are counted on the models themselves (:func:`mclstexp_lite.models.count_parameters`):

- ours: ``MclSTExp(785, weights=None, n_pos=64)``, the paper's architecture (DenseNet-121,
  Transformer of depth 2 with 8 x 64 heads, 256-d projections) with position tables
  of 64 rows, which cover the HER2+ array coordinates (at most 33);
- published size: the same class with ``n_pos=65536``, the position-table size of the
  published code, whose two 65,536 x 785 tables hold 103M of its 116M parameters.
  The count is checked against :data:`mclstexp_lite.models.PUBLISHED_PARAMETERS`.

Sizes: the bytes of each model's ``state_dict`` tensors (parameters and batch-norm
buffers, float32), and for ours also the file sizes of ``torch.save(state_dict)`` and of
a full trainer checkpoint (model, Adam state after one step, config, history), written
to a temporary folder. The published model's checkpoint is not written (about 0.5 GB);
its state-dict bytes are summed instead.

The quick tutorial's wall time is read from the runner's index page
(``<out>/quick/index.html``, written by ``python -m mclstexp_lite.tutorials``) when it
exists; otherwise it is reported as not measured yet.

Run ``python benchmarks/bench_model_size.py [--quick]`` (``--quick`` is accepted for
symmetry; this benchmark is short either way).
"""

from __future__ import annotations

import argparse
import html
import re
import tempfile
from pathlib import Path

import _common as C


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def tutorial_time(out: Path) -> dict:
    """Per-notebook and total seconds from the runner's index page, if present."""
    index = out / "quick" / "index.html"
    if not index.is_file():
        return {"status": "not measured yet", "index": str(index)}
    text = index.read_text(encoding="utf-8")
    rows = re.findall(r"<tr><td><a href='html/([^']+)\.html'>[^<]*</a></td><td>(.*?)</td>"
                      r"<td>([\d.]+) s</td>", text)
    if not rows:
        return {"status": "index found but no notebook rows could be read", "index": str(index)}
    executed = re.search(r"Executed ([0-9-]+ [0-9:]+)", text)
    notebooks = {name: float(sec) for name, _, sec in rows}
    failed = [name for name, status, _ in rows if not html.unescape(status).startswith("ok")]
    return {"status": "measured" if not failed else "measured, with failed notebooks",
            "index": str(index), "executed": executed.group(1) if executed else None,
            "total_s": sum(notebooks.values()), "notebooks_s": notebooks, "failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="no effect (kept for a uniform CLI)")
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--tutorial-out", default=str(C.REPO / "outputs" / "tutorials"),
                    help="the tutorials runner's --out folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    C.header("bench_model_size", args)
    threads = C.set_threads(args.threads)
    load_before = C.load_average()

    import torch

    from mclstexp_lite import models as mdl
    from mclstexp_lite import train as tr

    torch.manual_seed(0)
    ours = mdl.MclSTExp(args.genes, weights=None, n_pos=64)
    ours_params = mdl.count_parameters(ours)
    ours_sd = state_dict_bytes(ours)
    with tempfile.TemporaryDirectory() as tmp:
        weights_file = Path(tmp) / "model.pt"
        torch.save(ours.state_dict(), weights_file)
        weights_file_bytes = weights_file.stat().st_size
        # a real trainer checkpoint after one step (Adam state populated)
        g = torch.Generator().manual_seed(0)
        n = 4
        data = tr.SpotData(
            patches=[torch.randint(0, 256, (n, 32, 32, 3), generator=g,
                                   dtype=torch.uint8).numpy()],
            expr=torch.rand((n, args.genes), generator=g).numpy(),
            pos=torch.randint(0, 30, (n, 2), generator=g).numpy(),
            groups=torch.zeros(n, dtype=torch.long).numpy(),
            sections=["synthetic"], genes=[f"g{i}" for i in range(args.genes)],
            obs_names=[f"s{i}" for i in range(n)])
        config = tr.TrainConfig.profile("paper", epochs=1, batch_size=n, image_size=32,
                                        device="cpu", model={"weights": None})
        tr.train(data, config, out_dir=Path(tmp) / "run", progress=False, model=ours)
        checkpoint_bytes = (Path(tmp) / "run" / tr.CHECKPOINT).stat().st_size

    table = ours.parameter_table()
    published = mdl.MclSTExp(args.genes, weights=None, n_pos=65_536)
    pub_params = mdl.count_parameters(published)
    pub_sd = state_dict_bytes(published)
    pub_table = published.parameter_table()
    del published
    reference_total = mdl.PUBLISHED_PARAMETERS["total"] if args.genes == 785 else None
    if reference_total is not None and pub_params != reference_total:
        raise SystemExit(f"n_pos=65536 gives {pub_params:,} parameters, but the published "
                         f"implementation has {reference_total:,}: the architectures differ")

    tut = tutorial_time(Path(args.tutorial_out))
    ratio_params = pub_params / ours_params
    ratio_bytes = pub_sd / ours_sd
    print("parameters per part (ours n_pos=64 | published size n_pos=65536):")
    for part in table.index:
        print(f"  {part:20s} {int(table.loc[part, 'parameters']):>12,} | "
              f"{int(pub_table.loc[part, 'parameters']):>12,}")
    print(f"ours: {ours_params:,} parameters, state dict {ours_sd / 2**20:.1f} MiB, "
          f"torch.save file {weights_file_bytes / 2**20:.1f} MiB, trainer checkpoint "
          f"(with Adam state) {checkpoint_bytes / 2**20:.1f} MiB")
    print(f"published size: {pub_params:,} parameters (matches PUBLISHED_PARAMETERS: "
          f"{reference_total is not None}), state dict {pub_sd / 2**20:.1f} MiB")
    print(f"ratio published/ours: {ratio_params:.1f}x parameters, {ratio_bytes:.1f}x "
          "state-dict bytes")
    if tut["status"].startswith("measured"):
        print(f"quick tutorials: {tut['total_s']:.0f} s in total ({tut['status']}; {tut['index']})")
    else:
        print(f"quick tutorials: {tut['status']} ({tut['index']} absent)")
    C.emit({
        "benchmark": "model_size", "genes": args.genes,
        "ours_parameters": ours_params, "ours_state_dict_bytes": ours_sd,
        "ours_weights_file_bytes": weights_file_bytes, "ours_checkpoint_bytes": checkpoint_bytes,
        "ours_parts": {k: int(v) for k, v in table["parameters"].items()},
        "published_parameters": pub_params, "published_state_dict_bytes": pub_sd,
        "published_parts": {k: int(v) for k, v in pub_table["parameters"].items()},
        "published_reference_total": reference_total,
        "ratio": ratio_params, "ratio_bytes": ratio_bytes, "quick_tutorials": tut,
        "load_before": load_before, "load_after": C.load_average(), "machine": C.machine(threads),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
