# Two entry points for a fresh machine: `make demo` (a local swarm training on the embedded corpus) and
# `make test` (the test suite). Both create .venv and install cfnode into it first.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

.PHONY: demo test test-load install lint

install: $(VENV)/.installed

# torch is pinned first so pip does not resolve an open `torch` requirement to a multi-GB CUDA build; then cfnode
# with its test dependencies (transformers among them, which needs no torch of its own).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# transformers (a test dependency) must not have swapped the pinned CPU torch for another build.
	$(BIN)/python -c "import sys, torch; v = torch.__version__; sys.exit(None if v.startswith('2.13.0') else \
		f'torch {v} replaced the pinned 2.13.0')"
	touch $@

demo: install
	$(BIN)/cfnode swarm

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30

# The failure-path tests on a loaded machine: the chaos and the netns test beside two busy processes, five runs in a
# row; the first failure stops it.
RUNS ?= 5
test-load: install
	for run in $$(seq $(RUNS)); do echo "run $$run of $(RUNS)"; CFNODE_TEST_BUSY=2 $(BIN)/python -m pytest -q \
		-p no:cacheprovider tests/integration/test_chaos.py tests/integration/test_netns.py || exit 1; done

lint: install
	$(BIN)/ruff check .
