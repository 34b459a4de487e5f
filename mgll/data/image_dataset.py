"""PyTorch view over a :class:`MultiGranularDataset`.

Labels stay as per-level tuples of strings rather than index tensors: the multi-granular loss builds
its text targets per batch from the card templates, and the vocabulary differs per level and per
dataset, so integer-encoding here would only push a lookup table into every consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .pixel_budget import ImageTooLargeError, open_image, resolve_max_pixels
from .records import MultiGranularDataset, Record, RecordError
from .rgb import to_rgb

__all__ = ["RecordImageDataset", "collate_records", "to_tensor"]

LabelDict = dict[str, tuple[str, ...]]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Float CHW in [0, 1] without resizing, so the default keeps the stored resolution untouched."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class RecordImageDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        dataset: MultiGranularDataset,
        split: str | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.dataset = dataset
        # Resolved once here (a bad MGLL_MAX_PIXELS fails before training starts) and pickled into workers.
        self.max_pixels = resolve_max_pixels(max_pixels)
        self.split = split
        self.records: list[Record] = dataset.records if split is None else dataset.split(split)
        self.transform = transform if transform is not None else to_tensor

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Image.Image:
        """The record's image as RGB; one over the pixel budget is refused from its header, before decoding."""
        path = self.dataset.image_path(self.records[i])
        try:
            with open_image(path, self.max_pixels) as im:
                return to_rgb(im)
        except ImageTooLargeError as e:
            raise RecordError(str(e)) from None  # already "path: WxH = N MP is over the budget"
        except (OSError, UnidentifiedImageError, ValueError) as e:
            # Workers re-raise in the main process; naming the file is the only useful context left by then.
            raise RecordError(f"{path}: cannot read image ({e})") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, LabelDict]:
        rec = self.records[i]
        return self.transform(self.load_image(i)), dict(rec.labels)


def collate_records(batch: Sequence[tuple[torch.Tensor, LabelDict]]) -> tuple[torch.Tensor, list[LabelDict]]:
    """Stack images but keep label dicts as a list: variable-length label sets do not tensorise."""
    if not batch:
        raise ValueError("collate_records got an empty batch")
    images = [b[0] for b in batch]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images in a batch have different shapes {sorted(shapes)}; pass a resizing transform"
        )
    return torch.stack(images, 0), [b[1] for b in batch]
