"""Run the numbered tutorial notebooks with papermill and build an HTML index.

Usage (what ``make tutorials`` calls)::

    python -m mclstexp_lite.tutorials --profile quick --out outputs/tutorials

Each notebook in ``notebooks/`` named ``NN_*.ipynb`` runs in order with the parameters
of ``notebooks/profiles/<profile>.yaml`` plus ``OUTPUT_DIR`` pointing at one shared
results folder, so later notebooks reuse what earlier ones wrote. Executed notebooks,
their HTML renderings and ``index.html`` go to ``<out>/<profile>/``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path

from . import download as dl
from ._util import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
#: Folder of the notebook parameter files (``<profile>.yaml``: ``PROFILE``, the name of a
#: training profile of :data:`mclstexp_lite.train.PROFILES`, plus notebook-only settings).
PROFILE_DIR = NOTEBOOKS / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict:
    """Parameters of ``notebooks/profiles/<name>.yaml`` (unknown names list the valid ones)."""
    import yaml

    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"unknown profile {name!r}; valid: {', '.join(available_profiles())} "
                         f"(files in {PROFILE_DIR})")
    with open(path) as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise SystemExit(f"{path}: a profile must be a mapping of PARAMETER: value")
    return params


def notebooks(pattern: str | None = None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if pattern:
        found = [p for p in found if pattern in p.stem]
    return found


def _to_html(nb_path: Path, html_path: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(nb_path, as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    atomic_write_text(html_path, body)


def _index(out: Path, profile: str, records: list[dict]) -> Path:
    rows = []
    for r in records:
        metrics = ""
        if r.get("metrics"):
            metrics = "<br>".join(f"{html.escape(str(k))}: {html.escape(_short(v))}"
                                  for k, v in list(r["metrics"].items())[:8])
        status = "ok" if r["ok"] else f"<b style='color:#b00'>failed</b>: {html.escape(r['error'])}"
        rows.append(
            f"<tr><td><a href='html/{r['name']}.html'>{r['name']}</a></td>"
            f"<td>{status}</td><td>{r['seconds']:.0f} s</td><td>{metrics}</td></tr>")
    page = (
        "<!doctype html><meta charset='utf-8'><title>mclstexp_lite tutorials</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "td{padding:.4em;vertical-align:top;border-bottom:1px solid #ddd}</style>"
        f"<h1>mclstexp_lite tutorials: profile <code>{html.escape(profile)}</code></h1>"
        f"<p>Executed {time.strftime('%Y-%m-%d %H:%M')}. Results folder: "
        f"<code>results/</code>. Executed notebooks: <code>executed/</code>.</p>"
        "<table><tr><th>notebook</th><th>status</th><th>time</th><th>metrics.json</th></tr>"
        + "".join(rows) + "</table>")
    path = out / "index.html"
    atomic_write_text(path, page)
    return path


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) < 80 else s[:77] + "..."


#: Environment variables holding paths that the notebooks' kernels read.
PATH_VARIABLES = (dl.ENV_DATA, dl.ENV_CACHE, dl.ENV_MANIFEST)


def absolute_path_variables(environ=None) -> dict:
    """Make relative paths in :data:`PATH_VARIABLES` absolute, in place.

    The notebooks run with ``notebooks/`` as their working directory, so a relative
    ``MCLSTEXP_DATA=../shared/data`` given where the command was typed would point
    somewhere else inside the kernel. Paths are resolved against the current working
    directory (where ``make tutorials`` was called). Returns the changed variables.
    """
    environ = os.environ if environ is None else environ
    changed = {}
    for var in PATH_VARIABLES:
        value = environ.get(var)
        if value and not os.path.isabs(os.path.expanduser(value)):
            environ[var] = changed[var] = os.path.abspath(os.path.expanduser(value))
    return changed


def run(profile: str = "quick", out: str | os.PathLike = "outputs/tutorials", *,
        only: str | None = None, extra: dict | None = None, kernel_name: str = "python3",
        progress: bool = True) -> list[dict]:
    """Execute the notebooks; returns one record per notebook (name, ok, seconds, metrics)."""
    import papermill as pm

    params = load_profile(profile)
    params.update(extra or {})
    for var, value in absolute_path_variables().items():
        print(f"{var}={value} (made absolute: the notebooks run in {NOTEBOOKS})", flush=True)
    out = Path(out).resolve() / profile
    results = out / "results"
    for d in (out / "executed", out / "html", results):
        d.mkdir(parents=True, exist_ok=True)
    params["OUTPUT_DIR"] = str(results)
    nbs = notebooks(only)
    if not nbs:
        raise SystemExit(f"no notebooks matching {only!r} in {NOTEBOOKS}")
    records = []
    for i, nb in enumerate(nbs, start=1):
        name = nb.stem
        print(f"[{i}/{len(nbs)}] {name}  (profile {profile})", flush=True)
        executed = out / "executed" / nb.name
        tmp = executed.with_name(f".{nb.stem}.running.ipynb")
        t0 = time.time()
        rec = {"name": name, "ok": True, "error": "", "metrics": None}
        try:
            pm.execute_notebook(str(nb), str(tmp), parameters=params, kernel_name=kernel_name,
                                progress_bar=progress, cwd=str(NOTEBOOKS))
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell
            rec["ok"] = False
            rec["error"] = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        rec["seconds"] = time.time() - t0
        if tmp.exists():
            os.replace(tmp, executed)
            _to_html(executed, out / "html" / f"{name}.html")
        metrics = results / name / "metrics.json"
        if metrics.exists():
            rec["metrics"] = json.loads(metrics.read_text())
        records.append(rec)
        print(f"      {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.0f} s", flush=True)
        if not rec["ok"]:
            print(f"      {rec['error']}", file=sys.stderr)
            break
    index = _index(out, profile, records)
    print(f"\nExecuted notebooks: {out / 'executed'}\nResults:            {results}\n"
          f"Read them here:     {index}")
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick",
                    help=f"parameter profile (notebooks/profiles/*.yaml): {available_profiles()}")
    ap.add_argument("--out", default="outputs/tutorials", help="output folder")
    ap.add_argument("--only", default=None, help="run only notebooks whose name contains this")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="override a parameter (YAML value)")
    args = ap.parse_args(argv)
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in args.param}
    records = run(args.profile, args.out, only=args.only, extra=extra)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
