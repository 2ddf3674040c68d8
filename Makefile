# One command sets up and runs the demo (`make demo`); one sets up and runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/mace-mf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/mace-mf

demo: setup
	$(BIN)/mace-mf train recipes/quickstart.yaml --out runs/quickstart --overwrite

test: setup
	$(BIN)/ruff check mace_mf tests scripts
	# Two workers (pytest-xdist), one test file each: the suite's CPU time is about 12 min on one core.
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check mace_mf tests scripts
	$(BIN)/ruff format --check mace_mf tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
