"""Tiny demo artifacts in seconds, shared by the demo test modules (built once per pytest session).

The base model is a plain random-init LLaVA checkpoint (the non-swap loading path, host read off
``config.json``); its twin is that checkpoint with a random-init MGLL tiny ViT swapped in. The
encoder run folder has a ``config.yaml`` naming its dataset, as a trained run does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

_BUILT: dict[int, dict[str, Path]] = {}


def build_demo_artifacts(tmp_path_factory) -> dict[str, Path]:
    key = id(tmp_path_factory)
    if key not in _BUILT:
        _BUILT[key] = _build(tmp_path_factory.mktemp("demo-artifacts"))
    return _BUILT[key]


def _build(root: Path) -> dict[str, Path]:
    from mgll.adapters.swap import swap
    from mgll.data import FUNDUS_DISEASES, make_synthetic
    from mgll.data.question_bank import QUESTION
    from mgll.encoder.factory import create_encoder, save_encoder
    from mgll.mllm_eval.scoring import INSTRUCTION
    from mgll.testing.tiny import make_tiny_llava

    data = root / "data"
    make_synthetic(data, n=40, size=16, seed=0)
    run = root / "run-mgll"
    torch.manual_seed(0)
    enc, _, _, _, arch = create_encoder("mgll-tiny-vit")
    save_encoder(enc, run / "encoder", arch, extra={"loss": "mgll"})
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(data)}}), encoding="utf-8")
    texts = [QUESTION, INSTRUCTION, " ".join(FUNDUS_DISEASES), "describe the fundus image.",
             "user assistant answer : . a b c d e f g h i j"]
    base = make_tiny_llava(root / "llava", texts, seed=0)
    swapped = swap("llava", base, run, root / "llava-mgll", seed=0)
    return {"root": root, "data": data, "encoder": run, "base": Path(base), "swapped": Path(swapped)}
