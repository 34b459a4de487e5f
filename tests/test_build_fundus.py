"""build-fundus: each public release layout, the harmonised vocabulary, explanations, crop and resume."""

import json

import numpy as np
import pytest
from PIL import Image

from mgll.cli import main as cli_main
from mgll.data import load_dataset
from mgll.data.build_fundus import build_fundus, crop_black_border
from mgll.data.fundus_readers import detect_format
from mgll.data.fundus_vocab import explain, load_knowledge, load_vocab, normalise_term

RFMID_CODES = ("DR ARMD MH DN MYA BRVO TSLN ERM LS MS CSR ODC CRVO TV AH ODP ODE ST AION PT RT RS CRS EDN RPEC MHL "
               "RP CWS CB ODPM PRH MNF HR CRAO TD CME PTCR CF VH MCA VS BRAO PLQ HPED CL").split()
ODIR_KEYWORDS = [
    "normal fundus", "mild nonproliferative retinopathy", "moderate non proliferative retinopathy",
    "severe nonproliferative retinopathy", "proliferative diabetic retinopathy", "diabetic retinopathy", "glaucoma",
    "suspected glaucoma", "cataract", "dry age-related macular degeneration", "wet age-related macular degeneration",
    "hypertensive retinopathy", "pathological myopia", "myopia retinopathy", "laser spot", "drusen",
    "epiretinal membrane", "macular epiretinal membrane", "vitreous degeneration", "retinal pigmentation",
    "chorioretinal atrophy", "branch retinal vein occlusion", "central retinal vein occlusion",
    "refractive media opacity", "spotted membranous change", "tessellated fundus", "maculopathy",
    "myelinated nerve fibers", "retinitis pigmentosa", "post retinal laser surgery", "rhegmatogenous retinal detachment",
    "macular hole", "optic nerve atrophy", "retinochoroidal coloboma", "central retinal artery occlusion",
    "branch retinal artery occlusion", "suspected retinal vascular sheathing", "atrophic change", "arteriosclerosis",
    "silicone oil eye", "old chorioretinopathy", "white vessel", "wedge white line change", "morning glory syndrome",
    "optic discitis", "intraretinal hemorrhage", "vessel tortuosity", "asteroid hyalosis",
    "idiopathic choroidal neovascularization", "peripapillary atrophy", "choroidal nevus", "retina fold",
    "epiretinal membrane over the macula", "suspected microvascular anomalies", "glial remnants anterior to the optic disc",
    "depigmentation of the retinal pigment epithelium", "suspected abnormal color of  optic disc",
]


# --------------------------------------------------------------------------- vocabulary and knowledge


def test_every_code_of_every_format_maps_to_a_canonical_disease():
    vocab = load_vocab()
    canon = set(vocab.diseases) | {vocab.normal_name}
    assert len(vocab.diseases) >= 50
    assert set(vocab.formats["rfmid"]) == set(RFMID_CODES) and len(RFMID_CODES) == 45
    for fmt, codes in [("rfmid", RFMID_CODES), ("odir_flags", "NDGCAHMO"), ("adam", ["AMD", "Non-AMD", "A", "N"]),
                       ("refuge", ["Glaucoma", "Non-Glaucoma", "g", "n"])]:
        for c in codes:
            f = vocab.code(fmt, c)
            assert f.kind in ("disease", "normal") and f.disease in canon, (fmt, c, f)
    for kw in ODIR_KEYWORDS:
        f = vocab.resolve(kw)
        assert f.kind in ("disease", "normal") and f.disease in canon, (kw, f)
    for grade in ("1", "2", "3", "4"):
        assert vocab.formats["idrid"]["retinopathy_grade"][grade] in load_knowledge()["diabetic retinopathy"]["grades"]


def test_synonyms_across_releases_meet_in_one_name():
    vocab = load_vocab()
    amd = {vocab.code("rfmid", "ARMD").disease, vocab.resolve("age-related macular degeneration").disease,
           vocab.code("adam", "AMD").disease, vocab.resolve("wet age-related macular degeneration").disease}
    assert amd == {"age-related macular degeneration"}
    assert vocab.resolve("Moderate  non-proliferative retinopathy").grade == "moderate"
    assert vocab.resolve("lens dust").kind == "ignore" and vocab.resolve("no fundus image").kind == "reject"
    assert vocab.resolve("some new finding").kind == "unmapped"
    assert normalise_term("Haemorrhagic_Retinopathy") == "hemorrhagic retinopathy"


def test_every_canonical_disease_and_grade_has_an_explanation():
    vocab, know = load_vocab(), load_knowledge()
    for d in (*vocab.diseases, vocab.normal_name):
        assert d in know and len(know[d]["default"]) > 20, d
    texts = [explain("diabetic retinopathy", g) for g in ("mild", "moderate", "severe", "proliferative")]
    assert len(set(texts)) == 4 and "proliferative" in texts[3] and "mild" in texts[0]


# --------------------------------------------------------------------------- fixture releases


def _img(path, size=(48, 40), seed=0, border=6):
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[border:-border, border:-border] = rng.integers(60, 255, (size[1] - 2 * border, size[0] - 2 * border, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _labels(out):
    ds = load_dataset(out)
    return {r.image.split("/")[-1].rsplit("-", 1)[0]: r for r in ds.records}


def _build(src, out, fmt="auto", **kw):
    return build_fundus(src, out, fmt=fmt, size=32, workers=1, progress=False, **kw)


def test_rfmid(tmp_path):
    src = tmp_path / "RFMiD"
    header = ["ID", "Disease_Risk", *RFMID_CODES]
    rows = [[1, 1] + [int(c in ("DR", "MH")) for c in RFMID_CODES], [2, 0] + [0] * 45,
            [3, 1] + [int(c == "ARMD") for c in RFMID_CODES], [4, 1] + [0] * 45]
    (src / "Training_Set").mkdir(parents=True)
    (src / "Training_Set" / "RFMiD_Training_Labels.csv").write_text(
        "\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    for i in (1, 2, 3, 4):
        _img(src / "Training_Set" / "Training" / f"{i}.png", seed=i)
    _img(src / "Test_Set" / "Test" / "1.png", seed=99)  # same ID in another split must not be picked up
    assert detect_format(src) == "rfmid"
    s = _build(src, tmp_path / "out")
    lab = _labels(tmp_path / "out")
    assert lab["1"].labels["disease"] == ("diabetic retinopathy", "media haze")
    assert lab["1"].labels["status"] == ("abnormal",)
    assert lab["2"].labels == {"status": ("normal",), "disease": ("normal fundus",),
                               "explanation": (explain("normal fundus"),)}
    assert lab["3"].labels["disease"] == ("age-related macular degeneration",)
    assert lab["4"].labels["disease"] == ("other retinal disease",)  # Disease_Risk=1 with no named column
    assert s["records"] == 4 and s["format"] == "rfmid"
    train1 = np.asarray(Image.open(tmp_path / "out" / lab["1"].image))
    ref = np.asarray(Image.open(src / "Training_Set" / "Training" / "1.png").convert("RGB"))[6:-6, 6:-6]
    assert train1.shape == (25, 32, 3)  # 36x28 fundus after the crop -> 32x25
    assert abs(train1.mean() - ref.mean()) < 4


def test_odir_uses_per_eye_keywords_not_patient_flags(tmp_path):
    src = tmp_path / "ODIR"
    cols = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
            "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O", "filepath", "labels", "target",
            "filename"]
    rows = [
        # patient 0: D flag set, but only the left eye has DR; the right eye is normal
        [0, 69, "Female", "0_left.jpg", "0_right.jpg", "moderate non proliferative retinopathy，lens dust",
         "normal fundus", 0, 1, 0, 0, 0, 0, 0, 0, "", "['D']", "", "0_left.jpg"],
        [0, 69, "Female", "0_left.jpg", "0_right.jpg", "moderate non proliferative retinopathy，lens dust",
         "normal fundus", 0, 1, 0, 0, 0, 0, 0, 0, "", "['D']", "", "0_right.jpg"],
        [5, 50, "Male", "5_left.jpg", "5_right.jpg", "cataract,glaucoma", "no fundus image",
         0, 0, 1, 1, 0, 0, 0, 0, "", "['C']", "", "5_left.jpg"],
        [7, 40, "Male", "7_left.jpg", "7_right.jpg", "a brand new finding", "pathological myopia",
         0, 0, 0, 0, 0, 0, 1, 1, "", "['M']", "", "7_left.jpg"],
    ]
    import csv

    src.mkdir()
    with open(src / "full_df.csv", "w", newline="") as f:
        csv.writer(f).writerows([cols, *rows])
    for i, n in enumerate(["0_left", "0_right", "5_left", "5_right", "7_left"]):
        _img(src / "preprocessed_images" / f"{n}.jpg", seed=i)
    assert detect_format(src) == "odir"
    s = _build(src, tmp_path / "out")
    lab = _labels(tmp_path / "out")
    assert lab["0_left"].labels["disease"] == ("diabetic retinopathy",)
    assert lab["0_left"].labels["explanation"] == (explain("diabetic retinopathy", "moderate"),)
    assert lab["0_right"].labels["status"] == ("normal",)  # the patient's D flag is not this eye's label
    assert lab["0_left"].patient == lab["0_right"].patient == "odir-0"
    assert lab["0_left"].split == lab["0_right"].split
    assert lab["5_left"].labels["disease"] == ("cataract", "glaucoma")
    assert lab["7_left"].labels["disease"] == ("a brand new finding",)
    assert s["unmapped_terms"] == {"a brand new finding": 1}
    rej = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["key"], r["reason"]) for r in rej) == [("odir:5_right.jpg", "not_a_fundus_image"),
                                                           ("odir:7_right.jpg", "missing_image")]
    strict = _build(src, tmp_path / "strict", strict_vocab=True)
    assert strict["rejected"]["unmapped_label"] == 1


def test_adam_refuge_idrid_folder_csv(tmp_path):
    adam = tmp_path / "ADAM"
    _img(adam / "Training400" / "AMD" / "A0001.jpg")
    _img(adam / "Training400" / "Non-AMD" / "N0001.jpg")
    _img(adam / "Validation" / "V0001.jpg")  # unlabelled without the separate sheet: skipped
    assert detect_format(adam) == "adam"
    _build(adam, tmp_path / "adam_out")
    lab = _labels(tmp_path / "adam_out")
    assert lab["A0001"].labels["disease"] == ("age-related macular degeneration",)
    assert lab["N0001"].labels["status"] == ("normal",) and len(lab) == 2

    refuge = tmp_path / "REFUGE"
    _img(refuge / "Training400" / "Glaucoma" / "g0001.jpg")
    _img(refuge / "Training400" / "Non-Glaucoma" / "n0001.jpg")
    _img(refuge / "Validation400" / "V0001.jpg")
    (refuge / "Validation400-GT").mkdir(parents=True)
    (refuge / "Validation400-GT" / "Glaucoma_label.csv").write_text("ID,ImgName,Glaucoma Label\n1,V0001.jpg,1\n")
    assert detect_format(refuge) == "refuge"
    _build(refuge, tmp_path / "refuge_out")
    lab = _labels(tmp_path / "refuge_out")
    assert {k: v.labels["disease"][0] for k, v in lab.items()} == {
        "g0001": "glaucoma", "n0001": "normal fundus", "V0001": "glaucoma"}

    idrid = tmp_path / "IDRiD" / "B. Disease Grading"
    (idrid / "2. Groundtruths").mkdir(parents=True)
    (idrid / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv").write_text(
        "Image name,Retinopathy grade,Risk of macular edema ,,\nIDRiD_001,3,2,,\nIDRiD_002,0,0,,\nIDRiD_003,4,0,,\n")
    for i in (1, 2, 3):
        _img(idrid / "1. Original Images" / "a. Training Set" / f"IDRiD_00{i}.jpg", seed=i)
    assert detect_format(tmp_path / "IDRiD") == "idrid"
    _build(tmp_path / "IDRiD", tmp_path / "idrid_out")
    lab = _labels(tmp_path / "idrid_out")
    assert lab["IDRiD_001"].labels["disease"] == ("diabetic retinopathy", "diabetic macular edema")
    assert lab["IDRiD_001"].labels["explanation"] == (explain("diabetic retinopathy", "severe"),
                                                      explain("diabetic macular edema", "near-central"))
    assert lab["IDRiD_002"].labels["status"] == ("normal",)
    assert "proliferative" in lab["IDRiD_003"].labels["explanation"][0]

    folder = tmp_path / "kaggle"
    _img(folder / "cataract" / "a.png")
    _img(folder / "diabetic_retinopathy" / "b.png")
    _img(folder / "normal" / "c.png")
    assert detect_format(folder) == "folder"
    _build(folder, tmp_path / "folder_out")
    lab = _labels(tmp_path / "folder_out")
    assert {k: v.labels["disease"][0] for k, v in lab.items()} == {
        "a": "cataract", "b": "diabetic retinopathy", "c": "normal fundus"}

    table = tmp_path / "table"
    _img(table / "imgs" / "x.png")
    _img(table / "imgs" / "y.png")
    (table / "labels.csv").write_text("image,label\nimgs/x.png,DR;tessellation\nimgs/y.png,normal\n")
    assert detect_format(table) == "csv"
    _build(table, tmp_path / "csv_out")
    lab = _labels(tmp_path / "csv_out")
    assert lab["x"].labels["disease"] == ("diabetic retinopathy", "tessellation")
    assert lab["y"].labels["status"] == ("normal",)


def test_real_fundus_photograph_crop_and_resize(tmp_path):
    from skimage import data

    retina = data.retina()  # 1411 x 1411 fundus photograph, the disc nearly touching the frame
    # as a wide-sensor camera records it: black bands left and right, a little black above and below
    wide = np.pad(retina, ((30, 30), (250, 250), (0, 0)))
    cropped = crop_black_border(wide)
    h, w = cropped.shape[:2]
    assert 1380 <= h <= 1411 and 1380 <= w <= 1411  # the bands are gone, the disc is whole
    for edge in (cropped[0], cropped[-1], cropped[:, 0], cropped[:, -1]):
        assert edge.max() > 0.06 * 254  # each side of the crop touches the illuminated (dim-rimmed) disc
    np.testing.assert_array_equal(crop_black_border(np.zeros((50, 60, 3), np.uint8)).shape, (50, 60, 3))
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    Image.fromarray(wide).save(src / "normal" / "retina.jpg", quality=95)
    summary = build_fundus(src, tmp_path / "out", fmt="folder", size=256, workers=1, progress=False)
    out = np.asarray(Image.open(tmp_path / "out" / load_dataset(tmp_path / "out").records[0].image))
    assert max(out.shape[:2]) == 256 and abs(out.shape[1] / out.shape[0] - w / h) < 0.02
    assert summary["records"] == 1


def test_resume_broken_image_and_cli(tmp_path):
    src = tmp_path / "k"
    for i in range(6):
        _img(src / "glaucoma" / f"{i}.png", seed=i)
    (src / "glaucoma" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = _build(src, tmp_path / "out")
    assert first["records"] == 6 and first["rejected"] == {"unreadable": 1}
    before = (tmp_path / "out" / "records.jsonl").read_bytes()
    again = _build(src, tmp_path / "out")
    assert again["processed_this_run"] == 0 and (tmp_path / "out" / "records.jsonl").read_bytes() == before
    assert _build(src, tmp_path / "out", retry_rejected=True)["processed_this_run"] == 1
    rc = cli_main(["build-fundus", "--format", "folder", str(src), str(tmp_path / "cli"), "--size", "32",
                   "--workers", "2", "--no-progress"])
    assert rc == 0 and (tmp_path / "cli" / "records.jsonl").read_bytes() == before
    assert (tmp_path / "cli" / "summary.md").is_file() and (tmp_path / "cli" / "label_frequencies.png").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the release layout"):
        build_fundus(tmp_path / "empty", tmp_path / "x")


def test_refuge_label_sheet_as_xlsx(tmp_path):
    """REFUGE ships its validation labels as an Excel sheet; it reads like the CSV."""
    openpyxl = pytest.importorskip("openpyxl")
    refuge = tmp_path / "REFUGE"
    _img(refuge / "Training400" / "Glaucoma" / "g0001.jpg")
    for i in (1, 2):
        _img(refuge / "Validation400" / f"V000{i}.jpg", seed=i)
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (("ID", "ImgName", "Glaucoma Label"), (1, "V0001.jpg", 1), (2, "V0002.jpg", 0)):
        sheet.append(row)
    (refuge / "Validation400-GT").mkdir(parents=True)
    book.save(refuge / "Validation400-GT" / "Glaucoma_label.xlsx")
    _build(refuge, tmp_path / "out")
    lab = _labels(tmp_path / "out")
    assert {k: v.labels["disease"][0] for k, v in lab.items()} == {
        "g0001": "glaucoma", "V0001": "glaucoma", "V0002": "normal fundus"}
