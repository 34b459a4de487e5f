#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv and install mgll into it.
# torch and torchvision are installed together in one pip call so pip picks a matching pair;
# a lone install of open_clip/timm could otherwise pull a torch that the torchvision build rejects.
# EXTRAS selects optional dependency groups (default: dev,mllm: the tests' tools and peft, which the
# quickstart's MCQ stage trains LoRA with), e.g. EXTRAS=all bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  .venv/bin/python -m pip install torch torchvision
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS:-dev,mllm}]"
if .venv/bin/python -c "import deepspeed, torch, sys; sys.exit(torch.cuda.is_available())" >/dev/null 2>&1; then
  # DeepSpeed on CPU JIT-builds a shared-memory comm op (~50 s) on first use; build it once, into the venv
  # (scripts/test.sh and the tests point TORCH_EXTENSIONS_DIR there), so runs and tests only load it
  DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c \
    "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || echo "warning: DeepSpeed CPU comm op did not build (gloo is used instead)"
fi
bash scripts/install_open_flamingo.sh  # the medflamingo host's code: pinned to torch 2.0.1 upstream, so installed --no-deps
.venv/bin/python -c "import mgll, torch, torchvision, open_clip; print('mgll environment ready: torch', torch.__version__, '/ torchvision', torchvision.__version__, '/ open_clip', open_clip.__version__)"
