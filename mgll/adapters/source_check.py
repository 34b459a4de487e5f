"""Is ``--mllm`` the checkpoint ``--host`` expects? Checked from its ``config.json`` before any weight is loaded.

transformers treats a ``model_type`` mismatch as a warning and fills every weight it cannot
place with random values, so ``swap --host qwen2_vl --mllm <a LLaVA folder>`` used to write a
fully random Qwen2-VL and exit 0, and ``--host llava`` on a LLaVA-NeXT folder silently dropped
anyres and ``image_newline``. A path that does not exist used to become a hub lookup and an
``OSError`` traceback. Every such case is a ``ValueError`` / ``FileNotFoundError`` here, one line
naming the file, what it holds and what the host takes; the CLI turns it into exit code 2.
A hub id goes through the same code (``get_config_dict`` fetches only ``config.json``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["looks_like_hub_id", "read_source_config", "check_source"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# architectures of original-format checkpoints that carry a stock model_type but need converting first
_CONVERT_FIRST = {"LlavaLlamaForCausalLM": "mgll convert-llava", "LlavaMistralForCausalLM": "mgll convert-llava"}


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` with no leading ``.``, ``/`` or ``~``: something the Hub could resolve."""
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "~"))


def read_source_config(mllm: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """``(config dict, where it came from)``; a missing folder or a failed hub lookup is one clear error."""
    from transformers import PretrainedConfig

    ref = str(mllm)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--mllm {ref}: is a file; expected the MLLM's folder (config.json + weights)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--mllm {ref}: no config.json in this folder; expected a transformers MLLM folder")
        where = str(path / "config.json")
    elif looks_like_hub_id(ref):
        where = f"{ref} (hub)/config.json"
    else:
        raise FileNotFoundError(f"--mllm {ref}: no such folder")
    try:
        config, _ = PretrainedConfig.get_config_dict(str(path) if path.exists() else ref)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"--mllm {ref}: not a local folder and the hub lookup failed ({first})") from None
    return config, where


def _host_for_model_type(model_type: str) -> str | None:
    from mgll.adapters.hosts import get_host, list_hosts

    for name in list_hosts():
        host = get_host(name)
        if model_type in host.source_model_types():
            return name
    return None


def check_source(host, mllm: str | os.PathLike) -> dict[str, Any]:
    """The source config, if ``host`` can swap it; else a ``ValueError`` naming both model types."""
    config, where = read_source_config(mllm)
    for arch in config.get("architectures") or []:
        if arch in _CONVERT_FIRST:
            raise ValueError(f"{where}: architectures {arch!r} is the original (non-transformers) format; run `{_CONVERT_FIRST[arch]}` first")
    model_type = config.get("model_type")
    accepted = host.source_model_types()
    if model_type not in accepted:
        if isinstance(model_type, str) and model_type.startswith("mgll_"):
            raise ValueError(
                f"{where}: model_type {model_type!r} is a folder `mgll swap` already wrote; swap the source MLLM "
                f"(mgll_swap.json: source_mllm) instead"
            )
        other = _host_for_model_type(model_type) if model_type else None
        hint = f" (use --host {other})" if other else ""
        raise ValueError(
            f"{where}: model_type {model_type!r} does not match --host {host.name}, which takes model_type "
            f"{' or '.join(repr(t) for t in accepted)}{hint}"
        )
    return config
