"""Feature-cached gradient accumulation (GradCache): a contrastive batch of B on the memory of B / k.

Why not ordinary accumulation: a contrastive loss does not decompose over samples. Every image is
contrasted with every text of the global batch, and for MGLL the soft targets (which images share a
label, at every level) and the smooth-KL mixture are built over the whole batch. k losses on k
micro-batches are k small-batch objectives, not one large one. Caching the features fixes this:
the loss L(f_1..f_B, t_1..t_K) depends on the parameters only through the features, so

    dL/dtheta = sum_i (dL/df_i) . (df_i/dtheta) + sum_k (dL/dt_k) . (dt_k/dtheta) + dL/dtheta_loss

where theta_loss are the parameters the loss reads directly (logit scale, SigLIP bias, MGLL's
point-wise scale and bias). Pass 1 encodes every micro-batch's images and this rank's share of the
distinct texts without a graph, gathers them over processes (as ``ContrastiveModel.forward`` does),
evaluates the full-batch loss on the cached features (leaves) and takes dL/df, dL/dt and
dL/dtheta_loss. Pass 2 re-encodes one micro-batch at a time with a graph and back-propagates
<f_j, dL/df_j> (the surrogate whose gradient w.r.t. f_j is exactly the cached gradient; it is what
``torch.autograd.backward(f_j, g_j)`` does, written as a scalar so that accelerate's fp16 scaler and
DeepSpeed's ``engine.backward`` can take it). Peak activation memory is one micro-batch's; the cost is
one extra forward without a graph (~1/3 of a step). open_clip's ``--accum-freq`` instead recomputes the
loss once per micro-batch with the others' cached features, which also works for the diagonal CLIP
target but counts the logit scale's gradient k times; here the loss is evaluated once.

Random state: pass 2 must see the dropout / drop-path masks pass 1 saw (augmentation happens in the
data loader, once). The generator state is captured before each micro-batch's encoding in pass 1 and
restored before its re-encoding; afterwards the state is put back to where pass 1 left it.

Processes: every rank computes the same global loss, so its cached gradients are those of the global
loss. In a plain step DDP averages rank gradients after the gather's backward has summed each row's
gradient from every rank (W copies); to give the same average each rank back-propagates W * dL/df.
The DDP wrapper is bypassed (its reducer allreduces once per backward, and needs every parameter
used in each one, which a per-tower replay is not); instead the gradients are averaged with one
bucketed all-reduce after the last backward, the equivalent of ``no_sync`` on all but the last.

DeepSpeed (ZeRO-2, tested on CPU): the engine reduces gradients inside its own backward hooks, so every rank
must run the same number of backwards touching the same parameters: pass 2 does exactly k per rank,
backward j = image micro-batch j + text chunk j (+ the loss parameters on the last), each through
``engine.backward`` with the accumulation boundary set on the last only, then ``engine.step``.
ZeRO-3 is refused by the trainer for encoders already (0-dim logit scale).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.distributed import gather_objects, gather_rows_with_grad, rank_and_world
from mgll.encoder.text_encoding import encode_texts

__all__ = ["GradCache", "RngState", "average_gradients", "check_accum_steps"]


def check_accum_steps(batch_size: int, accum_steps: int, world: int) -> int:
    """The per-rank micro-batch; one error line naming the keys when the batch does not split evenly."""
    if accum_steps < 1:
        raise ValueError(f"train.accum_steps must be >= 1, got {accum_steps}")
    if batch_size % (accum_steps * world):
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by train.accum_steps={accum_steps} x {world} process(es): "
            "every micro-batch on every process must hold the same number of images"
        )
    return batch_size // (accum_steps * world)


class RngState:
    """The CPU generator's state and, on CUDA, the current device's: what dropout and drop-path draw from."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _split(items: Sequence, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering ``items``, the first ones longest; some may be empty."""
    size = math.ceil(len(items) / parts) if items else 0
    return [(min(j * size, len(items)), min((j + 1) * size, len(items))) for j in range(parts)]


def _surrogate(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum <x, g>: a scalar whose gradient w.r.t. each x is its g (the value itself is meaningless)."""
    return sum((x.float() * g.float()).sum() for x, g in pairs)


def average_gradients(params: Sequence[torch.nn.Parameter], world: int, bucket_numel: int = 1 << 25) -> None:
    """Average ``.grad`` over processes, in buckets of one dtype (a missing gradient counts as zero)."""
    if world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    buckets: list[list[torch.Tensor]] = []
    filled = 0
    for g in grads:
        if buckets and buckets[-1][0].dtype == g.dtype and filled + g.numel() <= bucket_numel:
            buckets[-1].append(g)
            filled += g.numel()
        else:
            buckets.append([g])
            filled = g.numel()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class GradCache:
    """One optimizer step's forward and backward over ``accum_steps`` micro-batches per process.

    ``forward(images, label_sets)`` (pass 1) returns the loss terms, detached, exactly as the plain
    model's; ``backward()`` (pass 2) leaves in ``.grad`` what one plain backward would have (or, under
    DeepSpeed, has the engine take its step, as ``accelerator.backward`` does in the plain loop).
    """

    def __init__(self, core: ContrastiveModel, accelerator, accum_steps: int, engine=None):
        if accum_steps < 1:
            raise ValueError(f"train.accum_steps must be >= 1, got {accum_steps}")
        self.core = core
        self.accelerator = accelerator
        self.accum_steps = accum_steps
        self.engine = engine  # the DeepSpeed engine, or None
        self._state: dict | None = None

    def _encode_texts(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        core = self.core
        return encode_texts(core.encoder, core.tokenizer, list(texts), device, trim=core.trim_text)

    @torch.no_grad()
    def _pass1_features(self, images: torch.Tensor, texts: Sequence[str]):
        k, device = self.accum_steps, images.device
        micro = images.shape[0] // k
        image_rng, image_feats = [], []
        for j in range(k):
            image_rng.append(RngState(device))
            image_feats.append(self.core.image_features(images[j * micro : (j + 1) * micro]))
        text_rng, text_feats = [], []
        for start, stop in _split(texts, k):
            text_rng.append(RngState(device))
            if stop > start:
                text_feats.append(self._encode_texts(texts[start:stop], device))
        return image_rng, torch.cat(image_feats), text_rng, text_feats

    def forward(self, images: torch.Tensor, label_sets: Sequence[Mapping[str, Sequence[str]]]) -> dict:
        core, k = self.core, self.accum_steps
        if images.shape[0] != len(label_sets):
            raise ValueError(f"{images.shape[0]} images but {len(label_sets)} label sets")
        if images.shape[0] % k:
            raise ValueError(f"{images.shape[0]} images on this process do not split into train.accum_steps={k} micro-batches")
        rank, world = rank_and_world()
        with self.accelerator.autocast():
            all_label_sets = gather_objects([dict(x) for x in label_sets])
            sizes = [len(x) for x in all_label_sets]
            batch = core.batch_texts([x for part in all_label_sets for x in part])
            mine, text_sizes = core.text_share(batch.texts)
            image_rng, local_images, text_rng, text_parts = self._pass1_features(images, mine)
            after = RngState(images.device)
            with torch.no_grad():
                if not text_parts:  # a rank with no texts still takes part in the gather, with 0 rows
                    text_parts = [local_images.new_zeros((0, local_images.shape[1]))]
                all_images = gather_rows_with_grad(local_images, sizes).requires_grad_(True)
                all_texts = gather_rows_with_grad(torch.cat(text_parts), text_sizes).requires_grad_(True)
            out = core.objective(all_images, all_texts, batch)
        params = [p for p in core.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out["loss"], [all_images, all_texts, *params], allow_unused=True)
        first, first_text = sum(sizes[:rank]), sum(text_sizes[:rank])
        self._state = {
            "images": images,
            "texts": mine,
            "image_rng": image_rng,
            "text_rng": text_rng,
            "after": after,
            # every rank's gradient of the same global loss, times W: DDP/DeepSpeed average over ranks
            "image_grad": grads[0][first : first + images.shape[0]] * world,
            "text_grad": grads[1][first_text : first_text + len(mine)] * world,
            "loss_params": [(p, g) for p, g in zip(params, grads[2:]) if g is not None],
        }
        return {name: value.detach() for name, value in out.items()}

    def backward(self) -> None:
        """Pass 2: re-encode each micro-batch with a graph and back-propagate its cached gradient."""
        if self._state is None:
            raise RuntimeError("GradCache.backward() without a forward() before it")
        state, self._state = self._state, None
        core, k = self.core, self.accum_steps
        images, texts = state["images"], state["texts"]
        micro, device = images.shape[0] // k, images.device
        _, world = rank_and_world()
        chunks = _split(texts, k)
        for j in range(k):
            pairs = []
            with self.accelerator.autocast():
                state["image_rng"][j].restore()
                feats = core.image_features(images[j * micro : (j + 1) * micro])
                pairs.append((feats, state["image_grad"][j * micro : (j + 1) * micro]))
                start, stop = chunks[j]
                state["text_rng"][j].restore()
                if stop > start:
                    pairs.append((self._encode_texts(texts[start:stop], device), state["text_grad"][start:stop]))
                elif self.engine is not None:  # every rank's backward must touch the same parameters
                    dummy = self._encode_texts(texts[:1] or ["a"], device)
                    pairs.append((dummy, torch.zeros_like(dummy)))
            if j == k - 1:
                pairs.extend(state["loss_params"])
            self._backward(_surrogate(pairs), last=j == k - 1)
            del pairs, feats
        state["after"].restore()
        if self.engine is None:
            average_gradients([p for p in core.parameters() if p.requires_grad], world)

    def _backward(self, surrogate: torch.Tensor, last: bool) -> None:
        if self.engine is None:
            self.accelerator.backward(surrogate)  # under fp16, accelerate's scaler scales it
            return
        self.engine.set_gradient_accumulation_boundary(is_boundary=last)
        self.engine.backward(surrogate)
        if last:
            self.engine.step()  # clips and steps, as accelerate's DeepSpeed wrapper does after its backward
