# Every target sets up the virtual environment in .venv first (once; reused while pyproject.toml
# is unchanged), so `make demo` and `make test` work on a fresh clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist); whole files per worker, so a module's fixtures are built
# once. 3 on the 2-core CI machine: with 2, the cores were busy 41 % of the suite's time (the rest
# is waiting: visibility timeouts, idle exits, restarts); 3 took pytest from 460 s to 370-386 s.
TEST_WORKERS ?= 3
# checkov pins old boto3/packaging/networkx, so it lives in a venv of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30

# No model weights can be downloaded here: tests and the demo never touch the Hugging Face hub.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup scan-setup test lint lint-infra typecheck unit demo bench bench-gpu lambda-zip deploy teardown clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(STAMP)

$(CHECKOV_VENV)/bin/checkov:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check 'checkov==$(CHECKOV_VERSION)'

scan-setup: $(CHECKOV_VENV)/bin/checkov

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The template and the Dockerfile: cfn-lint (errors and warnings) and checkov's policy scan.
lint-infra: setup scan-setup
	$(VENV)/bin/cfn-lint infra/cloudformation.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download -f infra/cloudformation.yaml -f Dockerfile

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck lint-infra
	CHECKOV=$(CHECKOV_VENV)/bin/checkov $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/bottleneck-demo

bench: setup
	$(PY) -m benchmarks.throughput $(BENCH_ARGS)

# Model only (fp32, bf16, bf16 + compile), compute path (CPU and GPU decode) and the feed row on a
# GPU, in under 8 minutes; a small set on the CPU. JSON and a table to $OUT, else build/.
bench-gpu: setup
	$(PY) -m benchmarks.gpu $(BENCH_ARGS)

# The producer Lambda's package: producer_lambda/ and bottleneck_contract/ (the runtime provides boto3).
lambda-zip: setup
	$(PY) -m producer_lambda.package build/producer_lambda.zip

# Build, push and deploy everything with the AWS CLI (see README, "Deploy"); teardown removes it.
deploy: setup
	infra/deploy.sh deploy

teardown:
	infra/deploy.sh teardown

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
