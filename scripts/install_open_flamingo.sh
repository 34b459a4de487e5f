#!/usr/bin/env bash
# Install OpenFlamingo 2.0.1 (the Med-Flamingo code) into .venv for the `medflamingo` host.
# --no-deps: open-flamingo pins torch==2.0.1 and sentencepiece==0.1.98, which would replace the
# project's torch; its code runs on the installed torch / transformers 5 (see docs/swap.md).
# Beyond mgll's own dependencies (torch, open_clip, transformers) its model code imports einops and
# einops-exts: pure-python, no dependencies of their own (einops also comes with DeepSpeed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if "$PY" -c "import open_flamingo, einops, einops_exts" >/dev/null 2>&1; then
  echo "open_flamingo already installed"
  exit 0
fi
"$PY" -m pip install --quiet --no-deps "open-flamingo==2.0.1" "einops-exts==0.0.4" "einops>=0.6"
"$PY" -c "import einops, open_flamingo; from open_flamingo.src.flamingo_lm import FlamingoLMMixin; print('open_flamingo ready')"
