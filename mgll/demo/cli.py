"""``mgll demo``; wired into ``mgll/cli.py`` with ``register(sub)``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["register", "resolve_models"]

REAL_CHECKPOINTS = (
    "To compare real checkpoints instead (local folders; see docs/swap.md and docs/demo.md):\n"
    "  mgll swap --host llava --mllm ckpt/llava-1.5-7b-hf --encoder runs/my-mgll --out runs/llava-mgll\n"
    "  mgll align --model runs/llava-mgll --data data/fundus --out runs/llava-mgll-s1 --stage 1\n"
    "  mgll demo --base ckpt/llava-1.5-7b-hf --swapped runs/llava-mgll --swapped-align runs/llava-mgll-s1 \\\n"
    "            --encoder runs/my-mgll [--data data/fundus]"
)
UPLOAD_CAP_FACTOR = 4  # gradio refuses uploads over 4x the image limit outright; those between get our message
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_models(args: argparse.Namespace) -> dict[str, Path]:
    """The three model folders: as given, else the quickstart's; a clear error naming what is missing."""
    from mgll.demo import default_paths

    defaults = default_paths(args.quickstart)
    chosen = {k: Path(getattr(args, k)) if getattr(args, k) else defaults[k] for k in ("base", "swapped", "encoder")}
    missing = [f"--{k} {p}" for k, p in chosen.items() if not p.exists()]
    if missing:
        from_quickstart = [k for k in chosen if not getattr(args, k)]
        hint = ""
        if from_quickstart:
            hint = (
                f"\n{', '.join(from_quickstart)} default to the quickstart's artifacts under {args.quickstart}; "
                f"create them with:\n  mgll quickstart --out {args.quickstart}\n(a few minutes on CPU, offline)"
            )
        raise FileNotFoundError(f"not found: {'; '.join(missing)}{hint}\n{REAL_CHECKPOINTS}")
    return chosen


def _cmd_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.max_image_mb <= 0:
        raise ValueError(f"--max-image-mb must be positive, got {args.max_image_mb}")
    paths = resolve_models(args)
    try:
        from mgll.demo.app import build_app, launch
    except ImportError as e:
        print(f"mgll demo: error: {e}; install the demo extra: pip install -e '.[demo]'", file=sys.stderr)
        return 2
    from mgll.demo.backend import DemoBackend
    from mgll.demo.examples import bundled_examples, default_examples_dir

    print(f"loading base {paths['base']}, swapped {paths['swapped']}, encoder {paths['encoder']} ...")
    import torch

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype != "auto" else None
    backend = DemoBackend(paths["base"], paths["swapped"], paths["encoder"], data=args.data, host=args.host,
                          device=args.device, max_image_mb=args.max_image_mb, max_new_tokens=args.max_new_tokens,
                          swapped_align=args.swapped_align, dtype=dtype, max_pixels=args.max_pixels)
    examples_dir = Path(args.examples_dir) if args.examples_dir else default_examples_dir()
    app = build_app(backend, bundled_examples(examples_dir))
    if not any(getattr(args, k) for k in ("base", "swapped", "encoder")):
        print(f"serving the quickstart's tiny models from {args.quickstart}.\n{REAL_CHECKPOINTS}")
    launch(app, server_name=args.server_name, port=args.port, share=args.share, allowed_paths=[examples_dir],
           max_upload_mb=UPLOAD_CAP_FACTOR * args.max_image_mb)
    return 0


def register(sub) -> None:
    from mgll.demo import DEFAULT_ROOT, MAX_IMAGE_MB

    p = sub.add_parser("demo", help="gradio page: a base MLLM and its MGLL-swapped twin side by side, plus the encoder's view")
    p.add_argument("--base", help="the original MLLM: a transformers checkpoint or an `mgll swap` folder "
                                  "(default: QUICKSTART/mcq/trained-clip)")
    p.add_argument("--swapped", help="its MGLL-swapped twin, an `mgll swap` folder (default: QUICKSTART/mcq/trained-mgll)")
    p.add_argument("--swapped-align", help="`mgll align` run whose projector (and LoRA adapter) the swapped twin loads")
    p.add_argument("--encoder", help="MGLL run or encoder folder for the per-level bars and heat map "
                                     "(default: QUICKSTART/encoder-mgll)")
    p.add_argument("--data", help="dataset whose card gives the levels and labels (default: the one the encoder run was trained on)")
    p.add_argument("--host", help="MLLM family of --base when it is a plain checkpoint (llava, qwen2_vl, ...); "
                                  "default: from mgll_swap.json or config.json's model_type")
    p.add_argument("--quickstart", default=str(DEFAULT_ROOT), help="quickstart output folder for the defaults")
    p.add_argument("--server-name", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max-image-mb", type=float, default=MAX_IMAGE_MB, help="largest accepted upload, in MB")
    p.add_argument("--max-pixels", default=None,
                   help="largest accepted image in pixels, checked before decoding (default: MGLL_MAX_PIXELS, else 40M)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for free-text questions")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                   help="weights dtype of both MLLMs (auto: as saved; bf16 halves a 7B model's memory on a GPU)")
    p.add_argument("--examples-dir", default=None, help="where the example images are written (default: a folder in the temp dir)")
    p.set_defaults(func=_cmd_demo)
