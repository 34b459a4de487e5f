"""Peak memory of oversized images with and without the pixel budget, and the cost of ``preflight_images``.

Part 1, memory. Inputs: a Deflated Explicit VR Little Endian DX DICOM of 8000 x 8000 16-bit constant
pixels written with pydicom (about 125 KB on disk, 128 MB of pixels), and a 12000 x 12000 RGB PNG
(constant colour, about 0.5 MB on disk, 432 MB decoded). Each case runs in a fresh subprocess that
first imports everything it needs, resets the kernel's high-water mark (``/proc/self/clear_refs``),
runs the case once and reports VmHWM: the case's peak above the RSS right after the imports
("case peak"), and the process's peak (``ru_maxrss``). Cases:

* ``build-xray``: ``build_xray`` on a folder holding only the DICOM (1 worker), with the default
  40 MP budget (the file is rejected ``too_large``) and with ``MGLL_MAX_PIXELS=100M`` (decoded).
  build_xray reads the file whole with pydicom before the budget check in dicom_pixels fires,
  and pydicom inflates a deflated file whole, so ``header check`` shows what build-xray would
  cost if it called ``check_dicom_budget`` (the lazily inflating header read) first.
* ``demo``: the demo's ``load_image`` on the same DICOM, default budget (refused) vs raised.
* ``png``: ``RecordImageDataset.load_image`` on the PNG, default budget (refused) vs raised.

Part 2, time of ``preflight_images`` (header level and decode=True) on the 600-image synthetic dataset
(``mgll synth --n 600``, 64 px) and on a dataset of one 2000 x 2000 photo-like PNG; median of 5.

    .venv/bin/python benchmarks/image_budget.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20
CASES = {  # name -> (part, budget setting, MGLL_MAX_PIXELS or None for the default)
    "build-xray/default": ("xray", None),
    "build-xray/raised": ("xray", "100M"),
    "build-xray/header check": ("header", None),
    "demo/default": ("demo", None),
    "demo/raised": ("demo", "100M"),
    "png/default": ("png", None),
    "png/raised": ("png", "200M"),
}


# ----------------------------------------------------------------------------- inputs


def write_deflated_dicom(path: Path, side: int = 8000) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    dx = "1.2.840.10008.5.1.4.1.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = dx
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = dx, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = "BENCH", "Bench^Mark"
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = "DX", "Chest", "PA"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 3000  # as detector images carry: the full VOI window pipeline runs
    ds.PixelData = np.full((side, side), 1000, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_inputs(work: Path) -> dict:
    from PIL import Image

    from mgll.data.records import DatasetCard, Level, Record, write_dataset

    (work / "dicom").mkdir(parents=True)
    dcm = work / "dicom" / "bomb.dcm"
    write_deflated_dicom(dcm)
    png_root = work / "png"
    (png_root / "images").mkdir(parents=True)
    Image.new("RGB", (12000, 12000), (90, 60, 30)).save(png_root / "images" / "big.png")
    write_dataset(png_root, DatasetCard("bench", (Level("status", "a {} eye"),)),
                  [Record("images/big.png", {"status": ("normal",)}, split="train")])
    return {"dicom": str(dcm), "dicom_bytes": dcm.stat().st_size, "png": str(png_root / "images" / "big.png"),
            "png_bytes": (png_root / "images" / "big.png").stat().st_size}


# ----------------------------------------------------------------------------- child


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(case: str, work: Path) -> dict:
    import pydicom.pixels  # noqa: F401 - every import before the baseline, so it measures the case only

    from mgll.data import RecordImageDataset, load_dataset
    from mgll.data.build_xray import build_xray
    from mgll.data.dicom_header import check_dicom_budget
    from mgll.data.dicom_pixels import DicomPixelError
    from mgll.demo.inputs import DemoInputError, load_image

    part = CASES[case][0]
    dcm = work / "dicom" / "bomb.dcm"
    ds = load_dataset(work / "png") if part == "png" else None
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if part == "xray":
        out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
        s = build_xray(work / "dicom", out, workers=1, progress=False, salt_file=work / "salt")
        outcome = f"records {s['records']}, rejected {s['rejected']}"
    elif part == "header":
        try:
            outcome = f"within budget: {check_dicom_budget(dcm)} pixels"
        except DicomPixelError as e:
            outcome = f"{e.reason}: {e}"
    elif part == "demo":
        try:
            outcome = f"decoded, shown at {load_image(dcm).size}"
        except DemoInputError as e:
            outcome = f"refused: {e}"
    else:
        try:
            outcome = f"decoded {RecordImageDataset(ds).load_image(0).size}"
        except ValueError as e:
            outcome = f"refused: {e}"
    seconds = time.perf_counter() - t0
    return {"case": case, "baseline_mb": base, "case_peak_mb": _status_mb("VmHWM") - base,
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "outcome": outcome.replace(str(work), "<work>")}


def run_case(case: str, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MGLL_MAX_PIXELS"}
    if CASES[case][1]:
        env["MGLL_MAX_PIXELS"] = CASES[case][1]
    cmd = [sys.executable, __file__, "--child", case, "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: child failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- preflight timing


def time_preflight(work: Path, repeats: int = 5) -> dict:
    from PIL import Image

    from mgll.data import load_dataset, make_synthetic
    from mgll.data.image_checks import preflight_images
    from mgll.data.records import DatasetCard, Level, Record, write_dataset

    synth = make_synthetic(work / "synth", kind="fundus", n=600, size=64, seed=0)
    one = work / "one2000"
    (one / "images").mkdir(parents=True)
    y, x = np.mgrid[0:2000, 0:2000] / 2000
    noise = np.random.default_rng(0).normal(0, 10, x.shape)
    arr = np.stack([np.sin(x * 30 + y * 7) * 100 + 128 + noise] * 3, -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(one / "images" / "photo.png")
    write_dataset(one, DatasetCard("one", (Level("status", "a {} eye"),)),
                  [Record("images/photo.png", {"status": ("normal",)}, split="train")])
    out = {}
    for name, ds in (("600 x 64 px", load_dataset(synth.root)), ("1 x 2000 px", load_dataset(one))):
        for decode in (False, True):
            preflight_images(ds, decode=decode)  # warm the page cache
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                problems = preflight_images(ds, decode=decode)
                ts.append(time.perf_counter() - t)
            out[f"{name}, {'decode' if decode else 'header'}"] = {
                "median_s": statistics.median(ts), "all_s": ts, "images": len(ds), "problems": len(problems),
                "bytes": sum(os.path.getsize(ds.image_path(r)) for r in ds.records),
            }
    return out


# ----------------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work))))
        return

    work = Path(tempfile.mkdtemp(prefix="mgll-budget-bench-"))
    try:
        inputs = write_inputs(work)
        rows = []
        for case in CASES:
            r = run_case(case, work)
            rows.append(r)
            print(f"{case}: case peak {r['case_peak_mb']:.0f} MB, process peak {r['process_peak_mb']:.0f} MB, "
                  f"{r['seconds']:.2f}s: {r['outcome'][:120]}")
        preflight = time_preflight(work)
        for k, v in preflight.items():
            print(f"preflight {k}: {v['median_s'] * 1000:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg": os.getloadavg()},
        "inputs": {"dicom": "8000 x 8000 16-bit DX, Deflated Explicit VR Little Endian",
                   "dicom_bytes": inputs["dicom_bytes"], "png": "12000 x 12000 RGB", "png_bytes": inputs["png_bytes"]},
        "memory": rows,
        "preflight": preflight,
    }
    out = Path(args.out)
    from mgll.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "image_budget.json", result)
    by = {r["case"]: r for r in rows}
    md = [
        "# Pixel budget: peak memory of oversized images, and preflight time",
        "",
        f"Inputs: an 8000 x 8000 16-bit DX DICOM, Deflated Explicit VR Little Endian, {inputs['dicom_bytes'] / 1024:.0f} KB "
        f"on disk (written with pydicom); a 12000 x 12000 RGB PNG, {inputs['png_bytes'] / 1024:.0f} KB. Default budget "
        "40 MP; 'raised' sets MGLL_MAX_PIXELS over the image. Each row is a fresh subprocess; 'case peak' is the "
        "peak RSS of the case above the RSS after the imports (VmHWM reset through /proc/self/clear_refs), "
        "'process peak' the process's ru_maxrss, which includes the transient peak of importing torch, pydicom and "
        "mgll (the same in every row; it hides the rejected cases' true cost, hence the case-peak column).",
        "",
        "| case | budget | case peak MB | RSS after imports MB | process peak MB | s | outcome |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for case, (_, budget) in CASES.items():
        r = by[case]
        outcome = r["outcome"].replace("|", "/")
        md.append(f"| {case.split('/')[0]} {case.split('/')[1]} | {budget or '40 MP'} | {r['case_peak_mb']:.1f} | "
                  f"{r['baseline_mb']:.0f} | {r['process_peak_mb']:.0f} | {r['seconds']:.2f} | {outcome[:160]} |")
    md += [
        "",
        "build-xray checks the budget with `check_dicom_budget` before it reads a file (the header, inflated "
        "lazily up to Pixel Data), so a rejected deflated bomb costs what the 'header check' row shows plus the "
        "builder's own bookkeeping (journal, summary, plot), not its inflated pixels; the 'raised' rows are what "
        "decoding the same file costs.",
        "",
        "## preflight_images (what `mgll train` runs before step 1)",
        "",
        "| dataset | level | images | MB on disk | median ms | ms per image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k, v in preflight.items():
        name, level = k.split(", ")
        md.append(f"| {name} | {level} | {v['images']} | {v['bytes'] / MB:.1f} | {v['median_s'] * 1000:.1f} | "
                  f"{v['median_s'] * 1000 / v['images']:.2f} |")
    la = result["machine"]["loadavg"]
    md += [
        "",
        "Header level: open, identify, size against the budget, PNG `verify()` (inflate + CRC, no unfiltering), "
        "JPEG end-of-image marker. Decode: `load()` + `convert('RGB')`, as training does.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.platform()}, load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} "
        f"at the end (shared machine: times are noisy, memory is not). Command: "
        "`.venv/bin/python benchmarks/image_budget.py --out benchmarks/results`.",
        "",
    ]
    atomic_write_text(out / "image_budget.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
