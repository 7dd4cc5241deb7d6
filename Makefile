# Two commands (see README.md):
#   make tutorials   run every notebook with papermill (PROFILE=quick by default; JOBS=1
#                    runs them one at a time, default 2 side by side where independent)
#   make test        run the test suite (the full suite, as CI runs it)
#   make test-fast   the suite without the tests marked slow
#   make book        the course book (a static site) from the notebooks `make tutorials`
#                    executed: outputs/book/index.html (BOOK_OUT to change)
#   make lab         JupyterLab on notebooks/ to run the tutorials cell by cell
#                    (LAB_ARGS="--no-browser --port 8890" on a remote machine)
# Both create ./.venv on first use with the pinned versions of requirements.txt.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= quick
OUT     ?= outputs/tutorials
JOBS    ?=
PYTEST_ARGS ?=
BOOK_OUT ?= outputs/book
BOOK_ARGS ?=
LAB_ARGS ?=

.PHONY: tutorials test test-fast book lab env clean-venv

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --prefix $(VENV) --name mclstexp_lite --display-name "mclstexp_lite" > /dev/null
	touch $@

env: $(VENV)/.installed

tutorials: $(VENV)/.installed
	$(PY) -m mclstexp_lite.tutorials --profile $(PROFILE) --out $(OUT) $(if $(JOBS),--jobs $(JOBS))

book: $(VENV)/.installed
	$(PY) -m mclstexp_lite._book --tutorials $(OUT) --profile $(PROFILE) --out $(BOOK_OUT) $(BOOK_ARGS)

lab: $(VENV)/.installed
	$(PY) -m mclstexp_lite._lab $(LAB_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
