"""The course book (mclstexp_lite._book, ``make book``): exercise cells become exercise
blocks with their solutions folded under them, the time lines feed the index and the
teacher's plan, bad notebooks are refused with the fix, and the site builds offline
without a single Sphinx warning, both from SYNTHETIC executed notebooks (with outputs:
text, a figure, a table) and from the committed notebooks themselves (their markdown)."""

from __future__ import annotations

import base64
import io
import re

import nbformat
import pytest

from mclstexp_lite import _book as book

from .conftest import REPO

REQUIRED_TERMS = ["PCC-ACG", "PCC-HEG", "MSE", "MAE", "contrastive loss", "CLIP loss",
                  "retrieval", "top-k", "linear probe", "frozen encoder", "fine-tuning",
                  "leave-one-section-out", "leave-one-patient-out", "ARI", "NMI",
                  "stain normalisation", "virtual spots"]


# ---------------------------------------------------------------- synthetic notebooks
def _png() -> str:
    """A small real PNG (a red square), base64 as notebooks store it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _code(source, outputs=(), tags=()):
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    cell.execution_count = 1
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _md(source, tags=()):
    cell = nbformat.v4.new_markdown_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _stdout(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def synthetic_notebook(number="01", *, exercises=True, time_line=True, work=20):
    """SYNTHETIC executed notebook: intro (time line), injected parameters, a figure, an
    HTML table, two exercises with solutions (markdown + code), a checkpoint."""
    intro = (f"# {number} · Synthetic {number}\n\n**What you will do.** Train with a "
             "contrastive loss and score PCC-HEG on a held-out section.\n")
    if time_line:
        intro += (f"\n**Time:** about {work} min to work through, {12 if exercises else 0} "
                  "min for the exercises.\n")
    cells = [
        _md(intro),
        _code("TOP_K = 50", tags=["parameters"]),
        _code("TOP_K = 50\nPROFILE = 'quick'\nOUTPUT_DIR = '/x'", tags=["injected-parameters"]),
        _code("print('trained')", [_stdout("trained\n")]),
        _code("fig", [{"output_type": "display_data", "metadata": {},
                       "data": {"image/png": _png(), "text/plain": "<Figure>"}}]),
        _code("table", [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                         "data": {"text/html": "<table><tr><th>method</th><th>PCC-HEG</th></tr>"
                                               "<tr><td>mclstexp</td><td>0.25</td></tr></table>",
                                  "text/plain": "table"}}]),
    ]
    if exercises:
        cells += [
            _md(f"**Exercise {number}.1: Neighbours and smoothing**\nRun the retrieval with "
                "`TOP_K = 5` and with `TOP_K = 200`. Which map is smoother? (about 5 min)",
                tags=["exercise"]),
            _md("Small *k* keeps the detail.", tags=["solution"]),
            _code("if SOLUTIONS:\n    print('k=5 noisier')", [_stdout("k=5 noisier\n")],
                  tags=["solution"]),
            _md("Back to the tutorial."),
            _code("checkpoint(True, 'loss below chance')",
                  [_stdout("checkpoint passed: loss below chance\n")], tags=["checkpoint"]),
            _md(f"**Exercise {number}.2: A second fold**\nAdd patient B. (about 7 min)",
                tags=["exercise"]),
            _code("if SOLUTIONS:\n    ex_fold = 'B'", tags=["solution"]),
        ]
    cells.append(_md("## Reading the numbers\n\nThe end."))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["papermill"] = {"duration": 42.5}
    return nb


def _write_run(root, notebooks: dict, profile="quick"):
    folder = root / profile / "executed"
    folder.mkdir(parents=True)
    for name, nb in notebooks.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    return root


@pytest.fixture(scope="module")
def synthetic_book(tmp_path_factory):
    """The book of three SYNTHETIC executed notebooks of 90 min each (plus 12 min of
    exercises where they have them): 01 and 03 with exercises, 02 without."""
    tmp = tmp_path_factory.mktemp("book")
    tut = _write_run(tmp / "tutorials", {
        "01_alpha": synthetic_notebook("01", work=90),
        "02_beta": synthetic_notebook("02", exercises=False, work=90),
        "03_gamma": synthetic_notebook("03", work=90)})
    res = book.build(tut, "quick", tmp / "book", sources=None)
    return tmp / "book", res


# --------------------------------------------------------------------- the site
def test_book_builds_with_a_page_per_notebook(synthetic_book):
    out, res = synthetic_book
    assert res["index"] == out / "index.html" and res["index"].exists()
    for name in ("01_alpha", "02_beta", "03_gamma"):
        assert (out / "notebooks" / f"{name}.html").exists()
    for page in ("install", "teacher", "glossary"):
        assert (out / f"{page}.html").exists(), page
    index = (out / "index.html").read_text()
    assert all(f"notebooks/{n}.html" in index for n in ("01_alpha", "02_beta", "03_gamma"))
    assert "102 min" not in index and "| 90 min" not in index and "90 min" in index
    assert not (out / "_sources").exists() and not (out / ".buildinfo").exists()
    # the run's own timing, read from papermill's record
    assert "42 s" in index


def test_exercises_become_blocks_with_folded_solutions(synthetic_book):
    out, _ = synthetic_book
    page = (out / "notebooks" / "01_alpha.html").read_text()
    assert page.count('<div class="exercise admonition"') == 2
    assert ">Exercise 01.1 · Neighbours and smoothing</p>" in page
    assert "Solution to<a class=\"reference internal\" href=\"#ex-01-2\"> Exercise 01.2 · A second fold</a>" in page
    # solutions: sphinx-exercise solution blocks, folded (a dropdown), holding the code
    sols = re.findall(r'<div class="(solution[^"]*)" id="sol-01-(\d)"', page)
    assert [n for _, n in sols] == ["1", "2"]
    assert all("dropdown" in cls for cls, _ in sols)
    first = page[page.index('id="sol-01-1"'):page.index("Back to the tutorial")]
    assert "Small <em>k</em> keeps the detail" in first and "k=5 noisier" in first
    assert "Back to the tutorial" not in first
    # checkpoints and outputs are there; the figure is a file of the site
    assert "tag_checkpoint" in page and "checkpoint passed: loss below chance" in page
    imgs = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
    assert imgs and all((out / "notebooks" / src).resolve().exists() for src in imgs)
    assert "<td>mclstexp</td>" in page  # the HTML table, not its text/plain


def test_notebook_without_exercises(synthetic_book):
    out, res = synthetic_book
    page = (out / "notebooks" / "02_beta.html").read_text()
    assert "exercise admonition" not in page and "solution dropdown" not in page
    assert "tag_checkpoint" not in page and "Reading the numbers" in page
    assert res["notebooks"][1].exercises == [] and res["notebooks"][1].minutes == 90


def test_notebooks_without_time_lines_get_no_invented_times():
    infos = [book.prepare_notebook(synthetic_notebook("01"), "01_a")[1],
             book.prepare_notebook(synthetic_notebook("02", time_line=False), "02_b")[1]]
    assert infos[1].minutes_work is None and infos[1].minutes is None
    table = book.notebook_table(infos)
    assert "| 20 min | 2 (12 min) | 1 |" in table and "| not given | 2 (not given) | 1 |" in table
    plan = book.plan_markdown(infos)
    assert plan.startswith("```{warning}\nNo plan:") and "02_b" in plan


def test_glossary_page_and_cross_references(synthetic_book):
    out, _ = synthetic_book
    glossary = (out / "glossary.html").read_text()
    for term in REQUIRED_TERMS:
        assert f'id="term-{term.replace(" ", "-")}"' in glossary, term
    page = (out / "notebooks" / "01_alpha.html").read_text()
    box = page[page.index("Terms on this page"):]
    box = box[:box.index("</div>")]
    for term in ("contrastive-loss", "PCC-HEG", "top-k", "retrieval"):
        assert f'../glossary.html#term-{term}"' in box, term


def test_site_loads_nothing_from_the_network(synthetic_book):
    out, _ = synthetic_book
    for page in out.rglob("*.html"):
        text = page.read_text()
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", text):
            src = re.search(r'(?:src|href)="([^"]+)"', tag)
            assert not (src and re.match(r"(https?:)?//", src[1])), (page.name, tag)


def test_teacher_plan_from_the_notebooks(synthetic_book):
    """The plan lists the exercises by number with the minutes of their '(about m
    min)', starts at 09:00, has coffee and lunch breaks and ends when the minutes add
    up to; every exercise is listed by title, linked to its block."""
    out, _ = synthetic_book
    teacher = (out / "teacher.html").read_text()
    plan = teacher[teacher.index('id="the-plan-of-the-day"'):teacher.index('id="before-the-day"')]
    assert "09:00" in plan and "Lunch" in plan and "Coffee" in plan
    for n in ("01.1", "01.2", "03.1", "03.2"):
        assert n in plan
    assert "02.1" not in plan
    assert "(5 min)" in plan and "(7 min)" in plan
    # 30 welcome + (102 + 90 + 102) + 15 wrap-up + 60 lunch + 2 x 15 coffee = 429 min
    assert "The day ends at 16:09" in plan
    assert 'href="notebooks/01_alpha.html#ex-01-1"' in plan
    assert "01.1 · Neighbours and smoothing" in plan


def test_rebuild_replaces_the_book_and_a_failed_build_leaves_it(tmp_path):
    tut = _write_run(tmp_path / "t", {"01_a": synthetic_notebook("01")})
    first = book.build(tut, "quick", tmp_path / "b", sources=None)
    assert not first["replaced"]
    (tmp_path / "b" / "mine.txt").write_text("x")
    second = book.build(tut, "quick", tmp_path / "b", sources=None)
    assert second["replaced"] and not (tmp_path / "b" / "mine.txt").exists()
    # a notebook whose markdown makes Sphinx warn: refused, the book stays as it was
    nb = synthetic_notebook("01")
    nb.cells.append(_md("A [link](nowhere.md) to a missing page."))
    tut2 = _write_run(tmp_path / "t2", {"01_a": nb})
    before = (tmp_path / "b" / "index.html").read_text()
    with pytest.raises(book.BookError, match=r"(?s)1 warning.*executed/01_a\.ipynb, cell 14: "
                       r"WARNING: 'myst' cross-reference target not found: 'nowhere\.md'"):
        book.build(tut2, "quick", tmp_path / "b", sources=None)
    assert (tmp_path / "b" / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "t", "t2"]  # no leftovers


# ---------------------------------------------------------------- tag handling, unit
def test_time_line_is_read():
    nb = synthetic_notebook("01")
    assert book.read_time(nb) == (20, 12)
    assert book.read_time(synthetic_notebook("01", time_line=False)) is None
    nb.cells[0].source = nb.cells[0].source.replace("**Time:** about 20 min",
                                                     "**Time:**  about 25 minutes")
    assert book.read_time(nb) == (25, 12)


def test_prepare_notebook_records_exercises_and_wraps_solutions():
    nb = synthetic_notebook("03")
    before = nbformat.writes(nb)
    staged, info = book.prepare_notebook(nb, "03_gamma")
    assert nbformat.writes(nb) == before  # the notebook given is left alone
    assert info.title == "03 · Synthetic 03" and (info.minutes_work, info.minutes_exercises) == (20, 12)
    assert [(e.number, e.title, e.minutes, e.n_solution_cells) for e in info.exercises] == [
        ("03.1", "Neighbours and smoothing", 5, 2), ("03.2", "A second fold", 7, 1)]
    assert info.n_checkpoints == 1 and info.duration_s == 42.5
    assert info.parameters == {"TOP_K": 50, "PROFILE": "quick", "OUTPUT_DIR": "/x"}
    src = [c.source for c in staged.cells]
    i = next(k for k, s in enumerate(src) if s.startswith("```{exercise} 03.1"))
    assert ":label: ex-03-1" in src[i] and "(about 5 min)" in src[i]
    assert src[i + 1].startswith("```{solution-start} ex-03-1") and ":class: dropdown" in src[i + 1]
    assert src[i + 2] == "Small *k* keeps the detail." and src[i + 3].startswith("if SOLUTIONS")
    assert src[i + 4] == "```{solution-end}\n```" and src[i + 5] == "Back to the tutorial."
    assert src[-2] == "```{solution-end}\n```"  # the last solution is closed too
    nbformat.validate(staged)


def test_exercise_body_with_a_code_fence_gets_a_longer_fence():
    nb = synthetic_notebook("01")
    ex = next(c for c in nb.cells if "exercise" in c.metadata.get("tags", []))
    ex.source += "\n```python\nTOP_K = 5\n```"
    staged, _ = book.prepare_notebook(nb, "01_a")
    block = next(c.source for c in staged.cells if "{exercise}" in c.source)
    assert block.startswith("````{exercise}") and block.endswith("\n````")


@pytest.mark.parametrize("change, match", [
    (lambda cells: cells.__setitem__(6, _code("x", tags=["exercise"])), "is a code cell"),
    (lambda cells: setattr(cells[6], "source", "Exercise: do this"),
     r"starts with a line '\*\*Exercise 01\.<n>"),
    (lambda cells: setattr(cells[6], "source", "**Exercise 02.1: wrong notebook**\nx"),
     "number it 'Exercise 01.<n>'"),
    (lambda cells: setattr(cells[11], "source", "**Exercise 01.1: again**\nx"), "twice"),
    (lambda cells: cells.insert(4, _code("y", tags=["solution"])), "follows no exercise"),
    (lambda cells: cells[3].outputs.append(nbformat.from_dict(
        {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []})),
     "cell 3 stopped with ValueError: boom.*make tutorials"),
])
def test_bad_notebooks_are_refused_with_the_fix(change, match):
    nb = synthetic_notebook("01")
    change(nb.cells)
    with pytest.raises(book.BookError, match=match):
        book.prepare_notebook(nb, "01_alpha")


def test_missing_or_stale_executed_notebooks_say_how_to_make_them(tmp_path):
    with pytest.raises(book.BookError, match=r"no executed notebooks in .*quick.*make tutorials"):
        book.executed_notebooks(tmp_path, "quick", None)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("01_a", "02_b"):
        nb = synthetic_notebook(name[:2])
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        nbformat.write(nb, src / f"{name}.ipynb")
    _write_run(tmp_path / "t", {"01_a": synthetic_notebook("01")})
    with pytest.raises(book.BookError, match=r"lacks the executed 02_b: run `make tutorials"):
        book.executed_notebooks(tmp_path / "t", "quick", src)
    nbformat.write(synthetic_notebook("02"), tmp_path / "t" / "quick" / "executed" / "02_b.ipynb")
    assert [p.stem for p in book.executed_notebooks(tmp_path / "t", "quick", src)] == [
        "01_a", "02_b"]
    edited = nbformat.read(src / "02_b.ipynb", as_version=4)
    edited.cells[3].source = "print('changed')"
    nbformat.write(edited, src / "02_b.ipynb")
    with pytest.raises(book.BookError, match="executed 02_b .* differ from notebooks/"):
        book.executed_notebooks(tmp_path / "t", "quick", src)
    assert len(book.executed_notebooks(tmp_path / "t", "quick", src, allow_stale=True)) == 2


def test_day_plan_leaves_the_longest_exercises_as_homework_when_the_day_is_too_short():
    infos = []
    for i in range(1, 7):
        _, info = book.prepare_notebook(synthetic_notebook(f"0{i}"), f"0{i}_n")
        infos.append(info)
    rows, homework, overrun = book.day_plan(infos)  # 6 x 32 min + welcome + wrap-up: fits
    assert homework == [] and overrun == 0
    assert rows[0][0] == book.DAY_START and [r[2] for r in rows].count("Lunch") == 1
    starts = [r[0] for r in rows]
    assert starts == sorted(starts)
    assert all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:]))  # no gaps, no overlaps
    for info in infos:
        info.minutes_work = 55
    rows, homework, overrun = book.day_plan(infos)
    assert homework and overrun == 0
    assert rows[-1][0] + rows[-1][1] <= book.DAY_END
    # the 7-minute exercises go first (the later notebooks' first on ties)
    assert [e.minutes for _, e in homework][:1] == [7] and homework[0][0].name == "06_n"
    for info in infos:
        info.minutes_work = 120
    _, homework, overrun = book.day_plan(infos)
    assert len(homework) == 12 and overrun > 0
    infos[2].minutes_work = None
    with pytest.raises(book.BookError, match="03_n"):
        book.day_plan(infos)


def test_glossary_has_the_required_terms_and_aliases_name_real_terms():
    terms = book.glossary_terms()
    assert set(REQUIRED_TERMS) <= set(terms)
    assert set(book.TERM_ALIASES) <= set(terms)
    assert len(terms) == len(set(terms))


def test_terms_used_finds_terms_and_aliases_in_markdown_only():
    nb = nbformat.v4.new_notebook(cells=[
        _md("We pick TOP_K neighbours, compare PCC-ACG and mse, and lay virtual spots."),
        _code("# ARI and NMI in a code comment do not count")])
    found = book.terms_used(nb, book.glossary_terms())
    assert found == [t for t in book.glossary_terms()
                     if t in ("top-k", "PCC-ACG", "MSE", "virtual spots")]


# ------------------------------------------------------ the committed notebooks
def test_committed_notebooks_build_into_a_book_without_warnings(tmp_path):
    """The notebooks of notebooks/ (without outputs, as committed) as the "executed" run:
    their markdown, exercise and solution cells must give a book with no warning."""
    import shutil

    folder = tmp_path / "t" / "quick" / "executed"
    folder.mkdir(parents=True)
    for nb in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        shutil.copy(nb, folder / nb.name)
    res = book.build(tmp_path / "t", "quick", tmp_path / "b")
    names = [nb.name for nb in res["notebooks"]]
    assert names == sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for info in res["notebooks"]:
        page = (tmp_path / "b" / "notebooks" / f"{info.name}.html").read_text()
        assert page.count('<div class="exercise admonition"') == len(info.exercises), info.name
        assert all(e.n_solution_cells >= 1 for e in info.exercises), info.name
