"""Open JupyterLab on ``notebooks/`` to follow the tutorials cell by cell (``make lab``).

Usage::

    python -m mclstexp_lite._lab [JupyterLab options, e.g. --no-browser --port 8890]

JupyterLab starts from this environment with ``notebooks/`` as its root, so each
notebook's kernel runs in ``notebooks/`` with this environment's packages, as under
``make tutorials``. The data and cache settings are the package's usual ones
(``MCLSTEXP_DATA``, else the per-user data folder; ``MCLSTEXP_CACHE``; ``MCLSTEXP_OFFLINE``),
with relative paths made absolute first, since the kernels do not run where the
command was typed. Before starting, it says which data folder the notebooks will read
and whether the tutorial's sections are there, and checks that the kernel the notebooks
ask for runs this environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import _util
from . import download as dl
from .tutorials import NOTEBOOKS, absolute_path_variables, load_profile

#: The kernel ``make env`` installs into the environment (``ipykernel install --prefix``).
KERNEL_NAME = "mclstexp_lite"


def lab_command(args=()) -> list[str]:
    """The JupyterLab command: this interpreter, ``notebooks/`` as the root, the project's
    kernel as the default for new notebooks, then ``args``."""
    return [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={NOTEBOOKS}",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}", *args]


def lab_environment(environ=None) -> tuple[dict, dict]:
    """A copy of ``environ`` with the package's path variables made absolute, and what the
    notebooks will use: ``{"data": Path, "cache": Path, "offline": bool, "lines": [...]}``
    (``lines``: one sentence per setting)."""
    env = dict(os.environ if environ is None else environ)
    changed = absolute_path_variables(env)
    # ask the package itself, with this environment, where things go
    with _util.environ({k: env.get(k) for k in (dl.ENV_DATA, dl.ENV_CACHE, dl.ENV_OFFLINE)}):
        data = dl.data_dir()
        source = (f"{dl.ENV_DATA}" + (" (made absolute)" if dl.ENV_DATA in changed else "")
                  if env.get(dl.ENV_DATA) else f"the per-user default; set {dl.ENV_DATA} "
                  "to read another copy")
        cache = Path(env[dl.ENV_CACHE]) if env.get(dl.ENV_CACHE) else dl._user_cache() / "cache"
    offline = env.get(dl.ENV_OFFLINE, "") not in ("", "0")
    lines = [f"data:    {data}  ({source})",
             f"cache:   {cache}",
             f"offline: {'yes, nothing is downloaded' if offline else 'no, missing files are downloaded'}"
             f" ({dl.ENV_OFFLINE}={env.get(dl.ENV_OFFLINE, '')!r})"]
    return env, {"data": data, "cache": cache, "offline": offline, "lines": lines}


def missing_sections(data: Path, profile: str = "quick") -> list[str]:
    """Sections of ``profile`` whose count table is not under ``data``."""
    params = load_profile(profile)
    if params.get("DATASET") != "her2st":
        return []
    return [s for s in params["SECTIONS"]
            if not (data / "her2st" / "data" / "ST-cnts" / f"{s}.tsv.gz").exists()]


def kernel_problems() -> list[str]:
    """What would make the notebooks run outside this environment (empty when all is well).

    The notebooks ask for the kernel ``python3``: JupyterLab started from this
    environment runs it with this interpreter, unless a kernel of that name installed
    elsewhere (e.g. in ``~/.local/share/jupyter/kernels``) takes precedence. The kernel
    ``mclstexp_lite`` (from ``make env``) always runs this interpreter.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    problems = []
    try:
        spec = ksm.get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]).resolve() != Path(sys.executable).resolve():
            problems.append(f"the kernel {KERNEL_NAME!r} ({spec.resource_dir}) runs "
                            f"{spec.argv[0]}, not {sys.executable}: run `make env` again")
    except NoSuchKernel:
        problems.append(f"no kernel {KERNEL_NAME!r}: `make env` installs it (or run "
                        f"`{sys.executable} -m ipykernel install --prefix {sys.prefix} "
                        f"--name {KERNEL_NAME}`)")
    spec = ksm.get_kernel_spec("python3")
    exe = spec.argv[0]
    if exe not in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}") \
            and Path(exe).resolve() != Path(sys.executable).resolve():
        problems.append(f"the kernel 'python3' that the notebooks ask for is {spec.resource_dir} "
                        f"and runs {exe}, not this environment: in JupyterLab choose Kernel > "
                        f"Change Kernel > {KERNEL_NAME} in each notebook")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env, settings = lab_environment()
    print("JupyterLab on", NOTEBOOKS, "(open a notebook, then Shift+Enter runs a cell)")
    for line in settings["lines"]:
        print("  " + line)
    missing = missing_sections(settings["data"])
    if missing:
        print(f"  note:    the quick profile's sections {missing} have no count table in "
              f"{settings['data']}" + ("; the notebooks will stop: set MCLSTEXP_DATA to the "
                                       "data folder" if settings["offline"]
                                       else "; the notebooks will download them"), flush=True)
    for p in kernel_problems():
        print("  kernel:  " + p, flush=True)
    cmd = lab_command(args)
    print("  command: " + " ".join(cmd), flush=True)
    # become JupyterLab (no wrapper process left in between): Ctrl+C and signals reach
    # the server itself, and nothing outlives it
    os.chdir(NOTEBOOKS)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    raise SystemExit(main())
