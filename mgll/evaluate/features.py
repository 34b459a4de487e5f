"""Frozen image features for probing, cached on disk so a second probe never re-encodes.

The cache key hashes everything the features depend on: the encoder's weights and config files
(or architecture name + pretrained tag + open_clip version when the weights come from open_clip's
own download cache), the records being encoded (image paths with each file's size and mtime, so an
edited image misses), the split name, and the preprocessing (the saved ``preprocess_cfg``). All of
it is computed without building the model, so a hit costs one file read: the encoder is created
only on a miss. An architecture with neither saved weights nor a pretrained tag is randomly
initialised on every build and is never cached.

Cache files live in ``<dataset>/.mgll_cache/`` (or ``cache_dir``) as safetensors, written through
:func:`mgll.io.atomic_path`. Unreadable images, and images over the pixel budget
(mgll.data.pixel_budget), are skipped and listed, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mgll.data.pixel_budget import ImageTooLargeError, open_image, resolve_max_pixels
from mgll.data.records import MultiGranularDataset, Record
from mgll.data.rgb import to_rgb
from mgll.encoder.factory import ENCODER_CONFIG, create_encoder, resolve_encoder_dir
from mgll.io import atomic_path

__all__ = [
    "CACHE_DIRNAME", "FeatureSet", "encoder_identity", "extract_features", "feature_cache_key", "read_rgb_or_reason",
]

CACHE_DIRNAME = ".mgll_cache"
FEATURE_VERSION = "1"  # bump when what is stored changes (e.g. projection or normalisation)


@dataclass
class FeatureSet:
    features: np.ndarray  # (N_ok, D) float32, encode_image output, not normalised
    images: list[str]  # the record image paths the rows belong to, in order
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"} for unreadable images
    cache_path: Path | None = None
    cache_hit: bool = False


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def encoder_identity(encoder: str, pretrained: str | None = None) -> tuple[str | None, dict]:
    """(hex digest of the encoder's weights + config, description) without building it; None = uncacheable."""
    encoder = str(encoder)
    h = hashlib.sha256()
    local = resolve_encoder_dir(encoder) if not encoder.startswith(("hf-hub:", "local-dir:")) else None
    if encoder.startswith("local-dir:"):
        local = Path(encoder[len("local-dir:"):])
    if local is not None:
        files = sorted(p for p in local.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json"))
        for p in files:
            h.update(p.name.encode())
            _hash_file(h, p)
        cfg = json.loads((local / ENCODER_CONFIG).read_text(encoding="utf-8"))
        return h.hexdigest(), {"encoder": str(local), "preprocess": cfg.get("preprocess_cfg", {})}
    if pretrained and Path(pretrained).is_file():
        h.update(encoder.encode())
        _hash_file(h, Path(pretrained))
        return h.hexdigest(), {"encoder": encoder, "pretrained": str(pretrained)}
    if pretrained or encoder.startswith("hf-hub:"):
        h.update(f"{encoder}|{pretrained}|open_clip {open_clip.__version__}".encode())
        return h.hexdigest(), {"encoder": encoder, "pretrained": pretrained}
    return None, {"encoder": encoder, "pretrained": None}


def feature_cache_key(
    encoder_digest: str, dataset: MultiGranularDataset, records: Sequence[Record], split: str,
    max_pixels: int | None = None,
) -> str:
    h = hashlib.sha256()
    h.update(f"v{FEATURE_VERSION}|{encoder_digest}|{split}|{Path(dataset.root).resolve()}".encode())
    # The budget decides which images are skipped, so a raised budget must not reuse the old skip list.
    h.update(f"|max_pixels={resolve_max_pixels(max_pixels)}".encode())
    for rec in records:
        try:
            st = os.stat(dataset.image_path(rec))
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\n{rec.image}|{stamp}".encode())
    return h.hexdigest()


def read_rgb_or_reason(path: Path, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why it is skipped): unreadable, truncated or over the pixel budget."""
    try:
        with open_image(path, max_pixels) as im:
            return to_rgb(im), None
    except ImageTooLargeError as e:
        return None, str(e)  # names the file, its size and the budget
    except (OSError, UnidentifiedImageError, ValueError) as e:
        return None, f"{path}: cannot read image ({e})"


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset: MultiGranularDataset, records: Sequence[Record], transform, max_pixels: int) -> None:
        self.dataset, self.records, self.transform = dataset, list(records), transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        img, why = read_rgb_or_reason(self.dataset.image_path(self.records[i]), self.max_pixels)
        return (i, None, why) if img is None else (i, self.transform(img), None)


def _collate(batch):
    ok = [(i, x) for i, x, err in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    if ok:
        return [i for i, _ in ok], torch.stack([x for _, x in ok]), bad
    return [], None, bad


def _load_cache(path: Path, images: list[str]) -> FeatureSet | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats = f.get_tensor("features").numpy()
    except Exception:  # a corrupt or foreign file is a miss, it gets rewritten
        return None
    kept = json.loads(meta.get("images", "[]"))
    skipped = json.loads(meta.get("skipped", "[]"))
    if sorted(kept + [s["image"] for s in skipped]) != sorted(images) or len(kept) != feats.shape[0]:
        return None
    return FeatureSet(feats, kept, skipped, cache_path=path, cache_hit=True)


@torch.no_grad()
def extract_features(
    encoder: str | Path,
    dataset: MultiGranularDataset,
    records: Sequence[Record],
    split: str,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    use_cache: bool = True,
    max_pixels: int | None = None,
) -> FeatureSet:
    """Image features of ``records`` (one split), from the cache when the key matches.

    Images that cannot be read or are over the pixel budget (``max_pixels``, default
    ``MGLL_MAX_PIXELS`` or 40 MP, checked from the header) are skipped and listed with the reason.
    """
    encoder = str(encoder)
    max_pixels = resolve_max_pixels(max_pixels)
    images = [r.image for r in records]
    digest, ident = encoder_identity(encoder, pretrained)
    path = None
    if use_cache and digest is not None:
        key = feature_cache_key(digest, dataset, records, split, max_pixels)
        cdir = Path(cache_dir) if cache_dir is not None else Path(dataset.root) / CACHE_DIRNAME
        path = cdir / f"features-{split}-{key[:24]}.safetensors"
        if path.is_file():
            hit = _load_cache(path, images)
            if hit is not None:
                return hit

    model, _, preprocess_val, _, _ = create_encoder(encoder, pretrained=pretrained, device=device)
    model.eval()
    loader = torch.utils.data.DataLoader(
        _Images(dataset, records, preprocess_val, max_pixels), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate,
    )
    rows: list[np.ndarray] = []
    kept: list[str] = []
    skipped: list[dict] = []
    for idx, x, bad in tqdm(loader, desc=f"features {split}", unit="batch", disable=not progress, leave=False):
        for i, err in bad:
            skipped.append({"image": images[i], "reason": err})
        if x is None:
            continue
        rows.append(model.encode_image(x.to(device)).float().cpu().numpy())
        kept.extend(images[i] for i in idx)
    if not kept:
        raise ValueError(f"split '{split}': no readable images among {len(images)} records")
    feats = np.concatenate(rows, 0).astype(np.float32)
    if path is not None:
        meta = {
            "images": json.dumps(kept),
            "skipped": json.dumps(skipped),
            "split": split,
            "identity": json.dumps(ident, default=str),
            "version": FEATURE_VERSION,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"features": torch.from_numpy(feats)}, str(tmp), metadata=meta)
    return FeatureSet(feats, kept, skipped, cache_path=path, cache_hit=False)
