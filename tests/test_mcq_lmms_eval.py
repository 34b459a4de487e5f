"""lmms-eval itself, on CPU and offline, scores an exported task exactly as ``mgll mcq run --mode generate``.

A tiny LLaVA gets an MGLL encoder swapped in (``mgll swap``), a circular bank is scored by
``mgll mcq run --mode generate``, exported with ``mgll mcq export --format lmms-eval`` and run
through lmms-eval's stock ``llava_hf`` wrapper (``LlavaForConditionalGeneration`` + ``AutoProcessor``)
in ``.venv-lmms`` (scripts/install_lmms_eval.sh, run here when missing; about 100 s once).
lmms-eval's per-disease metrics and Average must equal mgll's, and its logged answer texts,
read back by ``mgll mcq import``, must equal mgll's answer by answer: the same prompt, pixels and
greedy decoding, not merely the same totals.

Two things the folder and the command line need, both true of real checkpoints and runs:
- a chat template on the processor: llava_hf renders the prompt with ``processor.apply_chat_template``
  and mgll uses the processor's template when it has one (llava-hf checkpoints ship one; the tiny
  model gets LLaVA-1.5's, minus its generation markers);
- ``device=cpu,device_map=cpu``: llava_hf's default ``device_map=""`` is refused by transformers 5;
- ``trust_remote_code=True``: the swapped processor's image processor (the encoder's own view) is the folder's code.

The random tiny model (seed 0) names "cataract" in most answers, so a question whose answer is
cataract is right in every rotation and the others are not: the accuracies differ by disease, and
a wrong all-rotations rule, prompt or image on either side would show. lmms-eval runs without mgll
importable, as a user of the exported folder would.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgll.cli import main
from mgll.data import FUNDUS_DISEASES, make_synthetic
from mgll.data.question_bank import QUESTION
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.export_common import metric_key
from mgll.mllm_eval.report import load_results
from mgll.testing.tiny import make_tiny_llava

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lmms"
WORDS = [QUESTION, " ".join(FUNDUS_DISEASES), "a b c d . answer with the option's letter from the given choices directly user assistant :"]
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def lmms_python():
    """``.venv-lmms/bin/python``, installed on top of the environment running the tests when missing."""
    subprocess.run(["bash", str(ROOT / "scripts" / "install_lmms_eval.sh")], cwd=ROOT, check=True,
                   env={**os.environ, "BASE": sys.executable}, timeout=1200)
    return VENV / "bin" / "python"


def test_lmms_eval_llava_hf_equals_mcq_run_generate(tmp_path, lmms_python, one_thread):
    from transformers import AutoProcessor

    make_synthetic(tmp_path / "fundus", n=20, size=16, seed=4)
    bank = tmp_path / "bank.jsonl"
    assert main(["mcq", "build", str(tmp_path / "fundus"), str(bank), "--seed", "3", "--circular"]) == 0
    make_tiny_llava(tmp_path / "llava", WORDS, seed=0)
    torch.manual_seed(0)
    enc, _, _, _, name = create_encoder("mgll-tiny-vit")
    save_encoder(enc, tmp_path / "enc", name)
    model = tmp_path / "swapped"
    assert main(["swap", "--host", "llava", "--mllm", str(tmp_path / "llava"), "--encoder", str(tmp_path / "enc"),
                 "--out", str(model)]) == 0
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)  # the encoder's view is the folder's code
    processor.chat_template = LLAVA_15_TEMPLATE
    processor.save_pretrained(model)

    assert main(["mcq", "run", "--host", "llava", "--model", str(model), "--bank", str(bank), "--out", str(tmp_path / "mgll_run"),
                 "--mode", "generate", "--device", "cpu", "--no-progress"]) == 0
    mine = load_results(tmp_path / "mgll_run")
    assert main(["mcq", "export", str(bank), "--format", "lmms-eval", str(tmp_path / "task")]) == 0

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    no_mgll = subprocess.run([str(lmms_python), "-c", "import mgll.mllm_eval"], cwd=tmp_path, env=env, capture_output=True)
    assert no_mgll.returncode != 0  # the task folder has to stand on its own
    cmd = [str(lmms_python), "-m", "lmms_eval", "--model", "llava_hf",
           "--model_args", f"pretrained={model},device=cpu,device_map=cpu,dtype=float32,trust_remote_code=True",
           "--include_path", str(tmp_path / "task"), "--tasks", "mgll_fundus_mcq", "--batch_size", "1",
           "--output_path", str(tmp_path / "logs"), "--log_samples"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "Error" not in log.replace("stderr", ""), log[-4000:]

    (results_file,) = (tmp_path / "logs").glob("*/*_results.json")
    theirs = json.loads(results_file.read_text())["results"]["mgll_fundus_mcq"]
    assert theirs["average,none"] == pytest.approx(mine["average"], abs=1e-9)
    got = {}
    for disease, d in mine["per_disease"].items():
        if d["n"]:
            got[disease] = theirs[f"{metric_key(disease)},none"]
            assert got[disease] == pytest.approx(d["accuracy"], abs=1e-9), disease
    assert max(got.values()) == 100.0 and min(got.values()) == 0.0  # not a trivially equal all-zero table

    (samples,) = (tmp_path / "logs").glob("*/*_samples_mgll_fundus_mcq.jsonl")
    assert main(["mcq", "import", str(samples), "--bank", str(bank), "--out", str(tmp_path / "imported")]) == 0
    text = {}
    for side in ("mgll_run", "imported"):
        rows = [json.loads(line) for line in open(tmp_path / side / "answers.jsonl")]
        text[side] = {(r["qid"], r["rotation"]): r["text"] for r in rows}
    assert len(text["mgll_run"]) == mine["n_questions"] * 4 and text["imported"] == text["mgll_run"]
    assert load_results(tmp_path / "imported")["per_disease"] == mine["per_disease"]
