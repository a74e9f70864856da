# Every target sets up the virtual environment in .venv first (once; reused while pyproject.toml
# is unchanged), so `make demo` and `make test` work on a fresh clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

# No model weights can be downloaded here: tests and the demo never touch the Hugging Face hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint typecheck unit demo bench lambda-zip clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/bottleneck-demo

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
