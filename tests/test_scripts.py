"""The scripts under tools/ and benchmarks/ cannot rot unnoticed: each answers ``--help``
(its argparse main, called in this process: the scripts' imports are shared, so the test
takes seconds), and every package name a script uses (``pt.gpu_augment``,
``from mclstexp_lite.cv import run_cv``...) exists, read from its source with ``ast`` (the
rename that once broke ``benchmarks/bench_batches.py`` at run time is caught here)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

import pytest

from .conftest import REPO

SCRIPTS = sorted([*REPO.glob("tools/*.py"), *REPO.glob("benchmarks/*.py")])
MAINS = [p for p in SCRIPTS if not p.name.startswith("_")]


def _load(path):
    """Import a script as a module (its folder on sys.path, for its sibling imports)."""
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_script_is_listed():
    assert len(MAINS) >= 15 and {"bench_batches.py", "build_manifest.py"} <= {
        p.name for p in MAINS}


@pytest.mark.parametrize("path", MAINS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_answers_help(path, capsys):
    module = _load(path)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main(argv)"
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "-h, --help" in out
    source = path.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in source  # and it runs as a script


def _package_names(tree: ast.AST):
    """``(alias, module)`` of every import of a package module, and ``(module, name)`` of
    every name imported from one; in the whole file, functions included."""
    modules, names = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mclstexp_lite":
                    modules[a.asname or "mclstexp_lite"] = a.name if a.asname else "mclstexp_lite"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "mclstexp_lite":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _is_module(full):
                    modules[a.asname or a.name] = full
                else:
                    names.append((node.module, a.name))
    return modules, names


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_uses_only_names_the_package_has(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, names = _package_names(tree)
    missing = [f"from {m} import {n}" for m, n in names
               if not hasattr(importlib.import_module(m), n)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in modules:
            owner = importlib.import_module(modules[node.value.id])
            if not hasattr(owner, node.attr):
                missing.append(f"{node.value.id}.{node.attr} (line {node.lineno}; "
                               f"{node.value.id} is {modules[node.value.id]})")
    assert not missing, f"{path.name} uses names the package no longer has: {missing}"


def test_install_env_hands_pips_index_settings_to_uv(tmp_path, monkeypatch):
    """tools/install_env.py: ``pip config list`` lines (any scope, quoted, several values)
    become uv's arguments; a constraint file that does not exist is left out; a cert goes
    to SSL_CERT_FILE; without extra indexes or link folders uv keeps its own strategy."""
    import subprocess

    module = _load(REPO / "tools" / "install_env.py")
    constraint = tmp_path / "c.txt"
    constraint.write_text("torch<=2.14.1\n")
    listing = "\n".join([
        ":env:.find-links='/opt/wheels'",
        "global.find-links='/opt/wheels'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        f"global.constraint='{constraint} {tmp_path / 'absent.txt'}'",
        "global.cert='/etc/ssl/certs/ca.crt'",
        "global.timeout='60'",
    ])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=listing + "\n", stderr=""))
    settings = module.pip_settings("python")
    assert settings["find-links"] == ["/opt/wheels"] and "timeout" not in settings
    args, env = module.uv_arguments(settings)
    assert args == ["--extra-index-url", "file:///opt/a/simple",
                    "--extra-index-url", "file:///opt/b/simple",
                    "--find-links", "/opt/wheels", "--constraint", str(constraint),
                    "--index-strategy", "unsafe-best-match"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt"}
    assert module.uv_arguments({"index-url": ["https://mirror/simple"]}) == (
        ["--index-url", "https://mirror/simple"], {})
