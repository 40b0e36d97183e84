# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
# torch is installed first and pinned (2.13.0, the CPU build on the project machines' disk); pyproject.toml
# declares only a range (torch>=2.2), which that build satisfies.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gcmoe-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test install benchmarks clean test-encoders

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3 to use another 3.11+)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,formats-test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gcmoe demo $(ARGS)

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each with one torch thread: most tests are small,
# where a second thread buys nothing, so 2 workers take 4.5-5 min on 2 cores against 11 min for 1 process with
# 2 threads (measured). PYTEST_WORKERS=0 runs it in this process (torch's own thread count), e.g. with a debugger.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	if [ "$(PYTEST_WORKERS)" = 0 ]; then $(BIN)/python -m pytest $(PYTEST_ARGS); \
	else OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS); fi

# Foundation-model encoders (timm, open_clip) in their own venv: they need torchvision, which does not import
# beside the CPU torch 2.13.0 of .venv. torch 2.14.1 + torchvision 0.29.1 lie on the project machines' disk;
# the constraints file stops timm/open_clip from moving torch. The project's other dependencies are read from
# pyproject.toml (its torch range left out), then the project itself goes in without dependencies.
ENC_VENV := .venv-encoders
ENC_BIN := $(ENC_VENV)/bin
ENC_STAMP := $(ENC_VENV)/.gcmoe-installed
ENC_TORCH := torch==2.14.1 torchvision==0.29.1

$(ENC_STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3 to use another 3.11+)"; exit 1; }
	test -x $(ENC_BIN)/python || $(PYTHON) -m venv $(ENC_VENV)
	$(ENC_BIN)/python -m pip install --quiet --upgrade pip
	printf '%s\n' $(ENC_TORCH) > $(ENC_VENV)/constraints.txt
	$(ENC_BIN)/python -m pip install --quiet -c $(ENC_VENV)/constraints.txt $(ENC_TORCH)
	$(ENC_BIN)/python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  deps = p['dependencies'] + p['optional-dependencies']['encoders'] + p['optional-dependencies']['test']; \
	  print('\n'.join(d for d in deps if re.split(r'[^A-Za-z0-9_.-]', d)[0].lower() != 'torch'))" \
	  > $(ENC_VENV)/requirements.txt
	$(ENC_BIN)/python -m pip install --quiet -c $(ENC_VENV)/constraints.txt -r $(ENC_VENV)/requirements.txt
	$(ENC_BIN)/python -m pip install --quiet --no-deps -e .
	touch $(ENC_STAMP)

test-encoders: $(ENC_STAMP)
	$(ENC_BIN)/python -m pytest tests/extras $(PYTEST_ARGS)

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/demo.py

clean:
	rm -rf $(VENV) gcmoe_demo .pytest_cache
