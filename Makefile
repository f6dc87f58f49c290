# The two set-up commands the README shows are `make demo` and `make test`; both install into
# .venv first when needed. DATA_ROOT defaults to ../shared/data when that folder exists.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARCH    := $(shell uname -m)
DATA_ROOT ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),$(abspath data))
export DATA_ROOT

# On x86_64 the CUDA-enabled wheels lying on this machine also run on the CPU.
ifeq ($(ARCH),x86_64)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS := torch torchvision
endif

.PHONY: install demo test test-fast test-all bench lint clean report

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/simclr pretrain --config configs/demo.yaml

# fast suite (< ~10 min on 2 CPU cores) + the slow tests (CI runs this target)
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/simclr bench --arch resnet18 --width 16 --data cifar10 --batch_size 64 --steps 10

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
