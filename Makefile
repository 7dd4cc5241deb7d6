# Two commands (see README.md):
#   make tutorials   run every notebook with papermill (PROFILE=quick by default; JOBS=1
#                    runs them one at a time, default 2 side by side where independent)
#   make test        run the test suite (the full suite, as CI runs it)
#   make test-fast   the suite without the tests marked slow
#   make book        the course book (a static site) from the notebooks `make tutorials`
#                    executed: outputs/book/index.html (BOOK_OUT to change)
#   make lab         JupyterLab on notebooks/ to run the tutorials cell by cell
#                    (LAB_ARGS="--no-browser --port 8890" on a remote machine)
# Both create ./.venv on first use with the pinned versions of requirements.txt
# (`make env` alone does only that).

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
INSTALLER ?= auto

.PHONY: tutorials test test-fast book lab env clean-venv

# venv, pip + uv, the pinned packages (uv; pip where uv fails), the package editable,
# the Jupyter kernel: tools/install_env.py (INSTALLER=pip for pip only)
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml tools/install_env.py
	$(PYTHON) tools/install_env.py --venv $(VENV) --installer $(INSTALLER)
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
