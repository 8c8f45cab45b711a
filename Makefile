# polyak — the two commands of the README: `make demo` and `make test`.
# Everything they need is installed by `make install` into .venv (pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polyak-installed
# Keras 3 runs on the torch backend here; respect a backend the user has chosen.
export KERAS_BACKEND ?= torch
# Keras fixes its backend when it is imported, so `make test` runs the tests marked `keras`
# once more in one pytest process per other backend.
KERAS_BACKENDS := torch jax tensorflow

.PHONY: install test lint docs demo bench fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

test: install lint docs
	$(PY) -m pytest -n 2 -q
	@set -e; for backend in $(filter-out $(KERAS_BACKEND),$(KERAS_BACKENDS)); do \
	  echo "tests marked keras, on the $$backend backend:"; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest -n 2 -q -m keras; \
	done

lint: install
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (mkdocs-material + mkdocstrings) into site/, strictly: a broken link,
# a missing reference or a docstring that fails to render fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

demo: install
	$(VENV)/bin/polyak demo

bench: install
	$(PY) benchmarks/run.py

# Bounded coverage-guided fuzzing of the format readers (default 300 s); e.g.
# make fuzz FUZZ_ARGS="-max_total_time=60 --formats safetensors,npz"
fuzz: install
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt atheris
	$(PY) tests/fuzz/fuzz_formats.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
