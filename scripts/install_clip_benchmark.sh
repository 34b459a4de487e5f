#!/usr/bin/env bash
# Install CLIP_benchmark (PyPI: clip-benchmark) into its own virtual environment, .venv-clipbench, layered on .venv.
#
# Why a second venv: clip-benchmark 1.6.2 (the newest release) cannot score a classification task with the
# NumPy in .venv (2.4): its `accuracy()` (metrics/zeroshot_classification.py, also used by the linear probe)
# does `float(tensor.sum(0, keepdim=True).cpu().numpy())`, a one-element 1-d array, which NumPy 2.4 turned
# from a DeprecationWarning into "TypeError: only 0-dimensional arrays can be converted to Python scalars".
# .venv-clipbench holds numpy 2.3.5 (the last release that converts with a warning) ahead of .venv's
# site-packages, which it sees through a .pth line placed after its own, so torch, open_clip, scikit-learn,
# ... are shared (not downloaded again) and .venv is never written to (pip leaves packages outside the
# environment it runs in alone). clip-benchmark itself is unmodified.
# One pin beyond its own requirements, found by running it here:
# - requests: clip_benchmark/datasets/imagenetv2.py imports it at module level (so `import clip_benchmark.cli`
#   fails without it) but clip-benchmark does not declare it.
# Its linear probe also needs a GPU (`assert device == 'cuda'`); tests/helpers/clip_benchmark_cpu.py runs it
# on the CPU. tests/test_clip_benchmark.py runs this script itself when .venv-clipbench is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-.venv/bin/python}
VENV=${VENV:-.venv-clipbench}
CLIP_BENCHMARK_VERSION=${CLIP_BENCHMARK_VERSION:-1.6.2}
NUMPY_VERSION=${NUMPY_VERSION:-2.3.5}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import clip_benchmark.cli, numpy, importlib.metadata as m, sys; sys.exit(m.version('clip_benchmark') != '$CLIP_BENCHMARK_VERSION' or numpy.__version__ != '$NUMPY_VERSION')" >/dev/null 2>&1; then
  echo "clip-benchmark $CLIP_BENCHMARK_VERSION already installed in $VENV"
  exit 0
fi
bash scripts/make_layered_venv.sh "$BASE" "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "clip-benchmark==$CLIP_BENCHMARK_VERSION" "numpy==$NUMPY_VERSION" "requests>=2.28"
"$VENV/bin/python" -c "import clip_benchmark.cli, numpy, importlib.metadata as m; print('clip-benchmark', m.version('clip_benchmark'), 'with numpy', numpy.__version__, 'ready in $VENV')"
