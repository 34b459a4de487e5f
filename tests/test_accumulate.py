"""Issue 17: feature-cached accumulation (train.accum_steps) is the plain step on the same global batch.

One step of accum_steps = k equals one plain step: the same loss and every gradient within 1e-5
(fp32, CPU) for clip, siglip and mgll, on one process and on two (torchrun, gloo); dropout masks are
replayed in the second pass; the trainer, a resumed run, DeepSpeed ZeRO-2 and bad settings behave.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mgll.encoder.accumulate import GradCache, check_accum_steps
from mgll.encoder.config import load_config
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.encoder.text_encoding import encode_texts
from mgll.encoder.trainer import make_accelerator, train

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from dist_common import build, global_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LOSSES = ["clip", "siglip", "mgll"]


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("fp32")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_step(loss_name, prepare=None):
    model = build(loss_name)
    if prepare:
        prepare(model)
    images, labels = global_batch()
    out = model(images, labels)
    out["loss"].backward()
    return float(out["loss"].detach()), _grads(model)


def _cached_step(loss_name, accelerator, k, prepare=None):
    model = build(loss_name)
    if prepare:
        prepare(model)
    cache = GradCache(model, accelerator, k)
    terms = cache.forward(*global_batch())
    cache.backward()
    return terms, _grads(model)


def _worst(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_one_accumulated_step_equals_one_plain_step(loss_name, accelerator):
    loss, grads = _plain_step(loss_name)
    assert all(g.abs().max() > 0 for g in grads.values())  # every parameter, both towers and the loss's own
    for k in (2, 4, 8):  # 8: one image per micro-batch
        terms, got = _cached_step(loss_name, accelerator, k)
        assert abs(float(terms["loss"]) - loss) <= 1e-6, (k, float(terms["loss"]), loss)
        worst = _worst(got, grads)
        assert worst <= 1e-5, f"{loss_name} accum_steps={k}: largest gradient difference {worst}"


def _with_dropout(model):
    """Patch dropout in the image tower and dropout after the text tower's final norm: both draw at random."""
    from open_clip.transformer import PatchDropout

    torch.manual_seed(5)
    model.encoder.visual.patch_dropout = PatchDropout(0.5)
    model.encoder.ln_final = nn.Sequential(model.encoder.ln_final, nn.Dropout(0.3))


def test_dropout_masks_are_replayed_in_the_second_pass(accelerator):
    """Reference: one graph over the same micro-batches encoded in the same order (the same draws)."""
    k = 2
    model = build("mgll")
    _with_dropout(model)
    images, labels = global_batch()
    first = model.image_features(images[:4])
    assert not torch.allclose(first, model.image_features(images[:4]))  # dropout is on

    model.zero_grad()
    torch.manual_seed(7)
    batch = model.batch_texts(labels)
    feats = torch.cat([model.image_features(images[j * 4 : (j + 1) * 4]) for j in range(k)])
    half = (len(batch.texts) + 1) // 2  # GradCache's text chunks: the first ones longest
    texts = [encode_texts(model.encoder, model.tokenizer, part, "cpu") for part in (batch.texts[:half], batch.texts[half:])]
    ref_out = model.objective(feats, torch.cat(texts), batch)
    ref_out["loss"].backward()
    reference = _grads(model)

    model.zero_grad()
    torch.manual_seed(7)
    cache = GradCache(model, accelerator, k)
    terms = cache.forward(images, labels)
    cache.backward()
    assert abs(float(terms["loss"]) - float(ref_out["loss"])) <= 1e-5
    assert _worst(_grads(model), reference) <= 1e-5
    after = torch.get_rng_state()
    model.zero_grad()
    torch.manual_seed(7)
    cache.forward(images, labels)
    assert torch.equal(torch.get_rng_state(), after)  # pass 2 leaves the generator where pass 1 did


def test_gradient_checkpointing_gives_the_same_gradients(accelerator):
    _, grads = _plain_step("mgll")
    _, got = _cached_step("mgll", accelerator, 4, prepare=lambda m: m.encoder.set_grad_checkpointing(True))
    assert _worst(got, grads) <= 1e-5


class _CpuBf16:
    """What GradCache uses of an Accelerator, under CPU bf16 autocast (accelerate's state is one per process)."""

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def backward(self, loss):
        loss.backward()


def test_bf16_autocast_is_as_close_to_fp32_as_the_plain_bf16_step():
    """bf16 rounds differently at other batch shapes, so the yardstick is the fp32 gradient: the
    accumulated bf16 step must be no further from it than the plain bf16 step (~2% here)."""
    bf16 = _CpuBf16()
    _, exact = _plain_step("mgll")
    plain = build("mgll")
    with bf16.autocast():
        out = plain(*global_batch())
    out["loss"].backward()

    def error(grads):
        diff = torch.cat([(grads[n] - g).flatten() for n, g in exact.items()]).norm()
        return float(diff / torch.cat([g.flatten() for g in exact.values()]).norm())

    plain_error = error(_grads(plain))
    assert 0 < plain_error < 0.1
    terms, got = _cached_step("mgll", bf16, 4)
    assert abs(float(terms["loss"]) - float(out["loss"].detach())) <= 1e-2
    assert error(got) <= 1.25 * plain_error, (error(got), plain_error)


def _cfg(data, out, model="mgll-tiny-vit", **extra):
    overrides = [f"output_dir={out}", f"data.path={data}", f"model.name={model}", "train.batch_size=16",
                 "train.warmup_steps=2", "train.save_every=3", "train.lr=1e-3"]
    return load_config(overrides=overrides + [f"train.{k}={v}" for k, v in extra.items()])


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_accum_steps_follows_the_plain_trajectory(fundus_dataset, tmp_path):
    plain = train(_cfg(fundus_dataset.root, tmp_path / "plain", steps=3), progress=False)
    accum = train(_cfg(fundus_dataset.root, tmp_path / "accum", steps=3, accum_steps=4), progress=False)
    a, b = _losses(plain), _losses(accum)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert b[-1] < b[0]


@pytest.fixture(scope="module")
def dropout_encoder(tmp_path_factory):
    """A tiny encoder folder whose image tower drops half its patches at random while training."""
    torch.manual_seed(0)
    model, *_, name = create_encoder("mgll-tiny-vit")
    folder = save_encoder(model, tmp_path_factory.mktemp("enc") / "dropout", name, {"loss": "mgll", "levels": []})
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["patch_dropout"] = 0.5
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def test_resumed_accumulated_run_equals_the_uninterrupted_one(fundus_dataset, dropout_encoder, tmp_path):
    """With patch dropout on, so the replayed and checkpointed random state both matter."""
    full = train(_cfg(fundus_dataset.root, tmp_path / "full", dropout_encoder, steps=6, accum_steps=2), progress=False)
    cut = tmp_path / "cut"
    train(_cfg(fundus_dataset.root, cut, dropout_encoder, steps=6, accum_steps=2), max_steps_this_run=3, progress=False)
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (cut / "encoder").exists()
    train(_cfg(fundus_dataset.root, cut, dropout_encoder, steps=6, accum_steps=2), resume=True, progress=False)
    a = load_file(str(full / "encoder" / "open_clip_model.safetensors"))
    b = load_file(str(cut / "encoder" / "open_clip_model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs by {worst}"
    assert _losses(full) == pytest.approx(_losses(cut), abs=1e-6)


def test_bad_accum_settings_are_one_error_naming_the_key():
    with pytest.raises(ValueError, match=r"train.accum_steps must be >= 1, got 0"):
        load_config(overrides=["train.accum_steps=0"])
    with pytest.raises(ValueError, match=r"train.batch_size=16 is not divisible by train.accum_steps=3"):
        load_config(overrides=["train.batch_size=16", "train.accum_steps=3"])
    with pytest.raises(ValueError, match=r"train.batch_size=16 is not divisible by train.accum_steps=4 x 3 process"):
        check_accum_steps(16, 4, 3)
    assert check_accum_steps(256, 16, 1) == 16 and check_accum_steps(4096, 16, 2) == 128


@pytest.mark.slow
def test_two_processes_accumulated_equal_one_process_plain(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(HELPERS / "accum_step.py"), str(tmp_path), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for loss_name in LOSSES:
        got = load_file(str(tmp_path / f"{loss_name}.safetensors"))
        loss, grads = _plain_step(loss_name)
        assert abs(got["loss"].item() - loss) <= 1e-6, loss_name
        worst = _worst({k[len("grad."):]: v for k, v in got.items() if k.startswith("grad.")}, grads)
        assert worst <= 1e-5, f"{loss_name}: largest gradient difference {worst}"


@pytest.mark.slow
def test_zero2_accumulated_follows_the_one_process_plain_trajectory(fundus_dataset, tmp_path):
    pytest.importorskip("deepspeed")
    from ds_env import ROOT, ds_env

    plain = train(_cfg(fundus_dataset.root, tmp_path / "plain", steps=3), progress=False)
    env = ds_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ROOT / "configs/deepspeed/zero2.json"))
    out = tmp_path / "zero2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mgll.cli", "train",
           "--data", str(fundus_dataset.root), "--out", str(out), "--no-progress", "--set", "train.batch_size=16",
           "--set", "train.steps=3", "--set", "train.warmup_steps=2", "--set", "train.save_every=3",
           "--set", "train.lr=1e-3", "--set", "train.accum_steps=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = _losses(plain), _losses(out)
    assert len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (a, b)
