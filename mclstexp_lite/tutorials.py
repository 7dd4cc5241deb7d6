"""Run the numbered tutorial notebooks with papermill and build an HTML index.

Usage (what ``make tutorials`` calls)::

    python -m mclstexp_lite.tutorials --profile quick --out outputs/tutorials

Each notebook in ``notebooks/`` named ``NN_*.ipynb`` runs with the parameters of
``notebooks/profiles/<profile>.yaml`` plus ``OUTPUT_DIR`` pointing at one shared results
folder, so later notebooks reuse what earlier ones wrote. A notebook starts when the
notebooks it reads from (:data:`NEEDS`) have finished; with ``--jobs 2`` (the default on
a machine with two or more cores) two independent ones run at once, e.g. 04 beside 05,
each with its share of the CPU threads. Executed notebooks, their HTML
renderings and ``index.html`` go to ``<out>/<profile>/``.
"""

from __future__ import annotations

import argparse
import html
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from . import download as dl
from ._progress import PROGRESS_ENV, progress_bar
from ._util import atomic_write_text, environ, positive_int

__all__ = [
    "NOTEBOOKS",
    "PROFILE_DIR",
    "NEEDS",
    "available_profiles",
    "load_profile",
    "notebooks",
    "absolute_path_variables",
    "default_jobs",
    "needs",
    "run",
    "main",
]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
#: Folder of the notebook parameter files (``<profile>.yaml``: ``PROFILE``, the name of a
#: training profile of :data:`mclstexp_lite.train.PROFILES`, plus notebook-only settings).
PROFILE_DIR = NOTEBOOKS / "profiles"
#: The notebooks whose results each notebook reads (through ``OUTPUT_DIR``); it starts
#: only after they finished. Every notebook reads the sections notebook 01 prepared. A
#: notebook not listed here waits for every notebook before it.
NEEDS = {
    "01_data_and_preprocessing": (),
    "02_training": ("01_data_and_preprocessing",),
    "03_evaluation": ("02_training",),  # its model and held-out prediction
    "04_interpretation_immune_genes": ("03_evaluation",),  # 03's predictions
    "05_spatial_clustering": ("03_evaluation",),
    "06_predict_your_own_slide": ("03_evaluation",),  # 02's model; 03's new-patient numbers
}


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


def default_jobs() -> int:
    """Notebooks run at once by default: 2 on a machine with two or more cores, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def needs(names: list[str]) -> dict:
    """``{notebook: notebooks it waits for}`` among ``names`` (see :data:`NEEDS`)."""
    out = {}
    for i, name in enumerate(names):
        wanted = NEEDS.get(name, tuple(names[:i]))
        out[name] = tuple(n for n in wanted if n in names)
    return out


def _execute(nb: str, tmp: str, params: dict, kernel_name: str, progress: bool,
             threads: int | None, cwd: str) -> str:
    """Run one notebook with papermill (in a worker process); '' or the error's last line.

    ``threads``: CPU threads for the kernel's numerical libraries (``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``), or ``None`` for their own default (all cores). The kernel runs
    with ``MCLSTEXP_PROGRESS=0``: nobody watches its progress bars, and every redraw of
    one would be an output line in the executed notebook."""
    import papermill as pm

    changes = {PROGRESS_ENV: "0"}
    if threads is not None:
        changes.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        with environ(changes):
            pm.execute_notebook(nb, tmp, parameters=params, kernel_name=kernel_name,
                                progress_bar=progress, cwd=cwd, **_local_kernel())
        return ""
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell
        text = str(exc).strip()
        return text.splitlines()[-1][:300] if text else repr(exc)


def _local_kernel() -> dict:
    """papermill's kernel-manager setting: on Linux and macOS the kernel talks to papermill
    over IPC sockets (files in Jupyter's runtime folder) instead of TCP on 127.0.0.1, so no
    port is opened and ipykernel has nothing to warn about ("running over TCP without
    encryption", once per notebook in the terminal). Windows has no IPC sockets: TCP."""
    if os.name != "posix":
        return {}
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return {"kernel_manager_class": IPCKernelManager}


def run(profile: str = "quick", out: str | os.PathLike = "outputs/tutorials", *,
        only: str | None = None, extra: dict | None = None, kernel_name: str = "python3",
        jobs: int | None = None, progress: bool = True) -> list[dict]:
    """Execute the notebooks; returns one record per notebook that ran (name, ok, error,
    seconds, threads, metrics), in notebook order.

    ``jobs``: notebooks run at once (default :func:`default_jobs`); a notebook starts
    when the notebooks it needs (:data:`NEEDS`) are done. One that starts beside another
    gets ``cpu_count // jobs`` threads; one that runs alone, all of them. After a
    failure no further notebook starts (those running finish); the others get no record.
    With one job, papermill shows a progress bar of each notebook's cells; with more,
    one bar counts finished notebooks.
    """


    jobs = default_jobs() if jobs is None else positive_int(jobs, "jobs")
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
    names = [nb.stem for nb in nbs]
    waits = needs(names)
    share = max(1, (os.cpu_count() or 1) // jobs)
    records: dict = {}
    running: dict = {}  # future -> (notebook, start time, threads)
    failed = False
    bar = progress_bar(total=len(nbs), desc="notebooks", unit="nb", disable=not progress or jobs == 1)
    say = bar.write if not bar.disable else (lambda m: print(m, flush=True))
    # spawn: a clean worker process (no copy of this one's threads or state) per job
    with ProcessPoolExecutor(max_workers=jobs,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        while True:
            started = {v[0].stem for v in running.values()}
            ready = [nb for nb in nbs if nb.stem not in records and nb.stem not in started
                     and all(w in records and records[w]["ok"] for w in waits[nb.stem])]
            while ready and not failed and len(running) < jobs:
                nb = ready.pop(0)
                alone = not running and not ready
                threads = None if alone or jobs == 1 else share
                tmp = out / "executed" / f".{nb.stem}.running.ipynb"
                say(f"[{names.index(nb.stem) + 1}/{len(nbs)}] {nb.stem}  (profile {profile}"
                    + (f", {threads} thread{'s' * (threads > 1)}" if threads else "") + ")")
                fut = pool.submit(_execute, str(nb), str(tmp), params, kernel_name,
                                  progress and jobs == 1, threads, str(NOTEBOOKS))
                running[fut] = (nb, time.time(), threads)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                nb, t0, threads = running.pop(fut)
                error = fut.result()
                rec = {"name": nb.stem, "ok": not error, "error": error, "metrics": None,
                       "seconds": time.time() - t0, "threads": threads}
                tmp = out / "executed" / f".{nb.stem}.running.ipynb"
                executed = out / "executed" / nb.name
                if tmp.exists():
                    os.replace(tmp, executed)
                    _to_html(executed, out / "html" / f"{nb.stem}.html")
                metrics = results / nb.stem / "metrics.json"
                if metrics.exists():
                    rec["metrics"] = json.loads(metrics.read_text())
                records[nb.stem] = rec
                bar.update(1)
                say(f"      {nb.stem}: {'ok' if rec['ok'] else 'FAILED'} in "
                    f"{rec['seconds']:.0f} s")
                if error:
                    failed = True
                    print(f"      {error}", file=sys.stderr, flush=True)
    bar.close()
    ordered = [records[n] for n in names if n in records]
    index = _index(out, profile, ordered)
    print(f"\nExecuted notebooks: {out / 'executed'}\nResults:            {results}\n"
          f"Read them here:     {index}")
    return ordered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick",
                    help=f"parameter profile (notebooks/profiles/*.yaml): {available_profiles()}")
    ap.add_argument("--out", default="outputs/tutorials", help="output folder")
    ap.add_argument("--only", default=None, help="run only notebooks whose name contains this")
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"notebooks run at once when independent (default {default_jobs()} "
                         "here: 2 with two or more CPU cores, else 1)")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="override a parameter (YAML value)")
    args = ap.parse_args(argv)
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in args.param}
    records = run(args.profile, args.out, only=args.only, extra=extra, jobs=args.jobs)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
