"""Run by torchrun from tests/test_distributed.py: one forward/backward on this rank's half of a
fixed global batch, through accelerate (DDP over gloo). Rank 0 writes the loss and the averaged
gradients to the file given as argv[2] (safetensors)."""

import sys

from safetensors.torch import save_file

from mgll.encoder.trainer import make_accelerator

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from dist_common import GLOBAL_BATCH, build, global_batch  # noqa: E402


def main():
    loss_name, out = sys.argv[1], sys.argv[2]
    acc = make_accelerator()
    model = build(loss_name)
    images, labels = global_batch()
    local = GLOBAL_BATCH // acc.num_processes
    sl = slice(acc.process_index * local, (acc.process_index + 1) * local)
    ddp = acc.prepare(model)
    result = ddp(images[sl], labels[sl])
    acc.backward(result["loss"])
    if acc.is_main_process:
        grads = {f"grad.{n}": p.grad.detach().clone() for n, p in acc.unwrap_model(ddp).named_parameters() if p.grad is not None}
        save_file({"loss": result["loss"].detach().reshape(1), **grads}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
