"""Project-level checks: pins agree, imports stay light, CI calls the README's command;
package-wide rules: unknown names are refused with the valid ones, no unsafe unpickling."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from mclstexp_lite import datasets as ds
from mclstexp_lite import download as dl
from mclstexp_lite import models as mdl
from mclstexp_lite import pp
from mclstexp_lite import train as tr

from .conftest import REPO

PACKAGE = REPO / "mclstexp_lite"


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


# ------------------------------- unknown names, package-wide (from test_bad_input.py)
@pytest.mark.parametrize("call, error, bad, valid", [
    (lambda: ds.her2st("Z1"), ValueError, "'Z1'", "C2"),
    (lambda: ds.cscc("P2_ST_rep9"), ValueError, "'P2_ST_rep9'", "P2_ST_rep1"),
    (lambda: ds.load("her3", "A1"), ValueError, "'her3'", "her2st"),
    (lambda: ds.list_sections("her3"), ValueError, "'her3'", "her2st"),
    (lambda: ds.her2st("C2", image="tiny"), ValueError, "'tiny'", "'reduced'"),
    (lambda: dl.rows("her2st", "Z9"), ValueError, "'Z9'", "A1"),
    (lambda: pp.published_panel("skin"), ValueError, "'skin'", "cscc"),
    (lambda: tr.TrainConfig.profile("fast"), ValueError, "'fast'", "quick"),
    (lambda: tr.TrainConfig.profile("quick", optimizer="sgd"), ValueError, "'sgd'", "adamw"),
    (lambda: mdl.MclSTExp(10, weights=None, image_arch="vgg16"), ValueError, "vgg16",
     "densenet121"),
], ids=["her2st", "cscc", "load", "list_sections", "image-kind", "manifest", "panel",
        "train-profile", "optimizer", "image-arch"])
def test_unknown_names_are_refused_with_the_valid_ones(call, error, bad, valid):
    with pytest.raises(error) as err:
        call()
    assert bad in str(err.value) and valid in str(err.value)


# ------------------------------------------------ unpickling (from test_bad_input.py)
def _calls(tree: ast.AST):
    """(enclosing function name, call node) for every call in a module."""
    def walk(node, func):
        for child in ast.iter_child_nodes(node):
            is_def = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            name = child.name if is_def else func
            if isinstance(child, ast.Call):
                yield name, child
            yield from walk(child, name)
    yield from walk(tree, "<module>")


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_unsafe_unpickling_in_the_package():
    """Every torch.load passes weights_only=True; np.load never allows pickles, except
    the one conversion of the checksum-verified published panel (pp.published_panel);
    no module imports pickle or calls pandas.read_pickle. (An AST walk, not a grep, so
    that the docstrings that explain the rule do not count.)"""
    torch_loads, pickle_loads = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert "weights_only=False" not in source, path.name
        assert "read_pickle" not in source, path.name  # pandas unpickles too
        for func, call in _calls(ast.parse(source)):
            f = call.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name):
                if f.value.id == "torch":
                    torch_loads.append((path.name, func, _kw(call, "weights_only")))
                elif f.value.id in ("np", "numpy"):
                    if _kw(call, "allow_pickle") not in (None, False):
                        pickle_loads.append((path.name, func, _kw(call, "allow_pickle")))
        imported = {a.name for node in ast.walk(ast.parse(source))
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        modules = {node.module for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.ImportFrom)}
        assert not {"pickle", "dill", "cloudpickle"} & (imported | modules), path.name
    assert torch_loads, "expected torch.load calls (checkpoints, feature cache)"
    assert all(w is True for _, _, w in torch_loads), torch_loads
    assert pickle_loads == [("panels.py", "published_panel", True)]
