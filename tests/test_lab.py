"""``make lab`` (mclstexp_lite._lab): the JupyterLab command and environment it builds,
the kernel checks, and a real server started the way ``make lab`` starts it (on
127.0.0.1, no browser): its root is notebooks/, its default kernel the project's, and
that kernel runs this environment with the data settings in place."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mclstexp_lite import _lab as lab, tutorials

from .conftest import REPO


def test_lab_command_opens_notebooks_with_the_projects_kernel():
    cmd = lab.lab_command(["--no-browser", "--port", "8890"])
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={REPO / 'notebooks'}" in cmd
    assert "--MappingKernelManager.default_kernel_name=mclstexp_lite" in cmd
    assert cmd[-3:] == ["--no-browser", "--port", "8890"]


def test_make_lab_runs_the_module_with_lab_args():
    out = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--no-browser --port 8890"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    # (under an outer make, make -n also prints "Entering/Leaving directory" lines)
    assert ".venv/bin/python -m mclstexp_lite._lab --no-browser --port 8890" in out.splitlines()


def test_environment_makes_relative_paths_absolute_and_says_what_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env, s = lab.lab_environment({"MCLSTEXP_DATA": "../data", "MCLSTEXP_OFFLINE": "1",
                                  "MCLSTEXP_CACHE": "cache", "PATH": "/bin"})
    assert env["MCLSTEXP_DATA"] == str(tmp_path.parent / "data")
    assert env["MCLSTEXP_CACHE"] == str(tmp_path / "cache") and env["PATH"] == "/bin"
    assert s["data"] == tmp_path.parent / "data" and s["cache"] == tmp_path / "cache"
    assert s["offline"] is True
    assert "MCLSTEXP_DATA (made absolute)" in s["lines"][0] and "nothing is downloaded" in s["lines"][2]
    assert os.environ.get("MCLSTEXP_DATA") != "../data"  # the process's own is untouched
    # no MCLSTEXP_DATA: the package's per-user default, as every loader uses it
    env, s = lab.lab_environment({"PATH": "/bin"})
    from mclstexp_lite import download as dl

    monkeypatch.delenv("MCLSTEXP_DATA", raising=False)
    assert s["data"] == dl.data_dir() and "per-user default" in s["lines"][0]
    assert s["offline"] is False


def test_missing_sections_of_the_quick_profile(tmp_path):
    sections = tutorials.load_profile("quick")["SECTIONS"]
    counts = tmp_path / "her2st" / "data" / "ST-cnts"
    counts.mkdir(parents=True)
    for s in sections[:2]:
        (counts / f"{s}.tsv.gz").write_bytes(b"")
    assert lab.missing_sections(tmp_path) == sections[2:]


def _kernel(folder: Path, name: str, exe: str):
    (folder / "kernels" / name).mkdir(parents=True)
    (folder / "kernels" / name / "kernel.json").write_text(json.dumps(
        {"argv": [exe, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": name, "language": "python"}))


def test_kernel_problems_name_a_kernel_that_runs_another_python(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before all others
    _kernel(tmp_path, "python3", "python3")  # 'python3': JupyterLab runs it with its own
    _kernel(tmp_path, "mclstexp_lite", sys.executable)
    assert lab.kernel_problems() == []
    other = tmp_path / "other"
    monkeypatch.setenv("JUPYTER_PATH", str(other))
    _kernel(other, "python3", "/opt/elsewhere/bin/python")
    _kernel(other, "mclstexp_lite", "/opt/elsewhere/bin/python")
    problems = lab.kernel_problems()
    assert len(problems) == 2
    assert "runs /opt/elsewhere/bin/python" in problems[0] and "make env" in problems[0]
    assert "'python3' that the notebooks ask for" in problems[1]
    assert "Change Kernel > mclstexp_lite" in problems[1]


def test_the_environment_has_the_projects_kernel():
    """`make env` installed the kernel into this environment; it runs this Python."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("mclstexp_lite")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_lab_serves_the_notebooks_and_its_kernel_sees_the_settings(tmp_path):
    """A real JupyterLab started by `python -m mclstexp_lite._lab` (127.0.0.1, a free port,
    no browser, stopped at the end): the contents root lists the numbered notebooks, the
    default kernel is mclstexp_lite; a kernel started from that spec in notebooks/ with
    the command's environment imports the package and sees MCLSTEXP_DATA made absolute."""
    from jupyter_client.manager import start_new_kernel

    port, token = _free_port(), "test-token"
    env = dict(os.environ, MCLSTEXP_DATA="relative/data", JUPYTER_RUNTIME_DIR=str(tmp_path),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mclstexp_lite._lab", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", f"--IdentityProvider.token={token}"]
        + (["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):  # up to 60 s for the server to answer
            try:
                _get(f"{base}/api/status", token)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not answer within 60 s")
        assert proc.poll() is None, proc.stdout.read()
        contents = _get(f"{base}/api/contents", token)
        names = {c["name"] for c in contents["content"]}
        assert {p.name for p in tutorials.notebooks()} <= names
        assert _get(f"{base}/api/kernelspecs", token)["default"] == "mclstexp_lite"
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"data:    {tmp_path / 'relative' / 'data'}  (MCLSTEXP_DATA (made absolute))" in out
    assert "command: " in out and "--ServerApp.root_dir=" in out

    kernel_env, _ = lab.lab_environment({**os.environ, "MCLSTEXP_DATA": str(tmp_path / "d")})
    km, kc = start_new_kernel(kernel_name="mclstexp_lite", cwd=str(tutorials.NOTEBOOKS),
                              env=kernel_env)
    try:
        got = []
        kc.execute_interactive(
            "import os, sys, mclstexp_lite; print(sys.executable, os.getcwd(), "
            "os.environ['MCLSTEXP_DATA'])",
            output_hook=lambda m: got.append(m["content"].get("text", "")), timeout=60)
        exe, cwd, data = "".join(got).split()
        assert Path(exe).resolve() == Path(sys.executable).resolve()
        assert cwd == str(tutorials.NOTEBOOKS) and data == str(tmp_path / "d")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
