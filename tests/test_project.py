"""Project-level checks: pins agree, imports stay light, CI calls the README's command."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO


def _pins(text: str) -> dict[str, str]:
    return {m[1].lower(): m[2] for m in re.finditer(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)",
                                                     text, re.M)}


def test_environment_yml_mirrors_requirements():
    req = _pins((REPO / "requirements.txt").read_text())
    env = _pins((REPO / "environment.yml").read_text())
    assert req and req == env


def test_requirements_agree_with_constraints():
    req = _pins((REPO / "requirements.txt").read_text())
    con = _pins((REPO / "constraints.txt").read_text())
    for name, version in req.items():
        assert con.get(name) == version, f"{name}: requirements {version}, constraints {con.get(name)}"


def test_import_is_light():
    code = ("import sys, mclstexp_lite; heavy = [m for m in ('torch', 'scanpy', 'squidpy', "
            "'anndata') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make tutorials" in readme
    assert re.search(r"^make test$", ci, re.M)
