"""The offline Table-2 demo as a swap: one text-trained LM shared by both towers, then align stage 1 and 2 per tower."""

import json

import torch
from safetensors.torch import load_file

from mgll.adapters.align import CaptionPairs
from mgll.adapters.hosts import get_host
from mgll.adapters.swap import load_swapped
from mgll.data import load_dataset, make_synthetic
from mgll.data.question_bank import QUESTION
from mgll.encoder.factory import create_encoder, save_encoder
from mgll.mllm_eval.demo import CAPTION_INSTRUCTION, run_mcq_demo, text_pairs

torch.set_num_threads(1)


def _lm_state(model):
    host = get_host("llava")
    return {k: v.clone() for k, v in model.named_parameters()
            if not k.startswith(host.tower_path) and not k.startswith(host.projector_path)}


def test_demo_shares_one_text_lm_and_aligns_each_tower_in_two_stages(tmp_path):
    make_synthetic(tmp_path / "data", n=60, size=16, seed=0)
    for i, name in enumerate(("clip", "mgll")):
        torch.manual_seed(i)
        enc, _, _, _, arch = create_encoder("mgll-tiny-vit")
        save_encoder(enc, tmp_path / f"enc-{name}", arch)
    kw = dict(lm_steps=4, stage1_steps=3, stage2_steps=3, batch_size=4, progress=False, lm_cache=tmp_path / "lm-cache")
    summary = run_mcq_demo(tmp_path / "out", tmp_path / "data", tmp_path / "enc-clip", tmp_path / "enc-mgll", **kw)
    out = tmp_path / "out"
    host = get_host("llava")
    assert [r["label"] for r in summary["runs"]] == ["tiny LLaVA", "tiny LLaVA + MGLL"]
    assert summary["timing"]["text_lm_reused"] is False
    lm_dir = summary["training"]["text_lm_folder"]
    assert summary["training"]["text_lm"]["steps"] == 4 and summary["training"]["text_lm"]["trained"].startswith("LM only")

    # 1. one LM, trained on text: both swapped copies carry its LM weights, which differ from the random init
    from transformers import LlavaForConditionalGeneration

    text_lm = _lm_state(LlavaForConditionalGeneration.from_pretrained(lm_dir))
    random_init = _lm_state(LlavaForConditionalGeneration.from_pretrained(lm_dir + "-random-init"))
    assert any(not torch.equal(text_lm[k], random_init[k]) for k in text_lm)
    towers = []
    for name in ("clip", "mgll"):
        swapped, _ = load_swapped(out / f"swap-{name}", with_processor=False)
        assert all(torch.equal(v, text_lm[k]) for k, v in _lm_state(swapped).items())
        towers.append(next(host.tower(swapped).parameters()).clone())
        # 2. stage 1 trained the projector only; stage 2 started from it and added a LoRA adapter on the LM
        s1, s2 = out / f"align-{name}-stage1", out / f"align-{name}-stage2"
        p0 = {k: v for k, v in host.projector(swapped).state_dict().items()}
        p1 = load_file(str(s1 / "projector.safetensors"))
        assert any(not torch.equal(p0[k], p1[k]) for k in p0)
        assert not (s1 / "adapter").exists() and (s2 / "adapter" / "adapter_config.json").is_file()
        sum1, sum2 = (json.loads((d / "summary.json").read_text()) for d in (s1, s2))
        assert (sum1["stage"], sum1["steps"], sum1["mcq_pairs"]) == (1, 3, 0)
        assert (sum2["stage"], sum2["steps"], sum2["config"]["projector"]) == (2, 3, str(s1 / "projector.safetensors"))
        assert sum2["mcq_pairs"] > 0 and sum2["pairs"] == sum1["pairs"] + sum2["mcq_pairs"]
        res = json.loads((out / f"mcq-{name}" / "results.json").read_text())
        assert res["n_questions"] > 0 and res["run"]["alignment"] == str(s2)
        assert res["run"]["model"] == str(out / f"trained-{name}")  # the exported folder mgll demo serves
        trained, _ = load_swapped(out / f"trained-{name}", with_processor=False)
        assert torch.equal(host.projector(trained).state_dict()[next(iter(p1))], load_file(str(s2 / "projector.safetensors"))[next(iter(p1))])
    assert not torch.equal(*towers)  # the arms differ in their tower only
    assert summary["training"]["clip"]["stage2"]["steps"] == summary["training"]["mgll"]["stage2"]["steps"] == 3
    assert "| *Δ vs tiny LLaVA* |" in (out / "comparison" / "comparison.md").read_text()

    # 3. a second comparison on the same data reuses the cached LM (no retraining), bit for bit
    again = run_mcq_demo(tmp_path / "out2", tmp_path / "data", tmp_path / "enc-mgll", tmp_path / "enc-clip", **kw)
    assert again["timing"]["text_lm_reused"] is True and again["training"]["text_lm_folder"] == lm_dir


def test_text_pairs_and_stage2_rows_are_the_scored_prompts(tmp_path):
    ds = make_synthetic(tmp_path / "data", n=40, size=16, seed=0)
    pairs = text_pairs(ds, "train", k=4, seed=1)
    captions = [p for p in pairs if p[0] == CAPTION_INSTRUCTION]
    mcq = [p for p in pairs if p[0].startswith(QUESTION)]
    assert len(captions) == len(ds.split("train")) and len(captions) + len(mcq) == len(pairs)
    assert all(t.startswith("status:") for _, t in captions)
    assert mcq and all(t[0] in "ABCD" and t[1:3] == ". " for _, t in mcq)
    rows = CaptionPairs(load_dataset(tmp_path / "data"), "train", None, CAPTION_INSTRUCTION, mcq_k=4, mcq_seed=1)
    # the image rows of stage 2 are the text LM's rows with their images: same instructions, same targets
    assert [(i, t) for _, i, t in rows.items] == pairs and rows.n_mcq == len(mcq)
    plain = CaptionPairs(load_dataset(tmp_path / "data"), "train", None, CAPTION_INSTRUCTION)
    assert plain.n_mcq == 0 and len(plain) == len(captions)
