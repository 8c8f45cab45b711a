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

.PHONY: install test lint docs demo bench fuzz mutate clean

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

# Mutation testing of the core modules (mutmut; in-process tests only; not part of `make test`).
# Bounded and resumable: it stops after MUTATE_BUDGET seconds and the next run goes on from
# there; it prints each module's score. E.g. make mutate MODULES="schemes kernel" MUTATE_BUDGET=900
# (modules and options: tests/mutation/mutate.py --help; MUTATE_ARGS="--rerun --remap" after adding tests).
MODULES ?=
MUTATE_BUDGET ?= 10800
MUTATE_JOBS ?= 1
mutate: install
	POLYAK_IN_PROCESS_ONLY=1 nice -n 10 $(PY) tests/mutation/mutate.py --modules "$(MODULES)" \
		--budget $(MUTATE_BUDGET) --jobs $(MUTATE_JOBS) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build dist site mutants src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
