"""Run by torchrun from tests/test_accumulate.py: one feature-cached step (accum_steps = argv[2]) on this
rank's half of the fixed global batch, the model prepared by accelerate (DDP over gloo). Rank 0 writes
each loss's value and averaged gradients to OUT/<loss>.safetensors (argv[1])."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from mgll.encoder.accumulate import GradCache
from mgll.encoder.trainer import make_accelerator

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import GLOBAL_BATCH, build, global_batch  # noqa: E402


def main():
    out, k = Path(sys.argv[1]), int(sys.argv[2])
    acc = make_accelerator()
    images, labels = global_batch()
    local = GLOBAL_BATCH // acc.num_processes
    sl = slice(acc.process_index * local, (acc.process_index + 1) * local)
    for loss_name in ("clip", "siglip", "mgll"):
        ddp = acc.prepare(build(loss_name))
        core = acc.unwrap_model(ddp)
        cache = GradCache(core, acc, k)
        terms = cache.forward(images[sl], labels[sl])
        cache.backward()
        if acc.is_main_process:
            grads = {f"grad.{n}": p.grad.detach().clone() for n, p in core.named_parameters() if p.grad is not None}
            save_file({"loss": terms["loss"].reshape(1), **grads}, str(out / f"{loss_name}.safetensors"))
        acc.wait_for_everyone()


if __name__ == "__main__":
    main()
