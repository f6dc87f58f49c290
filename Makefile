# The two set-up commands the README shows are `make demo` and `make test`; both install into
# .venv first when needed. DATA_ROOT: the CLI's own rule (simclr.data.datasets.data_root): ./data when it
# holds anything, else ../shared/data when that folder exists, else ./data.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARCH    := $(shell uname -m)
DATA_ROOT ?= $(if $(wildcard data/*),$(abspath data),$(if $(wildcard ../shared/data),$(abspath ../shared/data),$(abspath data)))
export DATA_ROOT

# On x86_64 the CUDA-enabled wheels lying on this machine also run on the CPU.
ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch torchvision
endif

.PHONY: install demo test test-fast test-all bench lint clean report docs readme-check readme-update

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/simclr pretrain --config configs/demo.yaml

# lint + the whole suite, slow tests included (CI runs this target through .ci/run)
test: lint
	$(BIN)/python -m pytest -q --durations=12 tests

test-all: test

# without the tests marked slow
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

# ruff's small rule set (pyproject.toml) and the layering contract (import-linter)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples scripts train.py
	$(BIN)/lint-imports

# every relative link in README.md and docs/*.md resolves (files and #headings)
docs: $(STAMP)
	$(BIN)/python scripts/check_links.py

# re-run the commands behind the README's (and docs/') numbers, fail with a diff when one differs
readme-check: $(STAMP)
	$(BIN)/python scripts/readme_check.py

# the same, and rewrite the numbers (and the date) in place
readme-update: $(STAMP)
	$(BIN)/python scripts/readme_check.py --update

# report.html of the newest demo run (make demo first)
report: $(STAMP)
	@run=$$(ls -td logs/demo/*/ 2>/dev/null | head -1); \
	if [ -z "$$run" ]; then echo "no demo run under logs/demo: run 'make demo' first" >&2; exit 2; fi; \
	$(BIN)/simclr report "$$run"

bench: $(STAMP)
	$(BIN)/simclr bench --arch resnet18 --width 16 --data cifar10 --batch_size 64 --steps 10

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
