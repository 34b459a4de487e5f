"""``mgll export-clip-benchmark``: one level of a records dataset in CLIP_benchmark's WebDataset layout.

Why: CLIP_benchmark (``pip install clip-benchmark``) is what the CLIP community reports zero-shot
and linear-probe numbers with; running it on an mgll encoder over the same split is a second
opinion on ``mgll zeroshot`` and ``mgll probe`` computed by code mgll did not write. Its loader
for local custom data is ``--dataset wds/NAME --dataset_root FOLDER``; this writes that folder::

    OUT/train/0.tar, OUT/train/nshards.txt     (likewise val/, test/: the dataset's splits)
    OUT/classnames.txt                          (the level's classes, in mgll's task order)
    OUT/zeroshot_classification_templates.txt   (the card's template for the level, + --template ones)
    OUT/dataset_type.txt                        ("classification")
    OUT/mgll_clip_benchmark.json                (source, level, per-split counts, skipped images)

Each tar holds ``KEY.png`` (the image as mgll reads it: :func:`mgll.data.rgb.to_rgb`, re-encoded
losslessly, so CLIP_benchmark sees the pixels mgll's own evaluations see, 16-bit and palette
images included) and ``KEY.cls`` (the class index). Only single-label levels (binary,
multi-class) are exported: CLIP_benchmark's linear probe trains a softmax head (cross-entropy)
and its top-1 accuracy needs one label per image. Templates become CLIP_benchmark's ``{c}`` form.
Nothing here imports torch.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from mgll.io import atomic_path

__all__ = ["export_clip_benchmark", "SPLITS", "SHARD_SIZE"]

SPLITS = ("train", "val", "test")
SHARD_SIZE = 10_000  # samples per tar shard
SPEC = "mgll_clip_benchmark.json"


def _template(t: str) -> str:
    """mgll's ``{}`` template as CLIP_benchmark's ``{c}`` one (it calls ``template.format(c=name)``)."""
    if "{}" not in t:
        raise ValueError(f"prompt template {t!r} must contain '{{}}' where the class name goes")
    out = t.replace("{}", "{c}")
    try:
        out.format(c="x")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"prompt template {t!r} is not a valid format string ({e})") from None
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def export_clip_benchmark(
    data: str | os.PathLike,
    level: str,
    out: str | os.PathLike,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = (),
    splits: Sequence[str] = SPLITS,
    overwrite: bool = False,
) -> dict:
    """Write ``out`` (see the module docstring) atomically; returns what ``mgll_clip_benchmark.json`` holds."""
    from mgll.data.pixel_budget import ImageTooLargeError, open_image, resolve_max_pixels
    from mgll.data.records import load_dataset
    from mgll.data.rgb import to_rgb
    from mgll.evaluate.tasks import make_task, task_records, task_targets
    from mgll.io import check_out_free

    check_out_free(out, overwrite)
    ds = load_dataset(data)
    task = make_task(ds, level, classes)
    if task.kind == "multilabel":
        raise ValueError(f"level {level!r} is multi-label; CLIP_benchmark's linear probe and top-1 accuracy need one label "
                         "per image (export a single-label level, e.g. a coarser one)")
    all_templates = [_template(ds.card.level(level).template), *(_template(t) for t in templates)]
    have = ds.splits()
    missing = [s for s in splits if not have.get(s)]
    if missing:
        raise ValueError(f"{ds.root}: no records in split(s) {missing}; splits: {have}")
    budget = resolve_max_pixels()
    now = time.time()
    spec: dict = {"source": str(ds.root), "dataset_name": ds.card.name, "level": level, "kind": task.kind,
                  "classes": task.classes, "templates": all_templates, "splits": {}, "skipped": []}
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for split in splits:
            recs = task_records(task, ds.split(split))
            if not recs:
                raise ValueError(f"{ds.root}: split {split!r} has no record with a label in {task.classes}")
            y = task_targets(task, recs)
            (tmp / split).mkdir()
            n = shard = 0
            tar, kept = None, []
            for rec, label in zip(recs, y):
                try:
                    with open_image(ds.image_path(rec), budget) as im:
                        rgb = to_rgb(im)
                except (ImageTooLargeError, OSError, ValueError) as e:
                    spec["skipped"].append({"split": split, "image": rec.image, "reason": str(e)})
                    continue
                if tar is None or n % SHARD_SIZE == 0 and n:
                    if tar is not None:
                        tar.close()
                        shard += 1
                    tar = tarfile.open(tmp / split / f"{shard}.tar", "w")
                buf = io.BytesIO()
                rgb.save(buf, format="PNG")
                key = f"{n:07d}"  # no dots: WebDataset splits sample keys at the first one
                _add(tar, f"{key}.png", buf.getvalue(), now)
                _add(tar, f"{key}.cls", str(int(label)).encode(), now)
                kept.append(int(label))
                n += 1
            if tar is not None:
                tar.close()
            if n == 0:
                raise ValueError(f"{ds.root}: none of split {split!r}'s images could be read")
            (tmp / split / "nshards.txt").write_text(f"{shard + 1}\n", encoding="utf-8")
            spec["splits"][split] = {"images": n, "shards": shard + 1,
                                     "per_class": {c: kept.count(i) for i, c in enumerate(task.classes)}}
        (tmp / "classnames.txt").write_text("".join(f"{c}\n" for c in task.classes), encoding="utf-8")
        (tmp / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in all_templates), encoding="utf-8")
        (tmp / "dataset_type.txt").write_text("classification\n", encoding="utf-8")
        (tmp / SPEC).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return spec
