#!/usr/bin/env bash
# Install lmms-eval into its own virtual environment, .venv-lmms, layered on the project's .venv.
#
# Why a second venv: lmms-eval 0.7.3's dependency tree (pytablewriter -> typepy[datetime]) pins
# python-dateutil<3, while .venv holds python-dateutil 4; installing it into .venv would downgrade a
# package the project already resolved. .venv-lmms sees .venv's site-packages through a .pth line placed
# after its own, so torch, transformers, accelerate, ... are shared (not downloaded again) and only what
# lmms-eval adds, plus its own python-dateutil, lands here; .venv is never written to (pip leaves
# packages outside the environment it runs in alone).
# Two pins beyond lmms-eval's own requirements, each found by running it here:
# - decord: lmms-eval's llava_hf wrapper imports it at module level but does not declare it.
# - filelock<4: lmms-eval's evaluator imports filelock._api (a private module filelock 4 removed;
#   .venv has filelock 4), "No module named 'filelock._api'" before the first request otherwise.
# tests/test_mcq_lmms_eval.py runs this script itself when .venv-lmms is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-.venv/bin/python}
VENV=${VENV:-.venv-lmms}
LMMS_EVAL_VERSION=${LMMS_EVAL_VERSION:-0.7.3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import lmms_eval, decord, filelock._api, importlib.metadata as m, sys; sys.exit(m.version('lmms_eval') != '$LMMS_EVAL_VERSION')" >/dev/null 2>&1; then
  echo "lmms-eval $LMMS_EVAL_VERSION already installed in $VENV"
  exit 0
fi
bash scripts/make_layered_venv.sh "$BASE" "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "lmms-eval==$LMMS_EVAL_VERSION" "decord==0.6.0" "filelock<4"
"$VENV/bin/python" -c "import lmms_eval, decord, filelock._api, importlib.metadata as m; print('lmms-eval', m.version('lmms_eval'), 'ready in $VENV')"
