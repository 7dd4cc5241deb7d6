"""Rebuild ``data_manifest.csv`` from the pinned upstream listings.

Run from the repository root with the offline data folder beside it::

    python tools/build_manifest.py ../shared/data/SOURCES.csv > data_manifest.csv

HER2+, the mclSTExp gene panels and the Visium fixture come from ``SOURCES.csv`` (pinned
commits, sizes, sha256 where the file was at hand, git blob sha1 always). cSCC rows are
written from the GEO accession list of GSE144240; their checksums and sizes are not
published by GEO, so those columns stay empty and the notes say so.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

COLUMNS = [
    "dataset", "section", "patient", "kind", "path", "url", "sha256", "git_blob_sha1",
    "size", "pixel_scale", "source", "license", "notes",
]

HER2_NOTE_IMG = "full-resolution H&E, ~0.69 um/px; spot-file pixel_x/pixel_y are in this frame"
LABEL_NOTE = ("pathologist labels; join on ROUNDED array x,y; the pixel_x/pixel_y columns "
              "are NOT in the full-resolution image frame")
A1_REDUCED_NOTE = ("REDUCED-resolution A1 H&E (2000x2138, background blacked out, annotation "
                   "thumbnail top right); spot-file pixels x 2000/6954")

# GEO GSE144240 (Ji et al. 2020): the 12 legacy-ST sections used by mclSTExp.
CSCC_GSM = {
    "P2": ["GSM4284316", "GSM4284317", "GSM4284318"],
    "P5": ["GSM4284319", "GSM4284320", "GSM4284321"],
    "P9": ["GSM4284322", "GSM4284323", "GSM4284324"],
    "P10": ["GSM4284325", "GSM4284326", "GSM4284327"],
}


def her2_row(src: dict) -> dict:
    path = src["path"]
    rel = path.split("/", 1)[1]
    url = (f"https://raw.githubusercontent.com/{src['source_repo']}/"
           f"{src['source_commit']}/{src['source_path']}")
    base = {"sha256": src["sha256"], "git_blob_sha1": src["git_blob_sha1"],
            "size": src["bytes"], "url": url, "path": path, "pixel_scale": ""}
    if path.startswith("her2st/"):
        base.update(dataset="her2st", source="almaan/her2st@85df741 (Andersson et al. 2021; Zenodo 3957257)",
                    license="no licence file upstream; public data")
        m = re.search(r"ST-cnts/([A-H]\d)\.tsv\.gz$", rel)
        if m:
            return {**base, "section": m[1], "patient": m[1][0], "kind": "counts",
                    "notes": "spots x genes raw counts; rows '{x}x{y}' array coordinates"}
        m = re.search(r"ST-spotfiles/([A-H]\d)_selection\.tsv$", rel)
        if m:
            return {**base, "section": m[1], "patient": m[1][0], "kind": "spots",
                    "notes": "x y new_x new_y pixel_x pixel_y selected"}
        m = re.search(r"ST-imgs/([A-H])/([A-H]\d)/", rel)
        if m:
            return {**base, "section": m[2], "patient": m[1], "kind": "image",
                    "notes": HER2_NOTE_IMG}
        m = re.search(r"ST-pat/lbl/([A-J]\d)_labeled_coordinates\.tsv$", rel)
        if m:
            return {**base, "section": m[1], "patient": m[1][0], "kind": "labels",
                    "notes": LABEL_NOTE}
        m = re.search(r"ST-pat/img/([A-J]\d)_annotated\.png$", rel)
        if m:
            return {**base, "section": m[1], "patient": m[1][0], "kind": "annotation_image",
                    "notes": "pathologist annotation drawn on the H&E (reference only)"}
        if rel.endswith("A1_HE_image_dark.png"):
            return {**base, "section": "A1", "patient": "A", "kind": "image_reduced",
                    "pixel_scale": f"{2000 / 6954:.6f}", "notes": A1_REDUCED_NOTE}
        if rel.endswith("ST-pat/lbl/README"):
            return None
    if path.startswith("mclstexp/"):
        base.update(dataset="mclstexp_panels", patient="",
                    source="shizhiceng/mclSTExp@fdd3ab1", license="see upstream repository")
        if "her_hvg" in path:
            return {**base, "section": "her2st", "kind": "gene_panel",
                    "notes": "785-gene HER2+ panel (numpy object array of str)"}
        return {**base, "section": "cscc", "kind": "gene_panel",
                "notes": "171-gene cSCC panel (numpy object array of str)"}
    if path.startswith("seurat_visium/"):
        base.update(dataset="visium_fixture", section="mouse_brain_fixture", patient="",
                    source="satijalab/seurat@211f644 tests/testdata/visium", license="MIT")
        kind = {
            "filtered_feature_bc_matrix.h5": "visium_matrix",
            "tissue_positions_list.csv": "visium_positions",
            "scalefactors_json.json": "visium_scalefactors",
            "tissue_lowres_image.png": "visium_lowres_image",
        }[path.rsplit("/", 1)[1]]
        return {**base, "kind": kind,
                "notes": "Space Ranger output subset: 2,695 spots x 100 genes, lowres image only"}
    raise ValueError(f"unrecognised SOURCES.csv row: {path}")


def cscc_rows() -> list[dict]:
    rows = []
    for patient, gsms in CSCC_GSM.items():
        for rep, gsm in enumerate(gsms, start=1):
            section = f"{patient}_ST_rep{rep}"
            files = {
                "counts": f"{gsm}_{section}_stdata.tsv.gz",
                "spots": f"{gsm}_spot_data-selection-{section}.tsv.gz",
                "image": f"{gsm}_{section}.jpg.gz",
            }
            for kind, name in files.items():
                url = (f"https://ftp.ncbi.nlm.nih.gov/geo/samples/{gsm[:7]}nnn/{gsm}/suppl/{name}")
                rows.append({
                    "dataset": "cscc", "section": section, "patient": patient, "kind": kind,
                    "path": f"cscc/GSE144240/{name}", "url": url, "sha256": "",
                    "git_blob_sha1": "", "size": "", "pixel_scale": "",
                    "source": "GEO GSE144240 (Ji et al. 2020)",
                    "license": "GEO public data",
                    "notes": ("checksum and size not published by GEO: the downloader checks the "
                              "server's Content-Length and records the sha256 it saw"
                              + ("; gzipped JPEG, unpacked once into the cache" if kind == "image" else "")),
                })
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description="Write data_manifest.csv (to standard output) from the pinned listing of "
                    "the offline data (SOURCES.csv) and the GEO accessions of the cSCC data.")
    ap.add_argument("sources_csv", nargs="?", default="../shared/data/SOURCES.csv",
                    help="SOURCES.csv of the offline data folder (default: %(default)s)")
    sources_csv = ap.parse_args(argv).sources_csv
    with open(sources_csv, newline="") as fh:
        src_rows = list(csv.DictReader(fh))
    rows = [r for r in (her2_row(s) for s in src_rows) if r is not None]
    rows += cscc_rows()
    order = {"her2st": 0, "mclstexp_panels": 1, "cscc": 2, "visium_fixture": 3}
    rows.sort(key=lambda r: (order[r["dataset"]], r["section"], r["kind"], r["path"]))
    writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


if __name__ == "__main__":
    main()
