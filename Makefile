# fskd: `make demo` runs the main job on the offline default, `make test` runs the tests.
# Both create .venv on first use and install fskd with the pinned torch (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data
BIN := $(VENV)/bin

.PHONY: install demo test smoke test-all lint typecheck bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[offline,dev,docs]'
	touch $@

demo: install
	$(BIN)/fskd demo --data-root $(DATA) --out runs/demo

test: install
	$(BIN)/python -m pytest -q

# A quick tier for a first contribution: synthetic stores and tiny models only, no dataset encoding.
SMOKE := tests/test_layering.py tests/test_store.py tests/test_eval.py tests/test_cli.py tests/test_bench.py \
	tests/test_faults_errors.py tests/test_docs.py
smoke: install
	$(BIN)/python -m pytest -q $(SMOKE)

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: install typecheck
	$(BIN)/ruff format --check fskd tests benchmarks examples docs/gen_reference.py docs/gen_results.py
	$(BIN)/ruff check fskd tests benchmarks examples

# mypy, strict, on the typed modules (fskd/store, fskd/config.py, fskd/registry.py): [tool.mypy] in pyproject.toml
typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/run_all.py

# The documentation site (mkdocs.yml): every warning is an error; the output is site/.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf runs .pytest_cache site
