#!/usr/bin/env bash
# Create or update .venv, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,dicom,fundus,mllm,quant,demo,deepspeed} bash scripts/setup.sh
bash scripts/install_lmms_eval.sh  # .venv-lmms for tests/test_mcq_lmms_eval.py (~100 s once; that test installs it too if missing)
bash scripts/install_clip_benchmark.sh  # .venv-clipbench for tests/test_clip_benchmark.py (~30 s once; likewise)
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions"  # DeepSpeed's CPU comm op, prebuilt by scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
