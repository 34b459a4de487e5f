"""The swap at real 7B sizes, on CPU, with every MLLM weight on the meta device.

For each host the released checkpoint's architecture (widths, depths, vocabularies, token grids as
in its ``config.json``; built from transformers' config classes, nothing downloaded) is built on
the meta device, a random ``ViT-L-14-336`` MGLL encoder (real weights, CPU) is swapped in with
``mgll.adapters.swap.swap_model``, and the swapped class is rebuilt from the swapped config, as
``from_pretrained`` does. Reported per host: image tokens per image, parameters (total, LM, tower,
projector) and the bytes each construction allocates, counted op by op while it runs (a torch
dispatch mode that sums every tensor a factory op creates, on any device), next to the bytes of
the finished model. Allocated == finished means nothing was built only to be discarded: the
swapped classes never build the stock tower they replace (the stock tower's bytes are listed for
scale). The process's peak RSS is reported too; the MLLM's weights never take real memory.

    .venv/bin/python benchmarks/swap_real_size.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096}
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "max_position_embeddings": 32768}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def released_configs() -> dict:
    """Host -> (checkpoint it mirrors, config) at the released widths."""
    from transformers import (
        CLIPVisionConfig,
        InstructBlipConfig,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        InternVLConfig,
        InternVLVisionConfig,
        JanusConfig,
        JanusVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        Qwen2Config,
        Qwen2VLConfig,
    )

    return {
        "llava": ("llava-hf/llava-1.5-7b-hf", LlavaConfig(
            vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=LlamaConfig(**LLAMA_7B, vocab_size=32064),
            image_token_index=32000, image_seq_length=576, vision_feature_layer=-2)),
        "llava_next": ("llava-hf/llava-v1.6-vicuna-7b-hf", LlavaNextConfig(
            vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=LlamaConfig(**LLAMA_7B, vocab_size=32064),
            image_token_index=32000, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)),
        "qwen2_vl": ("Qwen/Qwen2-VL-7B-Instruct", Qwen2VLConfig(
            vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                           "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
            text_config={**QWEN2_7B, "vocab_size": 152064, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)),
        "internvl": ("OpenGVLab/InternVL3-8B-hf", InternVLConfig(
            vision_config=InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14]),
            text_config=Qwen2Config(**QWEN2_7B, vocab_size=151674), image_token_id=151667, downsample_ratio=0.5,
            vision_feature_layer=-1, image_seq_length=256)),
        "janus": ("deepseek-community/Janus-Pro-7B", JanusConfig(
            vision_config=JanusVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                                            patch_size=16, projection_dim=4096),
            text_config=LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": 30}, vocab_size=102400), image_token_id=100581)),
        "instructblip": ("Salesforce/instructblip-vicuna-7b", InstructBlipConfig(
            vision_config=InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                   num_attention_heads=16, image_size=224, patch_size=14),
            qformer_config=InstructBlipQFormerConfig(encoder_hidden_size=1408),
            text_config=LlamaConfig(**LLAMA_7B, vocab_size=32001), num_query_tokens=32, image_token_index=32000)),
    }


class AllocationCounter(TorchDispatchMode):
    """Sums the bytes of every tensor a factory op (no tensor inputs) creates while active, on any device."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if not any(isinstance(a, torch.Tensor) for a in flat):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _gb(n: int) -> float:
    return round(n / 1e9, 3) + 0.0  # + 0.0: no "-0.0" in the table


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def measure(host_name: str, checkpoint: str, config, encoder) -> dict:
    from mgll.adapters.hosts import get_host
    from mgll.adapters.swap import swap_model

    host = get_host(host_name)
    source_cls = host.source_class()
    stock_tower_path = host.source_tower_path or host.tower_path
    with torch.device("meta"):
        counter = AllocationCounter()
        with counter:
            source = source_cls(config)
        stock_alloc = counter.bytes
    stock_dropped = stock_alloc - _bytes(source)  # what the stock class itself allocates and drops (tied lm_head)
    stock_tower_bytes = _bytes(source.get_submodule(stock_tower_path))
    t0 = time.perf_counter()
    swapped = swap_model(host_name, source, encoder)
    swap_s = time.perf_counter() - t0
    tokens = host.num_image_tokens(swapped) if host_name != "llava_next" else host.image_tokens(swapped, 336, 336)
    # rebuild the swapped class from its config, as from_pretrained does, counting what it allocates
    cls = type(swapped)
    with torch.device("meta"):
        counter = AllocationCounter()
        with counter:
            rebuilt = cls(swapped.config)
        rebuilt_alloc = counter.bytes
    tower = host.tower(rebuilt)
    projector = host.projector(rebuilt)
    lm = host.language_model(rebuilt)
    return {
        "host": host_name,
        "mirrors": checkpoint,
        "image_tokens": int(tokens),
        "params_total": _count(rebuilt),
        "params_lm": _count(lm),
        "params_tower": _count(tower),
        "params_projector": _count(projector),
        "stock_model_alloc_gb": _gb(stock_alloc),
        "stock_tower_gb": _gb(stock_tower_bytes),
        "swapped_class_alloc_gb": _gb(rebuilt_alloc),
        "swapped_model_gb": _gb(_bytes(rebuilt)),
        "stock_dropped_gb": _gb(stock_dropped),
        "discarded_gb": _gb(rebuilt_alloc - _bytes(rebuilt) - stock_dropped),
        "swapped_class": cls.__name__,
        "swap_s": round(swap_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--encoder", default="ViT-L-14-336", help="open_clip architecture of the random MGLL encoder")
    ap.add_argument("--hosts", default="llava,llava_next,qwen2_vl,internvl,janus,instructblip")
    args = ap.parse_args()

    from mgll.encoder.factory import create_encoder
    from mgll.io import atomic_write_json, atomic_write_text

    torch.manual_seed(0)
    t0 = time.perf_counter()
    encoder = create_encoder(args.encoder)[0].eval()
    configs = released_configs()
    rows = []
    for name in args.hosts.split(","):
        checkpoint, config = configs[name]
        rows.append(measure(name, checkpoint, config, encoder))
        print(json.dumps(rows[-1]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tower_params = _count(encoder.visual)
    result = {"encoder": args.encoder, "encoder_visual_params": tower_params, "peak_rss_mb": round(peak_mb),
              "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows}
    out = Path(args.out)
    atomic_write_json(out / "swap_real_size.json", result)
    lines = [
        "# The swap at real 7B sizes (meta device)",
        "",
        f"discarded at construction: {max(r['discarded_gb'] for r in rows):.3f} GB (max over hosts, beyond what the stock class itself drops; 0 = the stock tower is never built)",
        "",
        f"A random `{args.encoder}` MGLL encoder ({tower_params / 1e6:.1f} M vision parameters, real CPU weights) swapped into "
        "each released architecture built on the meta device (`benchmarks/swap_real_size.py`, nothing downloaded). "
        "`alloc` columns: bytes every factory op created while the class was constructed (fp32, counted op by op); "
        "`model`: the finished model's parameters and buffers; `discarded` = swapped class alloc - swapped model - what the "
        "stock class itself allocates and drops (e.g. an lm_head tied to the embeddings after it was built). The swapped "
        "class is rebuilt from the swapped config as `from_pretrained` builds it.",
        "",
        "| host | mirrors | image tokens | params total | LM | MGLL tower | projector | stock class alloc GB | stock drops GB | stock tower GB | swapped class alloc GB | swapped model GB | discarded GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['host']}` | {r['mirrors']} | {r['image_tokens']} | {r['params_total'] / 1e9:.3f} B | {r['params_lm'] / 1e9:.3f} B | "
            f"{r['params_tower'] / 1e6:.1f} M | {r['params_projector'] / 1e6:.1f} M | {r['stock_model_alloc_gb']} | {r['stock_dropped_gb']} | {r['stock_tower_gb']} | "
            f"{r['swapped_class_alloc_gb']} | {r['swapped_model_gb']} | {r['discarded_gb']} |"
        )
    lines += ["", f"Peak RSS of the whole run: {result['peak_rss_mb']} MB (the encoder's real weights; the MLLMs take none). "
              f"Wall {result['wall_s']} s; torch {torch.__version__}. `llava_next` tokens: a 336x336 image (base view + the anyres tiles it selects).", ""]
    atomic_write_text(out / "swap_real_size.md", "\n".join(lines))
    print(f"wrote {out / 'swap_real_size.md'}")


if __name__ == "__main__":
    main()
