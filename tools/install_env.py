"""Create the project's virtual environment (what ``make env`` runs; standard library only).

Steps: ``python -m venv``; pip upgraded and uv installed into it; the pinned packages of
``requirements.txt`` under ``constraints.txt`` installed by uv (its unpacking and
byte-compiling run in parallel: in fresh clones on a 2-core machine, the first step of
``make test``, the environment took 71-79 s this way with an empty uv cache against 176 s
with pip alone); the project itself installed editable
(``--no-deps -e .``, by uv as well); the Jupyter kernel ``mclstexp_lite`` registered in the
environment.

uv does not read pip's configuration, so the index settings pip would use (``pip config
list``: files and ``PIP_*`` variables, e.g. a local wheel folder or a mirror) are handed to
it: index-url, extra-index-url, find-links, constraint, no-index, cert. Where uv cannot be
installed or fails, the same requirements are installed with pip (slower, same versions),
and the script says so.

Run ``python tools/install_env.py [--venv .venv] [--installer auto|uv|pip]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UV = "uv==0.13.9"
_CONFIG_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[a-z0-9-]+)=(?P<value>.*)$")


def pip_settings(python: str) -> dict[str, list[str]]:
    """The index settings of ``pip config list`` run by ``python``: ``{key: [values]}``
    for the keys uv can be given (all scopes; whitespace-separated lists split)."""
    res = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=False)
    out: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        m = _CONFIG_LINE.match(line.strip())
        if not m or m["key"] not in ("index-url", "extra-index-url", "find-links",
                                     "constraint", "no-index", "cert"):
            continue
        value = m["value"].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values = out.setdefault(m["key"], [])
        for v in value.split():
            if v not in values:
                values.append(v)
    return out


def uv_arguments(settings: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """uv command-line arguments and environment variables for pip's index settings."""
    args: list[str] = []
    env: dict[str, str] = {}
    for url in settings.get("index-url", [])[-1:]:
        args += ["--index-url", url]
    for url in settings.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for loc in settings.get("find-links", []):
        args += ["--find-links", loc]
    for path in settings.get("constraint", []):
        if Path(path).is_file():
            args += ["--constraint", path]
    if any(v.lower() in ("1", "true", "yes", "on") for v in settings.get("no-index", [])):
        args.append("--no-index")
    if settings.get("cert"):
        env["SSL_CERT_FILE"] = settings["cert"][-1]
    if settings.get("extra-index-url") or settings.get("find-links"):
        # pip takes the best match over all indexes and link folders; so must uv, or it
        # would stop at the first index that knows a package
        args += ["--index-strategy", "unsafe-best-match"]
    return args, env


def run(cmd: list[str], what: str, *, env: dict | None = None, check: bool = True,
        quiet: bool = False) -> bool:
    """Run ``cmd``, print one line with its time; False (or an error) when it fails.
    ``quiet`` hides its standard output (its errors still show)."""
    t0 = time.time()
    res = subprocess.run(cmd, env={**os.environ, **(env or {})}, check=False,
                         stdout=subprocess.DEVNULL if quiet else None)
    ok = res.returncode == 0
    print(f"  {what}: {'done' if ok else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    if not ok and check:
        raise SystemExit(f"make env: '{shlex.join(cmd)}' failed (exit {res.returncode}); "
                         "see its messages above.")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=".venv", help="folder of the environment")
    ap.add_argument("--python", default=sys.executable,
                    help="the Python that creates it (default: this one)")
    ap.add_argument("--installer", choices=["auto", "uv", "pip"], default="auto",
                    help="auto: uv, falling back to pip where uv fails; uv: uv or an error; "
                         "pip: pip only")
    args = ap.parse_args(argv)

    venv = Path(args.venv)
    if not venv.is_absolute():
        venv = REPO / venv
    py = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    reqs = ["-r", str(REPO / "requirements.txt"), "-c", str(REPO / "constraints.txt")]
    t0 = time.time()
    print(f"Creating {venv} (python -m venv, then the pinned packages)", flush=True)
    run([args.python, "-m", "venv", str(venv)], "venv")
    pip = [py, "-m", "pip", "install", "--quiet"]
    installer = pip  # what installs the packages and the project
    if args.installer in ("auto", "uv"):
        if run(pip + ["--upgrade", "pip", UV], f"pip and {UV}", check=args.installer == "uv"):
            uv_args, uv_env = uv_arguments(pip_settings(py))
            uv = [str(Path(py).parent / "uv"), "pip", "install", "--quiet", "--python", py,
                  *uv_args]
            if run(uv + [*reqs, "--compile-bytecode"], "packages (uv)", env=uv_env,
                   check=args.installer == "uv"):
                installer = uv
            else:
                print("  uv failed; installing the same pinned packages with pip instead",
                      flush=True)
    else:
        run(pip + ["--upgrade", "pip"], "pip")
    if installer is pip:
        run(pip + reqs, "packages (pip)")
        run(pip + ["--no-deps", "-e", str(REPO)], "mclstexp_lite (editable, pip)")
    else:
        run(installer + ["--no-deps", "-e", str(REPO)], "mclstexp_lite (editable, uv)",
            env=uv_env)
    run([py, "-m", "ipykernel", "install", "--prefix", str(venv), "--name", "mclstexp_lite",
         "--display-name", "mclstexp_lite"], "Jupyter kernel", quiet=True)
    print(f"Environment ready in {time.time() - t0:.0f} s: {venv}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
