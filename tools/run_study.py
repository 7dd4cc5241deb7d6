#!/usr/bin/env python
"""What helps across patients: the input options of TrainConfig, alone and combined,
against today's quick profile and the linear probe on the same features.

For every variant (a name of :data:`VARIANTS`, or names joined by ``+`` for a
combination) and every fold scheme, :func:`mclstexp_lite.cv.run_cv` runs mclSTExp with
``TrainConfig.profile(--profile, **overrides)`` and, when the variant changes the image
features or the expression targets, the linear probe (``ridge_features``) with the same
config, i.e. on the same features and targets. Today's profile (variant ``quick``) also
runs ``ridge_features`` and ``ridge_color``. Results folders:
``<out>/<scheme>/<method>`` for ``quick`` (the layout of tools/run_results.py) and
``<out>/<scheme>/<method>+<variant>`` for the others; a rerun reads finished folders back
and resumes unfinished ones.

Then, per scheme, on the saved predictions (:func:`mclstexp_lite.metrics.paired_bootstrap`,
1,000 replicates, seed 0, 95 % percentile intervals, resampling held-out sections and
resampling spots), every mclSTExp variant minus: today's quick mclSTExp, the probe on the
same features (``ridge_features`` of the variant's config), ``ridge_features`` and
``ridge_color`` of today. Writes ``<out>/study.md`` (tables), ``study.csv`` (means),
``study_differences.csv``, ``study_per_section.csv``, ``study_neighbours.csv`` and
``study_timings.json``.

The rule for adopting an option into ``quick`` (fixed before the study ran, applied by
:func:`verdict`): under the patient scheme its PCC-ACG and PCC-HEG minus today's quick are
both positive, at least one with its section-resampling interval above zero and neither
with it below zero; under the section scheme neither interval lies below zero. (The quick
fold's training time, at most 20 s, is checked apart from the study, on an idle machine:
the fold times recorded here depend on what else the machine runs.)

Example (the run in docs/results.md, "What helps across patients")::

    MCLSTEXP_DATA=../shared/data MCLSTEXP_OFFLINE=1 .venv/bin/python tools/run_study.py \\
        --variants quick norm center context wide views4 --out outputs/study
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

#: The options measured, each alone (TrainConfig overrides of the profile). The values
#: were fixed from the geometry before any run: 300 um takes a legacy-ST spot's 8
#: neighbours (200 um pitch); a crop 3 times as wide (about 460 um) reaches their centres.
VARIANTS = {
    "quick": {},
    "norm": {"feature_norm": "section"},
    "center": {"expr_norm": "center"},
    "context": {"context": "mean", "context_um": 300.0},
    "wide": {"wide_view": 3.0},
    "views4": {"feature_views": 4, "epochs": 40},
}
#: Options that change what the linear probe reads (features or targets): a variant with
#: any of them also runs ridge_features with its config.
PROBE_OPTIONS = ("feature_norm", "expr_norm", "context", "wide_view")
BOOT = dict(n_boot=1000, level=0.95, seed=0)
METRICS = ("pcc_acg", "pcc_heg", "mse", "mae")
LABELS = {"pcc_acg": "PCC-ACG", "pcc_heg": "PCC-HEG", "mse": "MSE", "mae": "MAE"}


def overrides(variant: str) -> dict:
    """TrainConfig overrides of a variant (``a+b``: the union; a conflict is an error)."""
    out: dict = {}
    for part in variant.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant part {part!r}; known: {', '.join(VARIANTS)}")
        for k, v in VARIANTS[part].items():
            if k in out and out[k] != v:
                raise SystemExit(f"variant {variant}: {k} set twice ({out[k]!r}, {v!r})")
            out[k] = v
    return out


def folder(out: Path, scheme: str, method: str, variant: str) -> Path:
    return out / scheme / (method if variant == "quick" else f"{method}+{variant}")


def runs_of(variant: str) -> list[str]:
    ov = overrides(variant)
    methods = ["mclstexp"]
    if variant == "quick":
        methods += ["ridge_features", "ridge_color"]
    elif any(ov.get(k) is not None for k in PROBE_OPTIONS):
        methods.append("ridge_features")
    return methods


def probe_for(variant: str) -> str:
    """The variant whose ridge_features reads the same features and targets."""
    ov = overrides(variant)
    return variant if any(ov.get(k) is not None for k in PROBE_OPTIONS) else "quick"


def fold_seconds(d: Path) -> list[float]:
    """Training seconds of each fold of a retrieval run (sum of its epoch times)."""
    out = []
    for f in sorted(d.glob("*/metrics.json")):
        rec = json.loads(f.read_text())
        if rec.get("history"):
            out.append(float(sum(h["seconds"] for h in rec["history"])))
    return out


def verdict(diff_quick: dict, sec_quick: dict) -> str:
    """The adoption rule of the module docstring. ``diff_quick[m]`` and ``sec_quick[m]``:
    ``(diff, low, high)`` of the section-resampling interval, patient and section scheme."""
    import math

    pcc = ("pcc_acg", "pcc_heg")
    if any(m not in diff_quick or math.isnan(diff_quick[m][0]) for m in pcc):
        return "not measured"
    reasons = []
    if not all(diff_quick[m][0] > 0 for m in pcc):
        reasons.append("not better on both PCCs across patients")
    if not any(diff_quick[m][1] > 0 for m in pcc):
        reasons.append("no patient-scheme interval above zero")
    if any(diff_quick[m][2] < 0 for m in pcc):
        reasons.append("a patient-scheme interval below zero")
    if any(m in sec_quick and sec_quick[m][2] < 0 for m in pcc):
        reasons.append("worse in the section scheme beyond its interval")
    return "adopt" if not reasons else "no: " + "; ".join(reasons)


def run_folders(args, variants, adatas, out: Path, log) -> None:
    """Run (or read back) every variant's cross-validation folders; record the times of
    the runs that ran in study_timings.json."""
    import run_results as rr
    from mclstexp_lite import cv
    from mclstexp_lite._util import atomic_write_json
    from mclstexp_lite.train import TrainConfig

    timings_path = out / "study_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for v in variants:
        config = TrainConfig.profile(args.profile, device=args.device, **overrides(v))
        for scheme in args.schemes:
            for method in runs_of(v):
                d = folder(out, scheme, method, v)
                if args.no_run:
                    continue
                t0 = time.time()
                before = rr.metrics_stamp(d)
                cv.run_cv(adatas, scheme=scheme, method=method, config=config, out_dir=d,
                          top_k=args.top_k, progress=False, device=args.device)
                if rr.metrics_stamp(d) == before:  # complete already: read back, not run again
                    log.info("%s already complete; read it back", d)
                    continue
                timings[f"{scheme}/{d.name}"] = round(time.time() - t0, 1)
                log.info("%s done in %.0f s", d, time.time() - t0)
                atomic_write_json(timings_path, timings)



def collect(args, variants, adatas, out: Path, log):
    """One summary row per finished folder (means, sds, training time, the share of
    neighbours from patient C's other sections), the per-section rows, the neighbour
    shares and the predictions."""
    import numpy as np

    import run_results as rr
    from mclstexp_lite import cv

    rows, per_section, shares = [], [], []
    preds: dict = {}
    for v in variants:
        for scheme in args.schemes:
            for method in runs_of(v):
                d = folder(out, scheme, method, v)
                if not (d / "metrics.csv").exists():
                    log.warning("%s has no results; left out", d)
                    continue
                df = cv.load_results(d)
                if len(df) != len(args.sections):
                    log.warning("%s scored %d of %d sections; left out", d, len(df),
                                len(args.sections))
                    continue
                secs = fold_seconds(d)
                rec = {"scheme": scheme, "method": method, "variant": v,
                       "n_sections": len(df),
                       "train_s_mean": float(np.mean(secs)) if secs else np.nan,
                       "train_s_max": float(np.max(secs)) if secs else np.nan}
                for m in METRICS:
                    rec[f"{m}_mean"] = float(df[m].mean())
                    rec[f"{m}_sd"] = float(df[m].std(ddof=1))
                if method == "mclstexp":
                    nb = cv.neighbour_shares(d).assign(variant=v)
                    shares.append(nb)
                    c = nb[nb["patient"] == "C"]
                    rec["c_neighbours_same_patient"] = float(c["neighbours_same_patient"].mean())
                rows.append(rec)
                per_section.append(df.assign(variant=v))
                preds[(scheme, method, v)] = rr.load_predictions(d, adatas)
    return rows, per_section, shares, preds


def differences(args, variants, preds, truth, log) -> list:
    """Paired bootstrap differences of each variant's mclSTExp against the quick one and
    the probes, per held-out section and per spot."""
    from mclstexp_lite import metrics

    diffs = []
    for scheme in args.schemes:
        for v in variants:
            a_key = (scheme, "mclstexp", v)
            if a_key not in preds:
                continue
            against = [("quick mclstexp", (scheme, "mclstexp", "quick")),
                       ("probe, same features", (scheme, "ridge_features", probe_for(v))),
                       ("ridge_features", (scheme, "ridge_features", "quick")),
                       ("ridge_color", (scheme, "ridge_color", "quick"))]
            for label, b_key in against:
                if b_key == a_key or b_key not in preds:
                    continue
                if label == "ridge_features" and probe_for(v) == "quick":
                    continue  # the same comparison as "probe, same features"
                for unit in ("section", "spot"):
                    t0 = time.time()
                    res = metrics.paired_bootstrap(preds[a_key], preds[b_key], truth=
                                                   {s: truth[s] for s in preds[a_key]},
                                                   unit=unit, **BOOT)
                    for r in res.to_dict("records"):
                        diffs.append({"scheme": scheme, "variant": v, "against": label,
                                      "against_run": f"{b_key[1]}+{b_key[2]}", **r})
                    log.info("bootstrap %s %s - %s (%s): %.1f s", scheme, v, label, unit,
                             time.time() - t0)
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4", "C5", "C6", "A1"])
    ap.add_argument("--schemes", nargs="+", default=["patient", "section"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="variant names of VARIANTS; join names with + for a combination")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--out", default="outputs/study")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-run", action="store_true", help="only tabulate finished folders")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("run_study")

    import pandas as pd
    import torch

    import run_results as rr
    from mclstexp_lite import datasets, pp
    from mclstexp_lite._util import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = list(dict.fromkeys(["quick"] + args.variants))
    for v in variants:
        overrides(v)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    genes = pp.published_panel("her2st")
    adatas = {s: pp.prepare(datasets.her2st(s, progress=False), genes) for s in args.sections}

    run_folders(args, variants, adatas, out, log)
    rows, per_section, shares, preds = collect(args, variants, adatas, out, log)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "study.csv", table.to_csv(index=False))
    per = pd.concat(per_section, ignore_index=True)
    atomic_write_text(out / "study_per_section.csv", per.to_csv(index=False))
    nb_all = pd.concat(shares, ignore_index=True) if shares else pd.DataFrame()
    atomic_write_text(out / "study_neighbours.csv", nb_all.to_csv(index=False))

    truth = {s: rr._dense_f32(a.X) for s, a in adatas.items()}
    diffs = differences(args, variants, preds, truth, log)
    dt = pd.DataFrame(diffs)
    atomic_write_text(out / "study_differences.csv", dt.to_csv(index=False))
    md = study_markdown(table, dt, nb_all, variants, args)
    atomic_write_text(out / "study.md", md + "\n")
    print(md)
    return 0


def _ci(r) -> str:
    import math

    if any(math.isnan(r[c]) for c in ("diff", "ci_low", "ci_high")):
        return "undefined"
    return f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def compact_markdown(table, dt, variants, schemes) -> str:
    """Per scheme: each mclSTExp variant's means and its PCC differences (section
    resampling) with today's quick, the probe on the same features, ridge_features and
    ridge_color."""
    out = []
    against = ("quick mclstexp", "probe, same features", "ridge_features", "ridge_color")
    for scheme in schemes:
        out += [f"{scheme} scheme: PCC-ACG / PCC-HEG, and the variant minus each run, "
                "95 % interval resampling held-out sections:", "",
                "| variant | PCC-ACG | PCC-HEG | " + " | ".join(f"− {a}" for a in against)
                + " |", "|---" * (3 + len(against)) + "|"]
        for v in variants:
            row = table[(table.scheme == scheme) & (table.method == "mclstexp") &
                        (table.variant == v)]
            if not len(row):
                continue
            r = row.iloc[0]
            cells = [v, f"{r['pcc_acg_mean']:.3f}", f"{r['pcc_heg_mean']:.3f}"]
            for a in against:
                label = a
                if a == "ridge_features" and probe_for(v) == "quick":
                    label = "probe, same features"
                part = dt[(dt.scheme == scheme) & (dt.variant == v) & (dt.against == label) &
                          (dt.unit == "section")].set_index("metric")
                if not len(part):
                    cells.append("-")
                    continue
                cells.append("ACG " + _ci(part.loc["pcc_acg"]) + "<br>HEG "
                             + _ci(part.loc["pcc_heg"]))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def study_markdown(table, dt, nb, variants, args) -> str:
    """The tables of study.md: means, differences with intervals, verdicts, neighbours."""
    import math

    lines = [f"Variants: {', '.join(variants)} ({len(variants)} configurations of mclSTExp); "
             f"top_k {args.top_k}; mean ± sd over the {len(args.sections)} held-out sections.",
             "", "| scheme | run | PCC-ACG | PCC-HEG | MSE | MAE | train s/fold (max) | "
             "C2-C6 neighbours from patient C |", "|---|---|---|---|---|---|---|---|"]
    for r in table.sort_values(["scheme", "method", "variant"]).to_dict("records"):
        cells = [r["scheme"], f"{r['method']} {r['variant']}"]
        cells += [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_sd']:.3f}" for m in METRICS]
        cells.append("-" if math.isnan(r["train_s_mean"]) else
                     f"{r['train_s_mean']:.1f} ({r['train_s_max']:.1f})")
        share = r.get("c_neighbours_same_patient")
        cells.append("-" if share is None or (isinstance(share, float) and math.isnan(share))
                     else f"{share:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(dt):
        lines += ["", compact_markdown(table, dt, variants, args.schemes)]
        lines += ["", "Differences, mclSTExp variant minus the run named (PCC: positive favours "
                  "the variant; 95 % paired bootstrap intervals, 1,000 replicates, seed 0):",
                  "", "| scheme | variant | minus | metric | sections resampled | spots "
                  "resampled |", "|---|---|---|---|---|---|"]
        keys = ["scheme", "variant", "against", "metric"]
        by = {(tuple(r[k] for k in keys), r["unit"]): r for r in dt.to_dict("records")}
        for key in dict.fromkeys(map(tuple, dt[keys].to_numpy().tolist())):
            if key[3] not in ("pcc_acg", "pcc_heg", "mse"):
                continue
            cells = [key[0], key[1], key[2], LABELS[key[3]]]
            cells += [_ci(by[(key, u)]) if (key, u) in by else "-" for u in ("section", "spot")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Verdict by the adoption rule (tools/run_study.py, `verdict`):", "",
                  "| variant | verdict |", "|---|---|"]
        for v in variants:
            if v == "quick":
                continue
            def ci(scheme):
                part = dt[(dt.scheme == scheme) & (dt.variant == v) &
                          (dt.against == "quick mclstexp") & (dt.unit == "section")]
                return {r["metric"]: (r["diff"], r["ci_low"], r["ci_high"])
                        for r in part.to_dict("records")}
            lines.append(f"| {v} | {verdict(ci('patient'), ci('section'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
