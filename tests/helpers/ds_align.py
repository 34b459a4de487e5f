"""Run by torchrun from tests/test_deepspeed_align.py: a 2-process ZeRO stage-2 (LoRA) alignment
of a tiny LLaVA. Rank 0 then writes its last batch and the logits the trained, still
partitioned model gives on it (safetensors), for comparison with the consolidated reload.

argv: swapped-model dir, dataset dir, output dir, logits file, deepspeed config[, "resume"][, "bf16"]."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mgll.adapters.align import AlignConfig, align


def main():
    swapped, data, out, logits_path, ds_config = sys.argv[1:6]
    flags = sys.argv[6:]

    def after_training(model, batch):
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits  # a collective under ZeRO-3: every rank runs it
        if dist.get_rank() == 0:
            save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in batch.items()}}, logits_path)

    cfg = AlignConfig(model=swapped, data=data, out=out, stage=2, split=None, levels=["status", "disease"],
                      steps=3, batch_size=4, lr=1e-2, save_every=2, deepspeed=ds_config,
                      precision="bf16" if "bf16" in flags else "fp32")
    align(cfg, resume="resume" in flags, progress=False, after_training=after_training)


if __name__ == "__main__":
    main()
