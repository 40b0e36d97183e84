# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
# torch is installed first and pinned (2.13.0, the CPU build on the project machines' disk).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gcmoe-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test install benchmarks clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3 to use another 3.11+)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gcmoe demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) gcmoe_demo .pytest_cache
