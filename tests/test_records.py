import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mgll.data import (
    DatasetCard,
    Level,
    Record,
    RecordError,
    RecordImageDataset,
    collate_records,
    load_card,
    load_dataset,
    write_dataset,
)

CARD = {
    "name": "toy",
    "description": "toy set",
    "levels": [
        {"name": "status", "template": "a {} eye"},
        {"name": "disease", "template": "an eye with {}"},
    ],
}
GOOD = {
    "image": "images/a.png",
    "split": "train",
    "patient": "p1",
    "labels": {"status": ["abnormal"], "disease": ["drusen"]},
}


def _img(path, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)


def _make(tmp_path, lines, card=CARD, images=("a.png", "b.png", "c.png")):
    (tmp_path / "dataset.json").write_text(json.dumps(card))
    for name in images:
        _img(tmp_path / "images" / name)
    (tmp_path / "records.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    return tmp_path


def _rec(**kw):
    d = json.loads(json.dumps(GOOD))
    d["image"] = "images/b.png"
    for k, v in kw.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def _loc(line, field):
    return rf"records\.jsonl:{line}: field '{re.escape(field)}'"


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    card = DatasetCard("toy", (Level("status", "a {} eye"), Level("disease", "an eye with {}")), "d")
    recs = [
        Record(
            "images/a.png", {"status": ("abnormal",), "disease": ("drusen", "haemorrhage")}, "train", "p1"
        ),
        Record("images/b.png", {"disease": ("none",), "status": ("normal",)}, "test", None),
        Record("images/c.png", {"status": ("normal",), "disease": ("none",)}),
    ]
    for n in "abc":
        _img(tmp_path / "images" / f"{n}.png")
    assert write_dataset(tmp_path, card, recs) == tmp_path
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    ds = load_dataset(tmp_path)
    assert ds.card == card
    assert ds.records == recs  # `line` is excluded from equality
    assert [r.line for r in ds.records] == [1, 2, 3]
    assert list(ds.records[1].labels) == ["status", "disease"]  # card order, whatever the input order
    assert ds.splits() == {"train": 1, "test": 1, "": 1}
    assert [r.image for r in ds.split("train")] == ["images/a.png"]
    assert ds.label_vocab("disease") == ["drusen", "haemorrhage", "none"]
    assert ds.image_path(recs[0]) == tmp_path / "images/a.png"
    assert card.level("disease").text("drusen") == "an eye with drusen"
    assert card.level_names == ("status", "disease")
    assert load_card(tmp_path) == card


def test_write_rejects_bad_records(tmp_path):
    card = DatasetCard("toy", (Level("status", "{}"),))
    with pytest.raises(
        RecordError, match=r"records\.jsonl:2: field 'labels\.status'.*a level with no labels"
    ):
        write_dataset(tmp_path, card, [Record("a.png", {"status": ("x",)}), Record("b.png", {"status": ()})])
    with pytest.raises(RecordError, match=r"duplicate image"):
        write_dataset(
            tmp_path, card, [Record("a.png", {"status": ("x",)}), Record("./a.png", {"status": ("x",)})]
        )
    assert not (tmp_path / "records.jsonl").exists()


def test_strip_and_dedup_labels_and_blank_lines(tmp_path):
    lines = [
        _rec(
            image="images/a.png",
            labels={"status": [" abnormal "], "disease": ["drusen", " drusen", "haem", "drusen "]},
        ),
        "",
        "   ",
        _rec(),
    ]
    ds = load_dataset(_make(tmp_path, lines))
    assert ds.records[0].labels == {"status": ("abnormal",), "disease": ("drusen", "haem")}
    assert ds.records[1].line == 4


def test_yaml_card_and_custom_records_file(tmp_path):
    (tmp_path / "dataset.yaml").write_text(
        "name: ytoy\nrecords: meta/recs.jsonl\nlevels:\n"
        "  - {name: modality, template: 'a {} radiograph'}\n"
        "  - name: study\n    template: 'an x-ray of the {}'\n"
    )
    _img(tmp_path / "img" / "x.png")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "recs.jsonl").write_text(
        json.dumps({"image": "img/x.png", "labels": {"modality": ["CR"], "study": ["chest"]}})
    )
    ds = load_dataset(tmp_path)
    assert ds.card.name == "ytoy" and ds.card.level_names == ("modality", "study")
    assert ds.records[0].split is None and ds.records[0].patient is None
    (tmp_path / "other.jsonl").write_text(
        json.dumps({"image": "img/y.png", "labels": {"modality": ["DX"], "study": ["hand"]}})
    )
    ds = load_dataset(tmp_path, records="other.jsonl", check_images=False)
    assert ds.records[0].labels["study"] == ("hand",)
    with pytest.raises(RecordError, match=r"other\.jsonl:1: field 'image'.*does not exist"):
        load_dataset(tmp_path, records="other.jsonl")


# --------------------------------------------------------------------------- malformed records

MALFORMED = [
    ('{"image": "images/b.png", ', _loc(2, "<json>") + ".*invalid JSON"),
    (_rec(image=None), _loc(2, "image") + ".*missing or non-string 'image'"),
    (_rec(image=5), _loc(2, "image") + ".*missing or non-string 'image'"),
    (_rec(image="images/nope.png"), _loc(2, "image") + ".*does not exist"),
    (_rec(labels=None), _loc(2, "labels") + ".*missing 'labels'"),
    (_rec(labels=["abnormal"]), _loc(2, "labels") + ".*must be an object"),
    (
        _rec(labels={"status": ["a"], "disease": ["b"], "severity": ["c"]}),
        _loc(2, "labels.severity") + r".*unknown level 'severity'.*\['status', 'disease'\]",
    ),
    (_rec(labels={"status": ["a"]}), _loc(2, "labels.disease") + ".*a level with no labels"),
    (_rec(labels={"status": ["a"], "disease": []}), _loc(2, "labels.disease") + ".*a level with no labels"),
    (_rec(labels={"status": "abnormal", "disease": ["b"]}), _loc(2, "labels.status") + ".*non-list labels"),
    (_rec(labels={"status": [1], "disease": ["b"]}), _loc(2, "labels.status") + ".*non-list labels"),
    (_rec(labels={"status": ["  "], "disease": ["b"]}), _loc(2, "labels.status") + ".*non-list labels"),
    (_rec(image="images/a.png"), _loc(2, "image") + ".*duplicate image.*line 1.*line 2"),
    (_rec(image="./images//a.png"), _loc(2, "image") + ".*duplicate image.*line 1.*line 2"),
    (_rec(image="../outside.png"), _loc(2, "image") + ".*escapes the dataset folder"),
    (_rec(image="images/../../x.png"), _loc(2, "image") + ".*escapes the dataset folder"),
    (_rec(image="/etc/passwd"), _loc(2, "image") + ".*absolute"),
    (_rec(image="C:\\x.png"), _loc(2, "image") + ".*absolute"),
    (_rec(split=3), _loc(2, "split") + ".*must be a string"),
    ("[1, 2]", r"records\.jsonl:2: record must be a JSON object"),
]


@pytest.mark.parametrize("bad,pattern", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_record(tmp_path, bad, pattern):
    _make(tmp_path, [GOOD, bad])
    with pytest.raises(RecordError, match=pattern) as ei:
        load_dataset(tmp_path)
    assert str(tmp_path / "records.jsonl") in str(ei.value)


def test_line_numbers_count_blank_lines(tmp_path):
    _make(tmp_path, [GOOD, "", _rec(labels={"status": "x", "disease": ["y"]})])
    with pytest.raises(RecordError, match=_loc(3, "labels.status")):
        load_dataset(tmp_path)


def test_missing_image_ok_without_check(tmp_path):
    _make(tmp_path, [GOOD, _rec(image="images/nope.png")])
    assert len(load_dataset(tmp_path, check_images=False).records) == 2


# --------------------------------------------------------------------------- malformed cards


def _card(**kw):
    c = json.loads(json.dumps(CARD))
    for k, v in kw.items():
        if v is None:
            c.pop(k)
        else:
            c[k] = v
    return c


BAD_CARDS = [
    (_card(name=None), r"dataset\.json: field 'name'"),
    (_card(name=3), r"dataset\.json: field 'name'"),
    (_card(levels=None), r"dataset\.json: field 'levels'"),
    (_card(levels=[]), r"dataset\.json: field 'levels'"),
    (
        _card(levels=[{"name": "a", "template": "no placeholder"}]),
        r"dataset\.json: field 'levels\[0\]\.template'.*\{\}",
    ),
    (
        _card(levels=[{"name": "a", "template": "{}"}, {"name": "a", "template": "x {}"}]),
        r"dataset\.json: field 'levels\[1\]\.name'.*duplicate level",
    ),
    (_card(levels=[{"template": "{}"}]), r"dataset\.json: field 'levels\[0\]\.name'"),
    (_card(levels=["status"]), r"dataset\.json: field 'levels\[0\]'"),
    (_card(description=5), r"dataset\.json: field 'description'"),
]


@pytest.mark.parametrize("card,pattern", BAD_CARDS, ids=[f"card{i}" for i in range(len(BAD_CARDS))])
def test_malformed_card(tmp_path, card, pattern):
    _make(tmp_path, [GOOD], card=card)
    with pytest.raises(RecordError, match=pattern):
        load_dataset(tmp_path)


def test_no_card_and_unknown_level(tmp_path):
    with pytest.raises(RecordError, match="no dataset card"):
        load_card(tmp_path)
    _make(tmp_path, [GOOD])
    card = load_card(tmp_path)
    with pytest.raises(RecordError, match=r"unknown level 'fine'.*\['status', 'disease'\]"):
        card.level("fine")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(RecordError, match=r"dataset\.json.*cannot parse"):
        load_card(tmp_path)


# --------------------------------------------------------------------------- torch dataset


def test_image_dataset_and_collate(tmp_path):
    lines = [
        GOOD,
        _rec(split="test"),
        _rec(image="images/c.png", labels={"status": ["normal"], "disease": ["none"]}),
    ]
    ds = load_dataset(_make(tmp_path, lines))
    _img(tmp_path / "images" / "c.png", mode="L")  # grayscale must come back as 3 channels
    full = RecordImageDataset(ds)
    assert len(full) == 3
    x, labels = full[0]
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert labels == {"status": ("abnormal",), "disease": ("drusen",)}
    assert full[2][0].shape == (3, 10, 12)
    train = RecordImageDataset(ds, split="train")
    assert len(train) == 2 and [r.image for r in train.records] == ["images/a.png", "images/c.png"]

    seen = []
    custom = RecordImageDataset(
        ds, split="test", transform=lambda im: seen.append(im.mode) or torch.zeros(3, 4, 4)
    )
    assert custom[0][0].shape == (3, 4, 4) and seen == ["RGB"]

    loader = torch.utils.data.DataLoader(full, batch_size=3, collate_fn=collate_records)
    images, label_list = next(iter(loader))
    assert images.shape == (3, 3, 10, 12)
    assert isinstance(label_list, list) and label_list[1]["status"] == ("abnormal",)


def test_collate_mismatched_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        collate_records([(torch.zeros(3, 4, 4), {}), (torch.zeros(3, 5, 4), {})])


def test_unreadable_image(tmp_path):
    ds = load_dataset(_make(tmp_path, [GOOD]))
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(RecordError, match=re.escape(str(tmp_path / "images" / "a.png"))):
        RecordImageDataset(ds)[0]
