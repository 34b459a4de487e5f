"""A fixed tiny model and global batch shared by the 1-process and 2-process runs."""

import torch

from mgll.data import Level
from mgll.encoder.contrastive import ContrastiveModel
from mgll.encoder.factory import create_encoder

GLOBAL_BATCH = 8
LEVELS = (Level("status", "a {} eye"), Level("disease", "a fundus photograph showing {}"), Level("explanation", "{}"))


def build(loss_name: str) -> ContrastiveModel:
    torch.manual_seed(0)
    kwargs = {"init_logit_scale": 2.3, "init_logit_bias": -10.0} if loss_name == "siglip" else {}
    encoder, _, _, tok, _ = create_encoder("mgll-tiny-vit", **kwargs)
    return ContrastiveModel(encoder, tok, LEVELS, loss=loss_name)


def global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    diseases = ["drusen", "haemorrhage", "cataract", "myopia", "tessellation"]
    labels = []
    for i in range(GLOBAL_BATCH):
        if i % 4 == 0:
            labels.append({"status": ["normal"], "disease": ["normal fundus"], "explanation": ["a healthy retina"]})
            continue
        d = [diseases[i % 5]] + ([diseases[(i + 2) % 5]] if i % 3 == 0 else [])
        labels.append({"status": ["abnormal"], "disease": d, "explanation": [f"{x} of grade {i % 2}" for x in d]})
    return images, labels
