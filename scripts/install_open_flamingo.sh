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
# Its metadata still pins torch==2.0.1 and sentencepiece==0.1.98 (neither is used by its model code here), so
# every later pip call would print a dependency-conflict ERROR; relax those two lines in the installed metadata.
"$PY" - <<'PYEOF'
import importlib.metadata as md
from pathlib import Path

meta = Path(md.distribution("open-flamingo")._path) / "METADATA"
lines = meta.read_text(encoding="utf-8").splitlines(keepends=True)
out = []
for line in lines:
    if line.startswith("Requires-Dist: torch ==2.0.1") and ";" not in line:
        line = "Requires-Dist: torch\n"
    elif line.startswith("Requires-Dist: sentencepiece") and ";" not in line:
        continue
    out.append(line)
meta.write_text("".join(out), encoding="utf-8")
PYEOF
"$PY" -c "import einops, open_flamingo; from open_flamingo.src.flamingo_lm import FlamingoLMMixin; print('open_flamingo ready')"
