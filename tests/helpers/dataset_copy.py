"""A writable copy of the first records of a shared read-only test dataset, for tests that damage images."""

import shutil
from pathlib import Path

from mgll.data.records import Record, write_dataset


def copy_records(dataset, root: Path, n: int = 60) -> list[Record]:
    """Copy the first ``n`` records and their images to ``root`` (card + records.jsonl); return the records."""
    recs = []
    for r in dataset.records[:n]:
        (root / r.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset.image_path(r), root / r.image)
        recs.append(Record(image=r.image, labels=r.labels, split=r.split, patient=r.patient))
    write_dataset(root, dataset.card, recs)
    return recs
