#!/bin/sh
# The GPU check as one command (`make gpu-check` runs this), for a machine with a CUDA GPU and no registry: its
# own python3 (torch with CUDA, transformers, peft ...), plus DeepSpeed and what it needs that the machine lacks,
# installed from the wheels in .whl/ (`make gpu-wheels` puts them there). Arguments go to tests/gpu/check.py.
set -e
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 400 python3 -m tests.gpu.check "$@"
