# Two commands matter: `make demo` and `make test`. Each creates .venv if missing and installs the pinned stack.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU wheel of this exact version; GPU users pre-install the CUDA build (docs/install.md).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The suite runs on 2 pytest-xdist workers, a test file per worker at a time (module fixtures are built once): on the
# 2-core CI machine one process alone keeps about 1.1 cores busy (its tests wait on subprocesses, federations and
# imports), two fill both (DEVELOPERS.md#suite-time). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# Flower (the `fed` extra, and `fed-sim`: Ray for its Simulation Engine) goes in last with its own constraints: five
# of its pins differ from the main stack's (docs/federated.md#install); requirements/constraints-fed.txt is a freeze
# of the combined venv.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/constraints-fed.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[all,dev]"
	$(PY) -m pip install --quiet -c requirements/constraints-fed.txt -e ".[fed,fed-sim]"
	touch $(STAMP)

# The demo always starts fresh (runs/demo is the demo's own scratch directory).
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/vlmtrain run configs/recipes/demo.yaml --out runs/demo
	$(VENV)/bin/vlmtrain export runs/demo --format hf-llava --out runs/demo/hf-llava

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs build .pytest_cache
