"""De-identification of build-xray (issue 13, item 2) and truthful reasons for broken files (item 8).

The end-to-end tests put a unique marker in every attribute of the PS3.15 profile that pydicom can set as
text, write every marker into StudyDescription / SeriesDescription in another case and order, build with
the library and with the CLI, then grep every byte under OUT and everything printed for every marker.
"""

import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset

from mgll.data.build_xray import build_xray, load_salt, source_key
from mgll.data.deid import (
    Scrubber,
    identifying_values,
    in_profile,
    is_descriptor,
    profile_edition,
    profile_keywords,
)
from mgll.data.dicom_read import DicomReadError, NotDicomError, read_dicom

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from dicom_factory import make_dataset, value_offset, write_dicom  # noqa: E402

TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RAMP = np.tile(np.linspace(0, 4095, 64).round().astype(np.int64), (64, 1))
PYDICOM_DATA = Path(pydicom.__file__).parent / "data"


# --------------------------------------------------------------------------- the profile


def test_profile_is_table_e1_1_from_the_library():
    assert profile_edition().startswith("dicomfields_20")
    kws = set(profile_keywords())
    assert len(kws) > 500  # E.1-1 has some 650 rows; a hand list had 5
    for kw in ("PatientName", "OtherPatientNames", "ReferringPhysicianName", "PerformingPhysicianName",
               "OperatorsName", "InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber",
               "PatientBirthDate", "AccessionNumber", "OtherPatientIDsSequence", "StudyDescription"):
        assert kw in kws, kw
    for kw in ("Modality", "BodyPartExamined", "PhotometricInterpretation", "Rows", "SOPClassUID"):
        assert kw not in kws, kw
    assert in_profile(0x60024000) and not in_profile(0x60030000)  # Overlay Comments in any 60xx even group


def test_descriptors_are_recognised():
    assert is_descriptor("StudyDescription") and is_descriptor("ProtocolName") and is_descriptor("CodeMeaning")
    assert not is_descriptor("InstitutionName") and not is_descriptor("PatientComments")


# --------------------------------------------------------------------------- scrubbing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("john doe chest", "chest"),
        ("Chest DOE", "Chest"),
        ("chest (Doe) pa", "chest pa"),
        ("chest pid-4711-secret pa", "chest pa"),  # an ID with separators goes whole
        ("hospital ST MARY knee", "knee"),  # a multi-word value in another order and case
        ("mary knee", "mary knee"),  # one word of a multi-word value alone is not that value
        ("m chest 2 views", "m chest 2 views"),  # one-character values (sex M, accession 2) never match
        ("xray 1.2.840.99.1 hand", "xray hand"),
        ("胸部やまだ", "胸部"),  # a script without spaces: substring match
        ("exam of hand", "exam of hand"),
        ("exam number 3", "3"),
    ],
)
def test_scrubber_matches_words_in_any_case_and_order(text, expected):
    scrub = Scrubber([("PN", "DOE^JOHN"), ("LO", "PID-4711-SECRET"), ("LO", "St Mary Hospital"), ("CS", "M"),
                      ("SH", "2"), ("UI", "1.2.840.99.1"), ("PN", "やまだ^たろう"), ("SH", "exam Number")])
    assert " ".join(scrub(text).split()) == expected


def test_identifying_values_walk_sequences_multi_values_and_private_names():
    ds = make_dataset(RAMP, patient_name="Doe^Jane", extra={
        "OtherPatientNames": ["Roe^Rita", "Poe^Paul"],
        "ProtocolName": "Chest PA",
        "ReferringPhysicianIdentificationSequence": [Dataset()],
        "ProcedureCodeSequence": [Dataset()],
    })
    ref = ds.ReferringPhysicianIdentificationSequence[0]
    ref.InstitutionName = "Nested Clinic"
    ref.PersonIdentificationCodeSequence = [Dataset()]
    ref.PersonIdentificationCodeSequence[0].CodeValue = "EMP-991"  # not listed itself: under a listed sequence
    ref.PersonIdentificationCodeSequence[0].CodeMeaning = "a description"
    ds.ProcedureCodeSequence[0].OperatorsName = "Op^Olga"  # listed, under an unlisted sequence
    ds.ProcedureCodeSequence[0].CodeValue = "XR-CHEST"  # unlisted under unlisted: not identifying
    ds.private_block(0x0009, "MGLL TEST", create=True).add_new(0x01, "PN", "Priv^Pia")
    ds.private_block(0x0009, "MGLL TEST").add_new(0x02, "LO", "vendor text")
    values = identifying_values(ds)
    got = {v for _, v in values}
    assert {"Doe^Jane", "Roe^Rita", "Poe^Paul", "Nested Clinic", "EMP-991", "Op^Olga", "Priv^Pia",
            "PID-4711-SECRET", "19610407", "20230916"} <= got
    assert not got & {"Chest PA", "Chest", "PA", "a description", "XR-CHEST", "vendor text", "MGLL TEST", "DX"}
    assert ("PN", "Op^Olga") in values


def test_descriptors_do_not_erase_labels(tmp_path):
    """ProtocolName and the procedure descriptions repeat the kept descriptions; they must not wipe them."""
    item = Dataset()
    item.RequestedProcedureDescription = "Chest PA"
    item.ScheduledProtocolCodeSequence = [Dataset()]
    item.ScheduledProtocolCodeSequence[0].CodeMeaning = "Chest PA"
    write_dicom(tmp_path / "src" / "a.dcm", RAMP, study="Chest", series="PA", extra={
        "ProtocolName": "Chest PA", "PerformedProcedureStepDescription": "chest pa", "RequestAttributesSequence": [item],
        "InstitutionName": "Chest General"})  # a listed value: the run "chest general" would go, "chest" alone stays
    summary = build_xray(tmp_path / "src", tmp_path / "out", size=32, workers=1, salt_file=tmp_path / "salt",
                         progress=False)
    assert summary["levels"]["study"] == {"chest": 1} and summary["levels"]["series"] == {"pa": 1}


# --------------------------------------------------------------------------- every profile attribute, end to end


def _marked_source(src: Path) -> list[str]:
    """Write DICOMs whose every listed text attribute holds a unique marker; returns all markers."""
    rng = random.Random(0)
    extra, in_text = {}, []
    for i, kw in enumerate(profile_keywords()):
        vr = dictionary_VR(kw)
        if vr not in TEXT_VRS or is_descriptor(kw):
            continue
        one = f"zqx{i:03d}"
        if kw == "InstitutionName":  # a multi-word value, written in another order
            value, words = "Zqxa Memorial Zqxb", ["zqxb ZQXA memorial"]
        elif vr == "PN":
            value, words = f"Zqx{i:03d}^Zqy{i:03d}", [f"ZQY{i:03d}", f"zqx{i:03d}"]  # other order and case
        elif vr == "CS":
            value, words = one, [one.upper()]  # lower case is invalid CS: pydicom warns, quoting it
        else:
            value, words = one.upper(), [one]
        if dictionary_VM(kw) != "1":  # multi-valued: a second marker in the second value
            value, words = [value, _twin(value)], words + [_twin(w) for w in words]
        extra[kw] = value
        in_text += words
    extra |= {"PatientWeight": "73.9125", "PatientBirthDate": "19450607", "StudyTime": "134507",
              "AcquisitionDate": "19990102"}  # not text VRs, but listed values all the same
    in_text += ["73.9125", "19450607", "134507", "19990102"]
    nested = Dataset()
    nested.InstitutionName = "zqxnest1"
    nested.PersonIdentificationCodeSequence = [Dataset()]
    nested.PersonIdentificationCodeSequence[0].CodeValue = "zqxnest2"
    nested.PersonIdentificationCodeSequence[0].CodingSchemeDesignator = "ZQXNEST3"
    extra["ReferringPhysicianIdentificationSequence"] = [nested]
    proc = Dataset()
    proc.OperatorsName = "Zqxnest4^Zqxnest5"
    extra["ProcedureCodeSequence"] = [proc]
    in_text += ["zqxnest1", "ZQXNEST2", "zqxnest3", "zqxnest5 zqxnest4", "zqxpriv1 Zqxpriv2"]
    extra["StorageMediaFileSetUID"] = "1.2.zqxuid"  # an invalid UID: pydicom's read warning quotes it
    markers = sorted({w.lower() for t in in_text for w in t.split()} - {"memorial"} | {"zqxpath", "zqxuid"})
    rng.shuffle(in_text)
    study = "Chest " + " ".join(in_text)
    series = " ".join(reversed(in_text)) + " PA"
    (src / "zqxpath").mkdir(parents=True, exist_ok=True)
    for name, kw in (("image.dcm", {}), ("nopixels.dcm", {"pixels": False}), ("ct.dcm", {"modality": "CT"})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid CS and over-long LO on purpose
            ds = make_dataset(RAMP, bits_stored=12, study=study, series=series, patient_id=extra["PatientID"],
                              patient_name=extra["PatientName"], extra=extra, **kw)
            ds.private_block(0x0009, "ZQXVENDOR", create=True).add_new(0x01, "PN", "Zqxpriv1^Zqxpriv2")
            ds.save_as(src / "zqxpath" / name, enforce_file_format=True)
    full = (src / "zqxpath" / "image.dcm").read_bytes()
    cut = value_offset(src / "zqxpath" / "image.dcm", "StudyDescription") + 40
    (src / "zqxpath" / "truncated.dcm").write_bytes(full[:cut])  # rejected; its detail must not quote the text
    return markers


def _twin(marker: str) -> str:
    return marker.replace("zqx", "zqw").replace("Zqx", "Zqw").replace("ZQX", "ZQW")


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    src = tmp_path_factory.mktemp("marked")
    return src, _marked_source(src)


def _leaks(folder: Path, printed: str, markers: list[str]) -> dict[str, list[str]]:
    blobs = {p.relative_to(folder).as_posix(): p.read_bytes().lower() for p in folder.rglob("*") if p.is_file()}
    blobs["<printed>"] = printed.lower().encode()
    return {m: hits for m in markers if (hits := [name for name, b in blobs.items() if m.encode() in b])}


def test_marked_source_is_a_real_test(marked):
    src, markers = marked
    assert len(markers) > 300  # about 230 attributes; names, multi-valued ones and nesting add more
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(src / "zqxpath" / "image.dcm")
        assert str(ds.OtherPatientNames[1]).startswith("Zqw") and ds.InstitutionName == "Zqxa Memorial Zqxb"
        _ = [e.value for e in ds]
    assert any("zqx" in str(w.message).lower() for w in caught), "pydicom should quote a marker in a warning"
    raw = b"".join(p.read_bytes() for p in (src / "zqxpath").iterdir()).lower()
    assert all(m.encode() in raw for m in markers if m != "zqxpath")  # the path marker is in the folder name


def test_library_build_leaks_no_marker(marked, tmp_path, capfd):
    src, markers = marked
    capfd.readouterr()
    summary = build_xray(src, tmp_path / "out", size=32, workers=2, salt_file=tmp_path / "salt", progress=True)
    printed = "".join(capfd.readouterr())
    assert summary["records"] == 1
    assert summary["levels"]["study"] == {"chest": 1} and summary["levels"]["series"] == {"pa": 1}
    assert summary["rejected"] == {"no_pixel_data": 1, "truncated": 1, "wrong_modality": 1}
    assert "build-xray" in printed  # the progress bar was on, and printed
    assert _leaks(tmp_path / "out", printed, markers) == {}
    salt = load_salt(tmp_path / "salt")
    rej = {e["key"]: e for e in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    cut = rej[source_key("zqxpath/truncated.dcm", salt)]
    assert cut["reason"] == "truncated" and cut["detail"].startswith("the file ends inside StudyDescription (0008,1030)")


def test_cli_build_leaks_no_marker(marked, tmp_path):
    src, markers = marked
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mgll.cli", "build-xray", str(src), str(out), "--size", "32", "--workers", "2",
           "--salt-file", str(tmp_path / "salt")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1 records" in run.stdout
    assert _leaks(out, run.stdout + run.stderr, markers) == {}


# --------------------------------------------------------------------------- truthful reasons (item 8)


def _cut(src: Path, name: str, upto: int, arr=RAMP, **kw) -> None:
    full = src / "full.dcm"
    write_dicom(full, arr, bits_stored=12, **kw)
    (src / name).write_bytes(full.read_bytes()[:upto if upto > 0 else full.stat().st_size + upto])
    full.unlink()


def test_truncated_and_non_dicom_files_get_truthful_reasons(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_dicom(src / "probe.dcm", RAMP, bits_stored=12)
    uid_at, mod_at = value_offset(src / "probe.dcm", "SOPInstanceUID"), value_offset(src / "probe.dcm", "Modality")
    (src / "probe.dcm").unlink()
    _cut(src, "in_uid.dcm", uid_at + 10)  # before Modality: pydicom keeps 2 elements, no Modality
    _cut(src, "in_header_of_modality.dcm", mod_at - 3)
    _cut(src, "in_pixels.dcm", -3000)
    _cut(src, "j2k_in_pixels.dcm", -200, j2k=True)  # undefined length: pydicom drops every element
    big = np.tile(RAMP, (4, 4))  # 128 KB of pixels: over the builder's defer size, so read lazily
    _cut(src, "deferred_in_pixels.dcm", -1000, arr=big)
    write_dicom(src / "no_modality.dcm", RAMP, modality="")
    (src / "readme.txt").write_text("not a DICOM file\n")
    (src / "empty.dcm").write_bytes(b"")
    (src / "noise.bin").write_bytes(bytes(range(256)) * 4)
    pydicom.dcmread(PYDICOM_DATA / "test_files" / "dicomdirtests" / "DICOMDIR").save_as(src / "DICOMDIR")
    summary = build_xray(src, tmp_path / "out", size=32, workers=1, salt_file=tmp_path / "salt", progress=False)
    salt = load_salt(tmp_path / "salt")
    key = {source_key(p.name, salt): p.name for p in src.iterdir()}
    rej = {key[e["key"]]: (e["reason"], e.get("detail", ""))
           for e in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())}
    assert {k: v[0] for k, v in rej.items()} == {
        "in_uid.dcm": "truncated", "in_header_of_modality.dcm": "truncated", "in_pixels.dcm": "pixel_decode_failed",
        "j2k_in_pixels.dcm": "truncated", "deferred_in_pixels.dcm": "pixel_decode_failed",
        "no_modality.dcm": "missing_tag"}
    assert re.fullmatch(r"the file ends inside SOPInstanceUID \(0008,0018\): 10 of \d\d value bytes present",
                        rej["in_uid.dcm"][1])  # where, and how much: no value, not even the UID's digits
    assert rej["in_pixels.dcm"][1] == "truncated: the file ends inside PixelData (7FE0,0010): 5192 of 8192 value bytes present"
    assert rej["deferred_in_pixels.dcm"][1].endswith("PixelData (7FE0,0010): 130072 of 131072 value bytes present")
    assert rej["no_modality.dcm"][1] == "Modality"
    skipped_text = (tmp_path / "out" / "skipped.jsonl").read_text()
    skipped = {key[e["key"]]: e["reason"] for e in map(json.loads, skipped_text.splitlines())}
    assert skipped == {"readme.txt": "not_dicom", "empty.dcm": "not_dicom", "noise.bin": "not_dicom",
                       "DICOMDIR": "dicomdir"}
    assert summary["skipped"] == {"not_dicom": 3, "dicomdir": 1}
    assert summary["rejected"] == {"missing_tag": 1, "pixel_decode_failed": 2, "truncated": 3}
    assert "readme" not in skipped_text and "noise" not in skipped_text  # listed by keyed hash, never by name


def test_reader_finds_no_truncation_in_whole_files():
    """Every file pydicom and pydicom-data ship reads as whole, except the three cut short on purpose."""
    flagged = {}
    data_store = Path(get_testdata_file("RG1_UNCR.dcm")).parent  # pydicom-data: large, lazily read pixel data
    for p in sorted([*PYDICOM_DATA.rglob("*"), *data_store.rglob("*")]):
        if not p.is_file():
            continue
        try:
            r = read_dicom(p)
        except NotDicomError:
            continue
        except DicomReadError as e:
            flagged[p.name] = e.reason
            continue
        if r.pixels_truncated:
            flagged[p.name] = "pixels"
    assert flagged == {"MR_truncated.dcm": "pixels", "rtplan_truncated.dcm": "truncated",
                       "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated"}
