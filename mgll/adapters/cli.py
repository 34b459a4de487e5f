"""``mgll export-hf``, ``mgll swap`` and ``mgll align``; wired into ``mgll/cli.py`` with ``register(sub)``."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]

_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from mgll.adapters.export_hf import export_hf

    out = export_hf(args.run, args.out, pretrained=args.pretrained, with_projection=not args.no_projection,
                    overwrite=args.overwrite, full=args.full)
    if args.full:
        print(f"wrote CLIPModel folder {out} (use: transformers.pipeline('zero-shot-image-classification', model='{out}'))")
    else:
        print(f"wrote CLIPVisionModel folder {out} (load: transformers.CLIPVisionModel.from_pretrained('{out}'))")
    return 0


def _cmd_swap(args: argparse.Namespace) -> int:
    import torch

    from mgll.adapters.swap import read_swap_spec, swap

    dtype = _DTYPES[args.dtype]
    out = swap(
        args.host,
        args.mllm,
        args.encoder,
        args.out,
        projector_init=args.projector_init,
        projector_weights=args.projector,
        pretrained=args.pretrained,
        dtype=getattr(torch, dtype) if dtype else None,
        seed=args.seed,
        overwrite=args.overwrite,
        image_view=args.image_view or "crop",
    )
    spec = read_swap_spec(out)
    tower = spec["tower"]
    if spec.get("source_image_view") and not args.image_view and spec["source_image_view"] != spec["image_view"]:
        print(f"note: {args.mllm}'s processor uses the {spec['source_image_view']!r} view; the swapped processor uses the "
              f"encoder's {spec['image_view']!r} view (pass --image-view {spec['source_image_view']} to keep the MLLM's)")
    print(f"wrote swapped {args.host} model to {out}: tower width {tower['hidden_size']}, {tower['num_image_tokens']} image tokens")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from mgll.adapters.align import AlignConfig, align

    cfg = AlignConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        stage=args.stage,
        split=None if args.split == "all" else args.split,
        levels=args.levels.split(",") if args.levels else None,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        qlora=args.qlora,
        train_tower=args.train_tower,
        projector=args.projector,
        precision=args.precision,
        num_workers=args.num_workers,
        seed=args.seed,
        save_every=args.save_every,
        deepspeed=args.deepspeed,
        instruction=args.instruction,
        chat_template=args.chat_template,
        mcq_k=args.mcq_k,
    )
    out = align(cfg, resume=args.resume, progress=not args.no_progress)
    with open(out / "summary.json", encoding="utf-8") as f:
        s = json.load(f)
    print(f"stage {s['stage']}: {s['steps']} steps, loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}; outputs in {out}")
    return 0


def _cmd_export_aligned(args: argparse.Namespace) -> int:
    from mgll.adapters.export_aligned import export_aligned

    out = export_aligned(args.model, args.align, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {args.model} with the run in {args.align} (LoRA merged); loads with "
          f"AutoModelForImageTextToText / AutoProcessor (trust_remote_code=True) or mgll's load_swapped")
    return 0


def _cmd_convert_llava(args: argparse.Namespace) -> int:
    from mgll.adapters.convert_llava import convert_llava

    r = convert_llava(args.src, args.out, vision_tower=args.vision_tower, overwrite=args.overwrite)
    print(f"wrote LlavaForConditionalGeneration folder {args.out} (tower from {r['vision_tower']}, "
          f"<image> = id {r['image_token_index']}, {r['image_seq_length']} image tokens; processor {r['processor']})")
    return 0


def register(sub) -> None:
    from mgll.adapters.align import AlignConfig
    from mgll.adapters.hosts import list_hosts
    from mgll.adapters.hosts.llava import PROJECTOR_INITS

    d = AlignConfig(model="", data="", out="")

    p = sub.add_parser("export-hf", help="convert an MGLL/open_clip ViT to a transformers CLIPVisionModel (or, --full, CLIPModel) folder")
    p.add_argument("run", help="run folder, saved encoder or open_clip architecture name")
    p.add_argument("out", help="output folder (config.json, model.safetensors, preprocessor_config.json)")
    p.add_argument("--pretrained", help="open_clip pretrained tag or weights file (for architecture names)")
    p.add_argument("--no-projection", action="store_true", help="write CLIPVisionModel without visual_projection")
    p.add_argument("--full", action="store_true",
                   help="write the whole model (both towers, projections, logit scale, tokenizer, processor) as a CLIPModel "
                        "for pipeline('zero-shot-image-classification')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically, once the new one is complete)")
    p.set_defaults(func=_cmd_export_hf)

    p = sub.add_parser("swap", help="replace an MLLM's vision tower with an MGLL encoder")
    p.add_argument("--host", required=True, choices=list_hosts())
    p.add_argument("--mllm", required=True, help="MLLM folder or Hub id in the host's transformers format")
    p.add_argument("--encoder", required=True, help="MGLL run folder or saved encoder")
    p.add_argument("--out", required=True)
    p.add_argument("--projector-init", choices=PROJECTOR_INITS, default="default",
                   help="default: fresh projector; zero: zero last layer + mean-embedding bias; keep: keep the old one (same width only)")
    p.add_argument("--projector", help="projector.safetensors from `mgll align` to put in")
    p.add_argument("--pretrained", help="open_clip pretrained tag when --encoder is an architecture name")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-view", choices=["crop", "pad"], default=None,
                   help="crop (default): the encoder's own eval transform; pad: LLaVA-1.5 / LLaVA-Med's pad-to-square with the mean colour first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically, once the new one is complete)")
    p.set_defaults(func=_cmd_swap)

    p = sub.add_parser("export-aligned", help="an alignment run as a stand-alone model folder (LoRA merged), loadable without mgll")
    p.add_argument("--model", required=True, help="the folder written by `mgll swap` that the run aligned")
    p.add_argument("--align", required=True, help="the `mgll align --out` folder")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically, once the new one is complete)")
    p.set_defaults(func=_cmd_export_aligned)

    p = sub.add_parser("align", help="stage 1: train the projector; stage 2: + LoRA / QLoRA on the LM")
    p.add_argument("--model", required=True, help="folder written by `mgll swap`")
    p.add_argument("--data", required=True, help="records dataset (captions come from its levels)")
    p.add_argument("--out", required=True)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--split", default="train", help="dataset split, or 'all'")
    p.add_argument("--levels", help="comma-separated caption levels (default: all)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--qlora", action="store_true", help="stage 2 with the LM in 4-bit nf4 (bitsandbytes)")
    p.add_argument("--train-tower", action="store_true", help="also unfreeze the vision tower")
    p.add_argument("--projector", help="start from this projector.safetensors (e.g. stage 1's)")
    p.add_argument("--instruction", default=d.instruction,
                   help="the user turn of every example, wrapped in the model's chat template as inference wraps a question")
    p.add_argument("--mcq-k", type=int, default=0, metavar="K",
                   help="also train on the split's ten-disease MCQ bank (K options), asked as `mgll mcq` asks (stage 2)")
    p.add_argument("--chat-template", metavar="JINJA", help="a chat template file replacing the model folder's (saved with the run)")
    p.add_argument("--precision", default=d.precision, help="fp32 | bf16 | fp16 | auto (accelerate mixed precision)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed JSON, e.g. configs/deepspeed/zero3.json (run under torchrun / accelerate launch / deepspeed)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_align)

    p = sub.add_parser("convert-llava", help="convert an original-format LLaVA / LLaVA-Med checkpoint to the transformers layout")
    p.add_argument("src", help="folder with config.json (mm_* fields) and model.* / pytorch_model-*.bin weights")
    p.add_argument("out", help="output LlavaForConditionalGeneration folder")
    p.add_argument("--vision-tower", help="local CLIP checkpoint folder (default: config.json's mm_vision_tower)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically, once the new one is complete)")
    p.set_defaults(func=_cmd_convert_llava)
