"""Environment for DeepSpeed subprocesses in tests: CPU accelerator, gloo, one thread, and the
shared-memory comm op from the persistent build folder that scripts/setup.sh fills."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXT_DIR = ROOT / ".venv" / "torch_extensions"


def ds_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXT_DIR))
    env.update(extra)
    return env
