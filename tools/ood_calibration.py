"""Calibrate the predictor's out-of-distribution signal (predict.OOD_THRESHOLD) on real
slides: leave-one-patient-out on the 7 offline HER2+ sections (quick profile), then the
held-out patient's sections (in distribution) against slides unlike the training data:

- the real Visium mouse-brain fixture (another tissue and species, its 600 px lowres
  image: ~14 um/px);
- each held-out section's own image re-coloured: its haematoxylin and eosin channels
  (skimage's colour deconvolution, rgb2hed) put back as haematoxylin and DAB
  ("ihc_like": a brown immunostain look), and its hue turned by 90 degrees ("hue90");
- the held-out section's spots on a grey copy of its image (no stain colour at all).

Writes one CSV row per (fold, slide): the score, the number of spots. Usage::

    MCLSTEXP_DATA=../shared/data MCLSTEXP_OFFLINE=1 .venv/bin/python tools/ood_calibration.py \\
        --out outputs/ood_calibration.csv
"""

from __future__ import annotations

import argparse
import glob
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def recolour(src: Path, dst: Path, how: str) -> None:
    from PIL import Image
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.asarray(Image.open(src).convert("RGB"))
    if how == "ihc_like":
        hed = rgb2hed(rgb)
        out = hed2rgb(np.stack([hed[..., 0], np.zeros_like(hed[..., 1]), hed[..., 1]], axis=-1))
        out = np.clip(out * 255, 0, 255).astype(np.uint8)
    elif how == "hue90":
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + 64) % 256
        out = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    elif how == "grey":
        g = np.asarray(Image.fromarray(rgb).convert("L"))
        out = np.repeat(g[..., None], 3, axis=2)
    else:
        raise ValueError(how)
    Image.fromarray(out).save(dst, quality=95)


def main(argv=None) -> None:
    import mclstexp_lite as ml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/ood_calibration.csv")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--visium-spots", type=int, default=600)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / "ood_images"
    work.mkdir(exist_ok=True)
    data = Path(ml.download.data_dir())
    genes = ml.pp.published_panel("her2st")
    names = ["A1", "B4", "C2", "C3", "C4", "C5", "C6"]
    raw = {s: ml.datasets.her2st(s, progress=False) for s in names}
    prepared = {s: ml.pp.prepare(a, genes) for s, a in raw.items()}
    visium = ml.datasets.visium(data / "seurat_visium")
    visium = visium[np.random.default_rng(0).choice(visium.n_obs, args.visium_spots,
                                                     replace=False)].copy()
    config = ml.train.TrainConfig.profile("quick", epochs=args.epochs)
    rows = []
    for patient in "ABC":
        test = [s for s in names if s[0] == patient]
        train = {s: prepared[s] for s in names if s[0] != patient}
        ref = ml.train.SpotData.from_anndata(train, progress=False)
        model = ml.train.train(ref, config, progress=False).model
        p = ml.predict.build_predictor(model, ref, top_k=50)

        def score(adata, what, section):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = p.predict(adata, progress=False)
            rec = pred.uns["mclstexp_prediction"]
            rows.append({"held_out_patient": patient, "section": section, "slide": what,
                         "n_spots": pred.n_obs, "ood_score": rec["ood_score"],
                         "reference_distance": p.info["ood_reference_distance"]})
            print(rows[-1], flush=True)

        for s in test:
            score(prepared[s], "held-out HER2+ section (in distribution)", s)
        score(visium, "Visium mouse brain, lowres image (another tissue and species)",
              "mouse_brain")
        for s in test:
            if s == "A1":
                continue  # its reduced image has a blacked-out background
            d = data / "her2st" / "data"
            image = Path(glob.glob(str(d / "ST-imgs" / s[0] / s / "*.jpg"))[0])
            for how in ("ihc_like", "hue90", "grey"):
                dst = work / f"{s}_{how}.jpg"
                if not dst.exists():
                    recolour(image, dst, how)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    a = ml.datasets.from_files(d / "ST-cnts" / f"{s}.tsv.gz",
                                               d / "ST-spotfiles" / f"{s}_selection.tsv", dst,
                                               section=s)
                score(a, f"held-out section re-coloured ({how})", s)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(pd.DataFrame(rows).groupby("slide")["ood_score"].describe().to_string())


if __name__ == "__main__":
    main()
