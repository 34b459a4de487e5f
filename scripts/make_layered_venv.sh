#!/usr/bin/env bash
# make_layered_venv.sh BASE_PYTHON VENV: create VENV so that it sees BASE_PYTHON's site-packages *after* its own.
# A tool with pins that clash with .venv (lmms-eval, clip-benchmark) gets its own versions in VENV while torch,
# transformers, open_clip, ... are shared, not downloaded again; pip run in VENV never writes to the base.
set -euo pipefail
BASE=$1
VENV=$2
"$BASE" -m venv "$VENV"
base_site=$("$BASE" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$base_site" > "$own_site/_mgll_base_venv.pth"
