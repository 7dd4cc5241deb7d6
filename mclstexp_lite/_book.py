"""Build the course book: a static HTML site from the executed tutorial notebooks.

Usage (what ``make book`` calls)::

    python -m mclstexp_lite._book --tutorials outputs/tutorials --profile quick --out outputs/book

The pages come from the notebooks that ``make tutorials`` executed
(``<tutorials>/<profile>/executed/NN_*.ipynb``); the book never runs a notebook itself.
Each notebook becomes a page in which

- a markdown cell tagged ``exercise`` (first line ``**Exercise NN.n: title**``) becomes an
  exercise block (sphinx-exercise),
- the cells tagged ``solution`` right after it are folded under it as its solution
  (sphinx-exercise's ``solution-start`` / ``solution-end`` around them, shown as a
  dropdown),
- the line ``**Time:** about N min to work through, M min for the exercises.`` of the
  first markdown cell gives the time estimates on the index and the teacher's plan,
- a "Terms on this page" box links the glossary terms its text uses.

The hand-written pages (index, install, teacher, glossary) are in ``book/`` beside the
package; the parts that must stay true to the notebooks (the table of notebooks, the
one-day plan, the exercise list, the run's own timings) are generated here into
``_generated/`` and included by those pages. Sphinx builds the site offline; any Sphinx
warning fails the build. The finished site replaces ``<out>`` (``index.html`` at its
root) only once it is complete.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Hand-written sources of the book (conf.py, index, install, teacher, glossary, _static).
BOOK_SOURCES = REPO / "book"
NOTEBOOKS = REPO / "notebooks"

TAG_EXERCISE, TAG_SOLUTION, TAG_CHECKPOINT = "exercise", "solution", "checkpoint"
#: ``**Exercise 02.1: Epochs against the loss curve**`` (first line of an exercise cell).
EXERCISE_RE = re.compile(r"^\*\*Exercise\s+(\d\d)\.(\d+)\s*:\s*(.+?)\s*\*\*\s*$")
#: ``(about 5 min)`` at the end of an exercise cell.
EXERCISE_MINUTES_RE = re.compile(r"\(about\s+(\d+)\s*min(?:utes)?\)\s*\.?\s*$", re.I)
#: ``**Time:** about 20 min to work through, 15 min for the exercises.``
TIME_RE = re.compile(r"\*\*Time:\*\*\s*about\s+(\d+)\s*min(?:utes)?\s+to\s+work\s+through,"
                     r"\s*(\d+)\s*min(?:utes)?\s+for\s+the\s+exercises", re.I)
#: The plan of the day (minutes after midnight); what the teacher page's plan fits into.
DAY_START, DAY_END = 9 * 60, 17 * 60
WELCOME_MIN, WRAP_UP_MIN, COFFEE_MIN, LUNCH_MIN = 30, 15, 15, 60
#: Glossary terms found on a page by other spellings than the term itself (the keys are
#: terms of book/glossary.md; tests/test_book.py checks that they exist).
TERM_ALIASES = {
    "top-k": [r"\bTOP_K\b", r"\btop_k\b", r"\btop-\d+\b"],
    "contrastive loss": [r"\bcontrastive\b", r"\bCLIP\b"],
    "retrieval": [r"\bretriev"],
    "leave-one-section-out": [r"\bsection fold", r"\bscheme\s*=\s*['\"]section"],
    "leave-one-patient-out": [r"\bpatient fold", r"\bscheme\s*=\s*['\"]patient"],
    "frozen encoder": [r"\bfrozen\b"],
    "fine-tuning": [r"\bfine-tun"],
    "linear probe": [r"\bridge_features\b", r"\bprobe\b"],
    "stain normalisation": [r"\bstain[- ]normali[sz]", r"\bMacenko\b", r"\bReinhard\b"],
    "virtual spots": [r"\bvirtual spot"],
    "reference bank": [r"\breference bank"],
    "predictor": [r"\bpredictor\b"],
    "ARI": [r"\badjusted Rand\b"],
    "NMI": [r"\bnormali[sz]ed mutual information\b"],
    "patch": [r"\bpatches\b"],
}


class BookError(ValueError):
    """A notebook or folder the book cannot be built from; the message says the fix."""


@dataclass
class Exercise:
    number: str          # "02.1"
    title: str
    minutes: int | None  # from "(about m min)"
    label: str           # sphinx-exercise label, "ex-02-1"
    n_solution_cells: int = 0


@dataclass
class NotebookInfo:
    name: str                  # "02_training"
    title: str                 # the first heading, "02 · Training mclSTExp"
    minutes_work: int | None   # from the **Time:** line
    minutes_exercises: int | None
    exercises: list = field(default_factory=list)
    n_checkpoints: int = 0
    duration_s: float | None = None  # papermill's duration of the run the page shows
    parameters: dict = field(default_factory=dict)  # what papermill injected
    #: for each cell of the book's copy, its index in the executed notebook (None: added)
    cell_map: list = field(default_factory=list)

    @property
    def number(self) -> str:
        return self.name[:2]

    @property
    def minutes(self) -> int | None:
        if self.minutes_work is None:
            return None
        return self.minutes_work + (self.minutes_exercises or 0)


# ----------------------------------------------------------------- notebooks
def _tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def _where(name: str, index: int) -> str:
    return f"{name}.ipynb, cell {index}"


def read_time(nb) -> tuple[int, int] | None:
    """``(minutes to work through, minutes for the exercises)`` from the ``**Time:**``
    line of the notebook's first markdown cell, or None when it has none."""
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    m = TIME_RE.search(first.source) if first is not None else None
    return (int(m[1]), int(m[2])) if m else None


def _title(nb, name: str) -> str:
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+?)\s*$", c.source, re.M)
            if m:
                return m[1]
    raise BookError(f"{name}.ipynb has no title: its first markdown cell needs a '# ' heading")


def parse_exercise(cell, name: str, index: int) -> tuple[Exercise, str]:
    """The exercise of a cell tagged ``exercise`` and the task text after its title line."""
    if cell.cell_type != "markdown":
        raise BookError(f"{_where(name, index)} is tagged 'exercise' but is a {cell.cell_type} "
                        "cell: the task goes in a markdown cell, its solution in the cells "
                        "tagged 'solution' after it")
    first, _, body = cell.source.strip().partition("\n")
    m = EXERCISE_RE.match(first.strip())
    if not m:
        raise BookError(f"{_where(name, index)}: an exercise cell starts with a line "
                        f"'**Exercise {name[:2]}.<n>: <short title>**', not {first.strip()!r}")
    if m[1] != name[:2]:
        raise BookError(f"{_where(name, index)}: 'Exercise {m[1]}.{m[2]}' in notebook "
                        f"{name[:2]}; number it 'Exercise {name[:2]}.<n>'")
    minutes = EXERCISE_MINUTES_RE.search(body.strip())
    number = f"{m[1]}.{int(m[2])}"
    return (Exercise(number, m[3], int(minutes[1]) if minutes else None,
                     f"ex-{m[1]}-{int(m[2])}"), body.strip())


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    return "`" * max(3, max(runs, default=0) + 1)


def _markdown_cell(source: str, nbformat):
    cell = nbformat.v4.new_markdown_cell(source)
    cell.pop("id", None)
    return cell


def _injected_parameters(nb) -> dict:
    """The parameters papermill injected (``NAME = value`` lines of its cell)."""
    import ast

    out = {}
    for c in nb.cells:
        if "injected-parameters" in _tags(c):
            for node in ast.parse(c.source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except (ValueError, AttributeError):
                        pass
    return out


def prepare_notebook(nb, name: str, terms: dict | None = None):
    """The book's copy of an executed notebook and what the book says about it.

    Returns ``(notebook, NotebookInfo)``; the notebook given is not changed.

    Raises
    ------
    BookError
        A cell with an error output (the run failed), an exercise cell that is not a
        markdown cell starting with its title line, a solution cell that follows no
        exercise, or two exercises with one number.
    """
    import nbformat

    nb = copy.deepcopy(nb)
    timing = read_time(nb)
    info = NotebookInfo(name=name, title=_title(nb, name),
                        minutes_work=timing[0] if timing else None,
                        minutes_exercises=timing[1] if timing else None,
                        duration_s=nb.metadata.get("papermill", {}).get("duration"),
                        parameters=_injected_parameters(nb))
    cells, origin, open_ex, seen = [], [], None, set()

    def add(cell, index=None):
        cells.append(cell)
        origin.append(index)

    def close_solution():
        add(_markdown_cell("```{solution-end}\n```", nbformat))

    for i, cell in enumerate(nb.cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            raise BookError(f"{_where(name, i)} stopped with {errors[0].get('ename')}: "
                            f"{errors[0].get('evalue', '')[:200]}. The book shows finished "
                            "runs only: fix the cause and run `make tutorials` again")
        tags = _tags(cell)
        in_solution = TAG_SOLUTION in tags
        if open_ex is not None and open_ex.n_solution_cells and not in_solution:
            close_solution()
        if not in_solution and TAG_EXERCISE not in tags:
            open_ex = None
        if TAG_EXERCISE in tags:
            if in_solution:
                raise BookError(f"{_where(name, i)} is tagged both 'exercise' and 'solution'")
            ex, body = parse_exercise(cell, name, i)
            if ex.number in seen:
                raise BookError(f"{_where(name, i)}: Exercise {ex.number} twice in {name}")
            seen.add(ex.number)
            fence = _fence(body)
            src = (f"{fence}{{exercise}} {ex.number} · {ex.title}\n:label: {ex.label}\n"
                   f":nonumber:\n\n{body}\n{fence}")
            new = _markdown_cell(src, nbformat)
            new.metadata["tags"] = tags
            add(new, i)
            info.exercises.append(ex)
            open_ex = ex
            continue
        if in_solution:
            if open_ex is None:
                raise BookError(f"{_where(name, i)} is tagged 'solution' but follows no "
                                "exercise: a solution's cells come right after the cell "
                                "tagged 'exercise' they solve")
            if open_ex.n_solution_cells == 0:
                add(_markdown_cell(
                    f"```{{solution-start}} {open_ex.label}\n:label: sol-{open_ex.label[3:]}\n"
                    f":class: dropdown\n```", nbformat))
            open_ex.n_solution_cells += 1
        if TAG_CHECKPOINT in tags:
            info.n_checkpoints += 1
        add(cell, i)
    if open_ex is not None and open_ex.n_solution_cells:
        close_solution()
    nb.cells = cells
    if terms:
        found = terms_used(nb, terms)
        if found:
            refs = ", ".join(f"{{term}}`{t}`" for t in found)
            box = _markdown_cell(f"```{{seealso}}\n**Terms on this page** "
                                 f"(see the [glossary](../glossary.md)): {refs}\n```", nbformat)
            first_md = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
            nb.cells.insert(first_md + 1, box)
            origin.insert(first_md + 1, None)
    info.cell_map = origin
    for c in nb.cells:  # ids of the inserted cells; nbformat 4.5 wants them unique
        c.pop("id", None)
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb, info


# ------------------------------------------------------------------ glossary
def glossary_terms(path: Path | None = None) -> list[str]:
    """The terms of the ``{glossary}`` block of ``book/glossary.md``, in order."""
    text = (path or BOOK_SOURCES / "glossary.md").read_text(encoding="utf-8")
    m = re.search(r"^(`{3,})\{glossary\}[^\n]*\n(.*?)^\1\s*$", text, re.M | re.S)
    if not m:
        raise BookError(f"{path}: no ```{{glossary}} block")
    return [line.strip() for line in m[2].splitlines()
            if line.strip() and not line[0].isspace() and not line.startswith(":")]


def terms_used(nb, terms) -> list[str]:
    """Glossary terms that the notebook's markdown text uses (the term itself, any
    case, as a whole word, or one of :data:`TERM_ALIASES`), in glossary order."""
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    found = []
    for term in terms:
        patterns = [r"(?<![\w-])" + re.escape(term) + r"(?![\w-])"] + TERM_ALIASES.get(term, [])
        if any(re.search(p, text, 0 if p in TERM_ALIASES.get(term, []) else re.I)
               for p in patterns):
            found.append(term)
    return found


# ------------------------------------------------------------ generated pages
def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _min(x) -> str:
    return "not given" if x is None else f"{x} min"


def notebook_table(infos: list[NotebookInfo]) -> str:
    """Markdown table: each notebook's page, time estimates, exercises and checkpoints."""
    rows = ["| notebook | to work through | exercises | checkpoints |",
            "| --- | --- | --- | --- |"]
    for nb in infos:
        ex = (f"{len(nb.exercises)} ({_min(nb.minutes_exercises)})" if nb.exercises
              else "none")
        rows.append(f"| [{nb.title}](notebooks/{nb.name}.ipynb) | {_min(nb.minutes_work)} | "
                    f"{ex} | {nb.n_checkpoints or 'none'} |")
    return "\n".join(rows) + "\n"


def _ex_minutes(nb: NotebookInfo, ex: Exercise) -> int:
    """An exercise's minutes: its own ``(about m min)``, else the notebook's exercise
    time shared equally."""
    if ex.minutes is not None:
        return ex.minutes
    return round((nb.minutes_exercises or 0) / max(1, len(nb.exercises)))


def day_plan(infos: list[NotebookInfo], *, start: int = DAY_START, end: int = DAY_END):
    """A one-day plan from the notebooks' time estimates.

    Sessions: a welcome and setup check, then one session per notebook (its time to
    work through plus the minutes it gives its exercises, less those of the exercises
    left as homework), then a wrap-up; a coffee break at the notebook
    boundary nearest 10:30 and 15:00 and lunch at the one nearest 12:30. When the day
    would end after ``end``, the longest exercises (the later notebook's first on ties)
    become homework until it fits.

    Returns ``(rows, homework, overrun)``: ``rows`` are ``(start, minutes, what,
    notebook or None)``; ``homework`` the ``(notebook, exercise)`` pairs left for after
    the day; ``overrun`` the minutes past ``end`` that remain even then (0 when it fits).
    Raises BookError when a notebook gives no ``**Time:**`` line.
    """
    missing = [nb.name for nb in infos if nb.minutes_work is None]
    if missing:
        raise BookError("no '**Time:** about N min to work through, M min for the "
                        f"exercises.' line in the first markdown cell of {', '.join(missing)}")
    homework: list = []

    def session_minutes(nb):
        # the notebook's own estimate, less the exercises left as homework
        left = sum(_ex_minutes(nb, e) for n, e in homework if n is nb)
        return nb.minutes_work + max(0, (nb.minutes_exercises or 0) - left)

    def layout():
        blocks = [("Welcome; everyone runs `make lab` and the first cells of 01", WELCOME_MIN,
                   None)]
        blocks += [(nb.title, session_minutes(nb), nb) for nb in infos]
        blocks.append(("Wrap-up: what the numbers mean for a new patient's slide; questions",
                       WRAP_UP_MIN, None))
        # breaks at notebook boundaries, in time order: a break goes at the boundary
        # nearer its target time than the next one is (coffee only within an hour of it)
        targets = [(10 * 60 + 30, "Coffee", COFFEE_MIN), (12 * 60 + 30, "Lunch", LUNCH_MIN),
                   (15 * 60, "Coffee", COFFEE_MIN)]
        rows, t = [], start
        for i, (what, m, nb) in enumerate(blocks):
            rows.append((t, m, what, nb))
            t += m
            if i == len(blocks) - 1:
                break
            nxt = t + blocks[i + 1][1]
            while targets and abs(t - targets[0][0]) <= abs(nxt - targets[0][0]):
                target, label, minutes = targets.pop(0)
                if label == "Lunch" or abs(t - target) <= 60:
                    rows.append((t, minutes, label, None))
                    t += minutes
                    break
        return rows, t

    rows, finish = layout()
    while finish > end:
        left = [(nb, e) for nb in infos for e in nb.exercises
                if (nb.name, e.number) not in {(h[0].name, h[1].number) for h in homework}]
        if not left:
            break
        nb, e = max(left, key=lambda p: (_ex_minutes(*p), p[0].name, p[1].number))
        homework.append((nb, e))
        rows, finish = layout()
    return rows, homework, max(0, finish - end)


def plan_markdown(infos: list[NotebookInfo]) -> str:
    """The teacher page's generated part: the plan of the day and the exercise list."""
    try:
        rows, homework, overrun = day_plan(infos)
    except BookError as err:
        return (f"```{{warning}}\nNo plan: {err}. Add the line to each notebook (see "
                "the tutorials' conventions) and build the book again.\n```\n")
    hw = {(nb.name, e.number) for nb, e in homework}
    out = ["| start | minutes | session | exercises in class |", "| --- | --- | --- | --- |"]
    for t, m, what, nb in rows:
        if nb is None:
            out.append(f"| {_hhmm(t)} | {m} | {what} | |")
            continue
        ex = ", ".join(f"{{ref}}`{e.number} <{e.label}>` ({_ex_minutes(nb, e)} min)"
                       for e in nb.exercises if (nb.name, e.number) not in hw) or "none"
        out.append(f"| {_hhmm(t)} | {m} | [{nb.title}](notebooks/{nb.name}.ipynb) | {ex} |")
    end_t = rows[-1][0] + rows[-1][1]
    out.append("")
    out.append(f"The day ends at {_hhmm(end_t)}. Each notebook's minutes are its "
               "`**Time:**` line: the time to work through it plus its exercises.")
    if homework:
        out.append(" To end by " + _hhmm(DAY_END) + ", these exercises are left as homework "
                   "(the longest first): " + ", ".join(
                       f"{{ref}}`{e.number} <{e.label}>` ({_ex_minutes(nb, e)} min)"
                       for nb, e in homework) + ".")
    if overrun:
        out.append(f" Even without exercises the day runs {overrun} min past "
                   f"{_hhmm(DAY_END)}: spread it over two days, or run notebooks 04 and 05 "
                   "as demonstrations.")
    out.append("\n\n### Every exercise\n")
    out.append("| exercise | minutes | notebook |")
    out.append("| --- | --- | --- |")
    n = 0
    for nb in infos:
        for e in nb.exercises:
            n += 1
            mins = _min(e.minutes) + (" (homework in the plan)" if (nb.name, e.number) in hw
                                      else "")
            out.append(f"| {{ref}}`{e.number} · {e.title} <{e.label}>` | {mins} | {nb.number} |")
    if not n:
        out = out[:-3] + ["\n\n### Every exercise\n",
                          "The notebooks this book was built from have no cells tagged "
                          "`exercise`."]
    return "\n".join(out) + "\n"


def run_markdown(infos: list[NotebookInfo], profile: str, executed: Path) -> str:
    """Where the pages come from: profile, parameters, each notebook's run time."""
    out = [f"The pages show the notebooks as `make tutorials` executed them with the "
           f"`{profile}` profile (`{executed}`). Each notebook's run time, from papermill's "
           "record in the executed notebook:", "",
           "| notebook | run time | checkpoints | exercises |", "| --- | --- | --- | --- |"]
    total = 0.0
    for nb in infos:
        d = "not recorded" if nb.duration_s is None else f"{nb.duration_s:.0f} s"
        total += nb.duration_s or 0
        out.append(f"| {nb.number} | {d} | {nb.n_checkpoints} | {len(nb.exercises)} |")
    out.append("")
    out.append(f"Together {total / 60:.1f} min of notebook time (two notebooks may have run "
               "side by side, so the command itself took less; with an empty cache the "
               "first run also cuts the patches and computes the image features).")
    params = next((nb.parameters for nb in infos if nb.parameters), {})
    if params:
        keep = {k: v for k, v in params.items() if k not in ("OUTPUT_DIR",)}
        out.append("\nParameters of the run: " + ", ".join(
            f"`{k} = {v!r}`" for k, v in keep.items()) + ".")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- build
def executed_notebooks(tutorials, profile: str, sources: Path | None = NOTEBOOKS,
                       *, allow_stale: bool = False) -> list[Path]:
    """The executed notebooks of ``<tutorials>/<profile>/executed``, one per numbered
    notebook of ``sources`` (all found there when ``sources`` is None).

    Raises BookError naming what is missing or out of date and the command that makes it.
    """
    import nbformat

    folder = Path(tutorials) / profile / "executed"
    make = (f"run `make tutorials PROFILE={profile}` first (it executes the notebooks into "
            f"{folder}; a few minutes on a CPU with the quick profile)")
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb")) if folder.is_dir() else []
    if not found:
        raise BookError(f"no executed notebooks in {folder}: {make}")
    if sources is None:
        return found
    wanted = sorted(Path(sources).glob("[0-9][0-9]_*.ipynb"))
    have = {p.name: p for p in found}
    missing = [p.stem for p in wanted if p.name not in have]
    if missing:
        raise BookError(f"{folder} lacks the executed {', '.join(missing)}: {make}")
    stale = []
    for src in wanted:
        a = [c.source for c in nbformat.read(src, as_version=4).cells]
        b = [c.source for c in nbformat.read(have[src.name], as_version=4).cells
             if "injected-parameters" not in _tags(c)]
        if a != b:
            stale.append(src.stem)
    if stale and not allow_stale:
        raise BookError(f"the executed {', '.join(stale)} in {folder} differ from "
                        f"notebooks/ (edited since the run): {make}, or build from the old "
                        "run with --allow-stale")
    return [have[p.name] for p in wanted]


def _stage(src: Path, executed: list[Path], profile: str, executed_dir: Path):
    import nbformat

    shutil.copytree(BOOK_SOURCES, src, ignore=shutil.ignore_patterns("__pycache__"))
    terms = glossary_terms(src / "glossary.md")
    (src / "notebooks").mkdir()
    infos = []
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        staged, info = prepare_notebook(nb, path.stem, terms)
        nbformat.write(staged, src / "notebooks" / path.name)
        infos.append(info)
    gen = src / "_generated"
    gen.mkdir()
    (gen / "notebooks.md").write_text(notebook_table(infos), encoding="utf-8")
    (gen / "plan.md").write_text(plan_markdown(infos), encoding="utf-8")
    (gen / "run.md").write_text(run_markdown(infos, profile, executed_dir), encoding="utf-8")
    return infos


def sphinx_build(src: Path, out: Path, doctrees: Path, *, quiet: bool = True) -> list[str]:
    """Build ``src`` into ``out`` as HTML; returns Sphinx's warnings (one string each)."""
    import warnings as pywarnings

    from sphinx import deprecation
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace, patch_docutils

    warnings = io.StringIO()

    class Tee(io.StringIO):
        def write(self, s):
            if not quiet:
                sys.stderr.write(s)
            return warnings.write(s)

    # the theme and extensions still use Sphinx API announced for removal in a later
    # Sphinx (their business, not a problem of the book): silence those notices here only
    removed_later = tuple(getattr(deprecation, n) for n in dir(deprecation)
                          if n.startswith("RemovedInSphinx"))
    with pywarnings.catch_warnings(), patch_docutils(src), docutils_namespace():
        for category in removed_later:
            pywarnings.simplefilter("ignore", category)
        app = Sphinx(str(src), str(src), str(out), str(doctrees), "html",
                     status=None if quiet else sys.stdout, warning=Tee(),
                     freshenv=True, verbosity=0)
        app.build(force_all=True)
    return [w for w in re.split(r"\n(?=\S)", warnings.getvalue().strip()) if w.strip()]


def _where_in_executed(warning: str, src: Path, executed: list[Path], infos) -> str:
    """A Sphinx warning about the book's copy of a notebook, pointed at the executed
    notebook and its cell (myst-nb numbers a notebook's lines (cell + 1) * 10000 + line); a
    warning about a page of book/ is pointed at that file."""
    warning = re.sub(r"\x1b\[[0-9;]*m", "", warning)
    by_name = {p.stem: (p, info) for p, info in zip(executed, infos)}

    def notebook(m):
        path, info = by_name.get(m[1], (None, None))
        if path is None:
            return m[0]
        staged = int(m[2]) // 10000 - 1
        cell = info.cell_map[staged] if 0 <= staged < len(info.cell_map) else None
        return f"{path}, " + (f"cell {cell}" if cell is not None else
                              f"a cell the book added after cell "
                              f"{next((c for c in reversed(info.cell_map[:staged]) if c is not None), 0)}")

    warning = re.sub(re.escape(str(src / "notebooks")) + r"/(\w+)\.ipynb:(\d+)", notebook,
                     warning)
    return warning.replace(str(src) + "/", str(BOOK_SOURCES) + "/")


def build(tutorials="outputs/tutorials", profile: str = "quick", out="outputs/book", *,
          sources: Path | None = NOTEBOOKS, allow_stale: bool = False,
          quiet: bool = True) -> dict:
    """Build the book from ``<tutorials>/<profile>/executed`` into ``out``.

    Returns ``{"index": path of index.html, "notebooks": [NotebookInfo], "seconds": s}``.

    Raises
    ------
    BookError
        Missing, failed or out-of-date executed notebooks, malformed exercise cells, or
        Sphinx warnings (listed; the previous book, if any, is left as it was).
    """
    t0 = time.time()
    executed_dir = Path(tutorials).resolve() / profile / "executed"
    executed = executed_notebooks(Path(tutorials).resolve(), profile, sources,
                                  allow_stale=allow_stale)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.building-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        infos = _stage(tmp / "src", executed, profile, executed_dir)
        html = tmp / "html"
        warnings = [_where_in_executed(w, tmp / "src", executed, infos)
                    for w in sphinx_build(tmp / "src", html, tmp / "doctrees", quiet=quiet)]
        if warnings:
            raise BookError(f"Sphinx reported {len(warnings)} warning(s); the book was not "
                            "written:\n" + "\n".join(warnings))
        for junk in (".buildinfo", ".buildinfo.bak", "_sources"):
            p = html / junk
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        old = None
        if out.exists():
            old = tmp / "previous"
            os.replace(out, old)
        os.replace(html, out)
    return {"index": out / "index.html", "notebooks": infos, "seconds": time.time() - t0,
            "replaced": old is not None}


# ------------------------------------------------------ the book's Sphinx extension
def setup(app):
    """Sphinx extension (listed in book/conf.py): exercise and solution titles read
    "Exercise 02.1 · title" and "Solution to Exercise 02.1 · title", as the notebooks
    write them, instead of sphinx-exercise's "Exercise (02.1 · title)" for unnumbered
    exercises."""
    from docutils import nodes
    from sphinx.transforms.post_transforms import SphinxPostTransform
    from sphinx_exercise.nodes import exercise_node, solution_node

    class PlainExerciseTitles(SphinxPostTransform):
        default_priority = 25  # after sphinx-exercise's title post-transforms (20, 21)

        def run(self):
            for node in list(self.document.findall(
                    lambda n: isinstance(n, (exercise_node, solution_node)))):
                if not node.children or not isinstance(node.children[0], nodes.title):
                    continue
                title = node.children[0]
                for parent in [title, *title.findall(nodes.reference)]:
                    kids = parent.children
                    opening = next((c for c in kids if isinstance(c, nodes.Text)
                                    and str(c) == " ("), None)
                    if opening is not None and isinstance(kids[-1], nodes.Text) \
                            and str(kids[-1]) == ")":
                        parent.remove(kids[-1])
                        parent.replace(opening, nodes.Text(" "))

    app.add_post_transform(PlainExerciseTitles)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tutorials", default="outputs/tutorials",
                    help="the folder `make tutorials` wrote (OUT); default outputs/tutorials")
    ap.add_argument("--profile", default="quick", help="whose executed notebooks (PROFILE)")
    ap.add_argument("--out", default="outputs/book", help="where the site goes")
    ap.add_argument("--allow-stale", action="store_true",
                    help="build even if notebooks/ changed since the notebooks were executed")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Sphinx's progress")
    args = ap.parse_args(argv)
    try:
        res = build(args.tutorials, args.profile, args.out, allow_stale=args.allow_stale,
                    quiet=not args.verbose)
    except BookError as err:
        print(f"make book: {err}", file=sys.stderr)
        return 1
    n_ex = sum(len(nb.exercises) for nb in res["notebooks"])
    print(f"Book of {len(res['notebooks'])} notebooks ({n_ex} exercises) built in "
          f"{res['seconds']:.0f} s" + (", replacing the previous one" if res["replaced"] else "")
          + f".\nOpen it here: {res['index']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
