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
    assert pickle_loads == [("_panels.py", "published_panel", True)]


# ------------------------------------------------------------------ the import graph
#: Imports that make a module heavy (what ``import mclstexp_lite`` must not load).
HEAVY = ("torch", "scanpy", "squidpy", "anndata")


def _modules() -> dict[str, tuple]:
    """``{dotted name: (path, is_package)}`` of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(tree: ast.AST):
    """``(in_function, enclosing function or None, node)`` for every import statement."""
    def walk(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else func
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield func is not None, func, child
            yield from walk(child, inner)
    yield from walk(tree, None)


def _targets(name: str, is_pkg: bool, node, modules) -> tuple[set, set]:
    """(package modules, external top-level packages) an import statement loads; a
    submodule brings its parent packages along."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level == 0:
        names = [f"{node.module}.{a.name}" for a in node.names]
    else:
        base = name.split(".")[: len(name.split(".")) - (node.level - (1 if is_pkg else 0))]
        mod = ".".join(base + ([node.module] if node.module else []))
        names = [f"{mod}.{a.name}" for a in node.names]
    inner, outer = set(), set()
    for full in names:
        if full.split(".")[0] != PACKAGE.name:
            outer.add(full.split(".")[0])
            continue
        while full not in modules:
            full = full.rpartition(".")[0]
        parts = full.split(".")
        inner.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    inner.discard(name)
    return {m for m in inner if not name.startswith(m + ".")}, outer


def _import_graph():
    """Edges ``{module: {module}}`` of all imports (function level included), the
    module-level ones apart, the external packages each imports at module level, and the
    in-function imports of package modules ``(module, function, target)``."""
    modules = _modules()
    every, top, outer, lazy = {}, {}, {}, []
    for name, (path, is_pkg) in modules.items():
        every[name], top[name], outer[name] = set(), set(), set()
        for in_func, func, node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            inner, ext = _targets(name, is_pkg, node, modules)
            every[name] |= inner
            if in_func:
                lazy += [(name, func, t) for t in sorted(inner)]
            else:
                top[name] |= inner
                outer[name] |= ext
    return every, top, outer, lazy


def _cycles(graph: dict[str, set]) -> list[list[str]]:
    """One cycle (a closed path) through every strongly connected part of ``graph``."""
    index, low, stack, on, parts = {}, {}, [], set(), []

    def connect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while True:
                w = stack.pop()
                on.discard(w)
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(part)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for part in parts:  # shortest way back to the part's first module
        start = min(part)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in part)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def _heavy(top: dict, outer: dict) -> set:
    heavy = {m for m, ext in outer.items() if set(ext) & set(HEAVY)}
    grew = True
    while grew:
        more = {m for m, deps in top.items() if deps & heavy} - heavy
        heavy |= more
        grew = bool(more)
    return heavy


def test_no_import_cycles_counting_imports_inside_functions():
    """A module never imports, even inside a function, a module that imports it back
    (directly or through others): the package is layered, and a name two modules share
    lives in the module below both."""
    every, _, _, _ = _import_graph()
    cycles = [" -> ".join(c) for c in _cycles(every)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_only_keep_heavy_modules_lazy():
    """A package module is imported inside a function only where that keeps a light
    module light: the importer does not load torch/scanpy/squidpy/anndata at import
    time and the imported module does. Everything else is imported at the top."""
    every, top, outer, lazy = _import_graph()
    heavy = _heavy(top, outer)
    needless = {f"{m}.{func}: {t}" for m, func, t in lazy if m in heavy or t not in heavy}
    assert not needless, ("imports inside functions that could be at the top:\n"
                          + "\n".join(sorted(needless)))
    assert "mclstexp_lite.train" in heavy and "mclstexp_lite.datasets" not in heavy


# --------------------------------------------------------------- AnnData, public API
def test_the_package_uses_only_public_anndata_api():
    """No private AnnData attribute (``adata._inplace_subset_var``,
    ``adata._init_as_actual``, ``adata._X``...) anywhere in the package: those change
    without notice between anndata versions. An AST walk over every attribute access,
    against the private names AnnData has in the installed version (plus its instance
    slots), so that a new use cannot slip in under another spelling of the call."""
    import anndata as ad

    private = {n for n in dir(ad.AnnData) if n.startswith("_") and not n.startswith("__")}
    private |= {"_X", "_obs", "_var", "_uns", "_obsm", "_varm", "_obsp", "_varp", "_layers",
                "_raw", "_adata_ref", "_oidx", "_vidx", "_is_view", "_n_obs", "_n_vars"}
    assert {"_inplace_subset_var", "_init_as_actual"} <= private  # the walk can find them
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in private:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not hits, "AnnData private API:\n" + "\n".join(hits)


# ------------------------------------------------------------------- function length
#: The most lines of code a function may have (docstrings, comments and blank lines
#: not counted); longer work is cut into named steps.
MAX_FUNCTION_LINES = 100
#: The one exception: the training loop, which reads top to bottom as one script
#: (config, data, model, optimiser, loop), as nanoGPT's does.
LONG_FUNCTIONS = {"mclstexp_lite/train.py::train"}


def _code_lines(source_lines: list[str], node: ast.AST) -> int:
    """Lines of ``node`` that hold code: not blank, not only a comment, not part of a
    docstring (its own or a nested function's or class's)."""
    import io
    import tokenize

    docs = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    text = "\n".join(source_lines[node.lineno - 1:node.end_lineno]) + "\n"
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            lines.update(n + node.lineno - 1 for n in range(tok.start[0], tok.end[0] + 1))
    return len(lines - docs)


def test_no_function_is_longer_than_a_screenful_or_two():
    """Every function of the package and of the scripts under tools/ and benchmarks/
    (methods and nested functions included) has at most MAX_FUNCTION_LINES lines of
    code, the training loop excepted."""
    long = []
    files = [*PACKAGE.rglob("*.py"), *REPO.glob("tools/*.py"), *REPO.glob("benchmarks/*.py")]
    for path in sorted(files):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path.relative_to(REPO)}::{node.name}"
                n = _code_lines(lines, node)
                if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long.append(f"{name} ({n} lines of code)")
    assert not long, "functions to cut into named steps:\n" + "\n".join(long)
    tree = ast.parse((PACKAGE / "train.py").read_text(encoding="utf-8"))
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert _code_lines((PACKAGE / "train.py").read_text().splitlines(), loop) > 60  # counted


# ------------------------------------------------------------- one public path per name
def _namespaces() -> dict:
    import importlib

    import mclstexp_lite as ml

    return {ns: importlib.import_module(f"mclstexp_lite.{ns}") for ns in ml._SUBMODULES}


def test_the_namespaces_are_the_only_public_modules():
    """At most 15 namespaces, each with an ``__all__`` whose names exist; every other
    file of the package (and of ``datasets/``) is private, ``_name.py``."""
    import mclstexp_lite as ml

    spaces = _namespaces()
    assert len(spaces) <= 15 and "datasets" in spaces and "pl" in spaces
    for ns, module in spaces.items():
        assert isinstance(getattr(module, "__all__", None), list), f"{ns} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{ns}.__all__ names what it lacks: {missing}"
        assert len(set(module.__all__)) == len(module.__all__), f"{ns}.__all__ repeats a name"
    public_files = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    public_files |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert public_files == set(ml._SUBMODULES), public_files ^ set(ml._SUBMODULES)
    inner = [p.name for p in (PACKAGE / "datasets").glob("*.py") if not p.stem.startswith("_")]
    assert not inner, f"public files inside datasets/: {inner}"
    with pytest.raises(AttributeError, match="no attribute 'panels'"):
        ml.panels  # noqa: B018 - a former module name is not an address any more


def test_no_function_or_class_is_exported_by_two_namespaces():
    import inspect

    where: dict = {}
    for ns, module in _namespaces().items():
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                where.setdefault(id(obj), []).append(f"{ns}.{name}")
    twice = [" / ".join(v) for v in where.values() if len(v) > 1]
    assert not twice, "exported twice:\n" + "\n".join(twice)


_ADDRESS = re.compile(r"\b(?:ml|mclstexp_lite)\.([a-z][a-z_]*)\.([A-Za-z_][A-Za-z_0-9]*)")


def test_every_address_the_docs_and_notebooks_use_is_public():
    """Each ``ml.<namespace>.<name>`` in the README, docs/, book/ and the notebooks is in
    that namespace's ``__all__``, so a user who copies it gets the one public address (not
    a deprecated alias, not a private module's name)."""
    import json

    spaces = _namespaces()
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("book/*.md"),
             *REPO.glob("notebooks/*.ipynb")]
    wrong = set()
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"])
        for ns, name in _ADDRESS.findall(text):
            if ns not in spaces or name not in spaces[ns].__all__:
                wrong.add(f"{path.name}: {ns}.{name}")
    assert not wrong, "not a public address:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("old, home, name", [("stain", "patches", "StainNormalizer"),
                                             ("encoders", "features", "registry_table")])
def test_module_names_the_readme_used_warn_once_and_point_home(old, home, name):
    import warnings

    import mclstexp_lite as ml

    ml._WARNED.discard(old)
    with pytest.warns(FutureWarning, match=f"mclstexp_lite.{home}"):
        module = getattr(ml, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(ml, old) is module  # the second use is quiet
    assert getattr(module, name) is getattr(_namespaces()[home], name)
    assert name in _namespaces()[home].__all__
