"""Example images bundled with the demo, written once into a folder gradio may serve.

Real images where a package ships them (nothing is downloaded): scikit-image's fundus
photograph ``retina()`` and its ``microaneurysms()`` crop, and pydicom-data's CR chest
radiograph ``RG1_UNCR.dcm`` served as the DICOM file itself, so the example exercises the
DICOM path. The synthetic fundus images are drawn by :func:`mgll.data.synthetic.render_fundus`,
the quickstart's own renderer, so the tiny quickstart models see their training distribution.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mgll.io import atomic_path

__all__ = ["Example", "bundled_examples", "default_examples_dir", "pydicom_data_file"]

FREE_TEXT_FUNDUS = "describe the fundus image."
FREE_TEXT_XRAY = "What does this radiograph show?"


@dataclass(frozen=True)
class Example:
    name: str
    path: Path
    question: str  # "mcq" -> the ten-disease preset, else the free-text question
    source: str


def default_examples_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mgll-demo-examples"


def pydicom_data_file(name: str) -> Path | None:
    """A file of the pydicom-data package, found through its installed file list.

    ``pydicom.data.get_testdata_file`` would try to download files it cannot find, with
    retries, which stalls an offline start; the package's RECORD lists what is really there.
    """
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == name:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    return None


def _save(img: Image.Image, path: Path, **kw) -> Path:
    if not path.is_file():
        with atomic_path(path) as tmp:
            img.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **kw)
    return path


def bundled_examples(out_dir: str | os.PathLike | None = None) -> list[Example]:
    """Write (once) and list the examples; those whose package is missing are left out."""
    import numpy as np

    from mgll.data.synthetic import render_fundus

    out = Path(out_dir) if out_dir else default_examples_dir()
    out.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    try:
        from skimage import data as skdata
    except ImportError:
        skdata = None
    if skdata is not None:
        retina = Image.fromarray(skdata.retina()).resize((768, 768), Image.Resampling.LANCZOS)
        examples.append(Example("fundus photograph (scikit-image retina)", _save(retina, out / "retina.jpg", quality=92),
                                "mcq", "skimage.data.retina(): a real fundus photograph"))
        micro = Image.fromarray(skdata.microaneurysms()).convert("RGB")
        examples.append(Example("microaneurysms (scikit-image)", _save(micro, out / "microaneurysms.png"),
                                "mcq", "skimage.data.microaneurysms(): a crop of a real fundus photograph"))
    cr = pydicom_data_file("RG1_UNCR.dcm")
    if cr is not None:
        target = out / "chest-cr.dcm"
        if not target.is_file():
            with atomic_path(target) as tmp:
                shutil.copyfile(cr, tmp)
        examples.append(Example("chest radiograph, DICOM (pydicom-data)", target, FREE_TEXT_XRAY,
                                "pydicom-data RG1_UNCR.dcm: a real CR chest radiograph"))
    for name, diseases, seed in (
        ("synthetic: diabetic retinopathy", {"diabetic retinopathy": 2, "diabetic macular edema": 1}, 11),
        ("synthetic: glaucoma", {"glaucoma": 2}, 12),
        ("synthetic: tessellation + myopia", {"tessellation": 1, "myopia": 1}, 13),
    ):
        img = Image.fromarray(np.asarray(render_fundus(diseases, 256, (seed,)), dtype=np.uint8))
        slug = name.split(": ")[1].replace(" + ", "-").replace(" ", "-")
        examples.append(Example(name, _save(img, out / f"synthetic-{slug}.png"), "mcq", "mgll.data.synthetic.render_fundus"))
    examples.append(Example("synthetic: free-text question", out / "synthetic-glaucoma.png", FREE_TEXT_FUNDUS,
                            "mgll.data.synthetic.render_fundus"))
    return examples
