# SegScope: `make run` opens the app on the built-in demo, `make test` runs the test suite.
# Both create the virtual environment in .venv and install SegScope into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.segscope-installed

.PHONY: setup run test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(BIN)/segscope

test: setup
	$(BIN)/python -m pytest

# The default run skips tests marked slow; this runs them too.
test-all: setup
	$(BIN)/python -m pytest -m ''

bench: setup
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
