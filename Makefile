# SegScope: `make run` opens the app on the built-in demo, `make test` runs the test suite.
# Both create the virtual environment in .venv and install SegScope into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.segscope-installed

.PHONY: setup run test test-all bench clean docs lint

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs,beam]'
	touch $(STAMP)

run: setup
	$(BIN)/segscope

# Two pytest sessions: TensorFlow and QtWebEngine's WebGL (Mesa) cannot share a process.
# Tests marked slow are left out here; test-all runs them too.
test: setup
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs
	$(BIN)/python -m pytest -m "not qt and not slow"
	$(BIN)/python -m pytest -m "qt and not slow"

test-all: setup
	$(BIN)/python -m pytest -m "not qt"
	$(BIN)/python -m pytest -m "qt"

# The documentation site (mkdocs.yml, docs/) into build/site; any warning fails it.
# NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner, printed on every build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

# Lint and type gates (make test runs them first): ruff's rules, ruff's formatting, mypy.
# MYPY_MODULES is what mypy checks, by installed names: the library and the Qt-free app
# (the views are left out: PyQt6's stubs make every widget accessor Optional). mypy reads
# the folders through relative links build/mypy/segscope/{analysis,app} (see [tool.mypy]).
MYPY_MODULES = segscope.analysis \
	segscope.app.session segscope.app.service segscope.app.state segscope.app.labels \
	segscope.app.events segscope.app.wiring segscope.app.plot_controller segscope.app.jobs \
	segscope.app.child_process segscope.app.compute_process segscope.app.projection_process \
	segscope.app.controller segscope.app.session_file segscope.app.session_export segscope.app.find_similar \
	segscope.app.neuroglancer_bridge segscope.app.viewer_sync segscope.app.cli segscope.app.main \
	segscope.app.cli_pipeline segscope.app.cli_analysis segscope.app.cli_args segscope.app.file_server \
	segscope.app.cli_classify

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p build/mypy/segscope
	ln -sfn ../../../analysis build/mypy/segscope/analysis
	ln -sfn ../../../app build/mypy/segscope/app
	$(BIN)/mypy $(addprefix -p ,$(MYPY_MODULES))

bench: setup
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
