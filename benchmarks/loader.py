"""Images per second into training: a dataset folder vs the same records as WebDataset tar shards.

Both paths run the trainer's own loaders on the same synthetic fundus records (224 px PNGs, the
encoder's train transform, global batch 64): the folder path (``GlobalBatchSampler`` over
``SeededItems(RecordImageDataset)``) and the shard path (``ShardStream`` over ``mgll shard``'s
output), each with 0 and 2 DataLoader workers. Rounds alternate folder / shards; the figure is the
median over rounds of images / wall second over a fixed number of batches (the first batch,
which pays for worker start-up, is not timed).

    .venv/bin/python benchmarks/loader.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rate(loader, batches: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up and the first shard's read are not the steady state
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--n", type=int, default=768, help="synthetic images")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from mgll.data import RecordImageDataset, collate_records, make_synthetic
    from mgll.data.shard_stream import ShardStream
    from mgll.data.shards import open_shards, write_shards
    from mgll.encoder.factory import create_encoder
    from mgll.encoder.sampler import GlobalBatchSampler, SeededItems
    from mgll.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="mgll-loader-"))
    ds = make_synthetic(work / "folder", kind="fundus", n=args.n, size=args.size, seed=0, workers=1)
    write_shards(work / "folder", work / "shards", shard_size=64, progress=False)
    n_shards = -(-args.n // 64)
    shards = open_shards(str(work / "shards" / ("{000000.." + f"{n_shards - 1:06d}" + "}.tar")))
    _, preprocess_train, _, _, _ = create_encoder("mgll-tiny-vit", force_image_size=args.size)
    images = RecordImageDataset(ds, split=None, transform=preprocess_train)
    steps = args.batches + 1

    def folder(workers: int):
        sampler = GlobalBatchSampler(len(images), args.batch, steps, seed=0)
        return DataLoader(SeededItems(images, seed=0), batch_sampler=sampler, collate_fn=collate_records, num_workers=workers)

    def sharded(workers: int):
        stream = ShardStream(shards, None, preprocess_train, args.batch, steps, seed=0, streams=max(1, workers))
        return DataLoader(stream, batch_size=None, num_workers=workers)

    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for workers in (0, 2):
            for name, make in (("folder", folder), ("shards", sharded)):
                rates.setdefault(f"{name}, {workers} workers", []).append(_rate(make(workers), args.batches, args.batch))
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    load = os.getloadavg()[0]
    result = {"images": args.n, "size": args.size, "batch": args.batch, "timed_batches": args.batches, "rounds": args.rounds,
              "median_images_per_s": med, "all_images_per_s": rates, "load_1min_at_end": round(load, 2),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    out = Path(args.out)
    atomic_write_json(out / "loader.json", result)
    ratio0 = med["shards, 0 workers"] / med["folder, 0 workers"]
    ratio2 = med["shards, 2 workers"] / med["folder, 2 workers"]
    lines = [
        "# Loading: dataset folder vs WebDataset shards",
        "",
        f"shards / folder images per s: {ratio0:.2f} (0 workers), {ratio2:.2f} (2 workers)",
        "",
        f"{args.n} synthetic fundus PNGs at {args.size} px, the encoder's train transform (random resized crop), global batch "
        f"{args.batch}; the trainer's loaders ({'`GlobalBatchSampler` + `SeededItems`'} vs `ShardStream`, shards of 64); median "
        f"over {args.rounds} rounds of {args.batches} timed batches (first batch untimed). {os.cpu_count()} CPUs, one torch "
        f"thread per process, 1-min load average {load:.2f} at the end (other jobs shared the machine when it is above ~1).",
        "",
        "| loader | images/s (median) | all rounds |",
        "|---|---|---|",
        *[f"| {k} | {med[k]} | {', '.join(f'{x:.1f}' for x in rates[k])} |" for k in med],
        "",
        "Local disk here, so the figure is decoding and augmentation bound; shards pay off where the files live on",
        "object storage or a network file system (one sequential read per shard instead of one open per image).",
        "",
    ]
    atomic_write_text(out / "loader.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
