# Two commands (see README.md):
#   make tutorials   run every notebook with papermill (PROFILE=quick by default; JOBS=1
#                    runs them one at a time, default 2 side by side where independent)
#   make test        run the test suite (the full suite, as CI runs it)
#   make test-fast   the suite without the tests marked slow
# Both create ./.venv on first use with the pinned versions of requirements.txt.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= quick
OUT     ?= outputs/tutorials
JOBS    ?=
PYTEST_ARGS ?=

.PHONY: tutorials test test-fast env clean-venv

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

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
