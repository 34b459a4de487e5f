"""An alignment example's prompt part is token for token the prompt inference builds for the same question and image.

Found: alignment batches were laid out differently from inference (no `<|vision_start|>`/`<|vision_end|>` for
Qwen2-VL, the caption after a bare newline with no chat template, an empty instruction for InstructBLIP's
Q-Former), so a projector trained on one layout was evaluated on another. Checked on stock tiny models built
from transformers' own classes with each release's special tokens and chat template.
"""

import sys
from pathlib import Path

import pytest
import torch

from mgll.adapters.align import AlignConfig, align, load_aligned, record_caption
from mgll.adapters.hosts import get_host
from mgll.adapters.prompts import build_prompt, encode_prefix
from mgll.adapters.swap import load_swapped
from mgll.cli import main
from mgll.data import make_synthetic

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from stock_models import build_stock  # noqa: E402
from test_pixel_parity import photo  # noqa: E402

HOSTS = ["instructblip", "internvl", "janus", "llava", "llava_next", "qwen2_vl"]
INSTRUCTION = "Describe the findings in this fundus photograph."
MARKERS = {"qwen2_vl": ("<|vision_start|>", "<|vision_end|>"), "internvl": ("<img>", "</img>"),
           "janus": ("<begin_of_image>", "<end_of_image>")}


@pytest.fixture(scope="module")
def encoder_dir(tiny_encoder):
    return tiny_encoder  # conftest: a seeded random tiny MGLL encoder run folder


def swapped(tmp_path, host, encoder_dir):
    build_stock(host, tmp_path / "src")
    assert main(["swap", "--host", host, "--mllm", str(tmp_path / "src"), "--encoder", str(encoder_dir),
                 "--out", str(tmp_path / "swapped")]) == 0
    return load_swapped(tmp_path / "swapped")


@pytest.mark.parametrize("host", HOSTS)
def test_alignment_prompt_ids_equal_the_inference_prompt(host, encoder_dir, tmp_path):
    model, processor = swapped(tmp_path, host, encoder_dir)
    images = [photo(150, 200, seed=1), photo(64, 90, seed=2)]
    targets = ["status: abnormal. disease: drusen.", "status: normal."]
    batch = get_host(host).build_batch(model, processor, images, [INSTRUCTION] * 2, targets)
    tok = processor.tokenizer
    for i, (image, target) in enumerate(zip(images, targets)):
        infer = encode_prefix(processor, build_prompt(host, processor, INSTRUCTION), image, "cpu", torch.float32)
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        labels = batch["labels"][i][batch["attention_mask"][i].bool()]
        n = int(infer["input_ids"].shape[1])
        assert ids[:n].tolist() == infer["input_ids"][0].tolist(), f"{host}: row {i}'s prompt differs from inference's"
        assert (labels[:n] == -100).all()  # no loss on the prompt
        want_tail = tok(target, add_special_tokens=False)["input_ids"] + get_host(host).target_end_ids(model, tok)
        assert ids[n:].tolist() == want_tail and labels[n:].tolist() == want_tail
        if host in MARKERS:  # the vision markers the tiny models once hid behind BOS
            start, end = (tok.convert_tokens_to_ids(t) for t in MARKERS[host])
            row = ids[:n].tolist()
            assert start in row and end in row and row.index(start) < row.index(end)
        if host == "instructblip":  # the Q-Former reads the instruction, not an empty string
            q = batch["qformer_input_ids"][i][batch["qformer_attention_mask"][i].bool()]
            assert q.tolist() == infer["qformer_input_ids"][0].tolist()
            assert len(processor.qformer_tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]) > 3
    if "mm_token_type_ids" in batch:  # Qwen2-VL's M-RoPE types: 1 on image tokens, 0 on every text token of the target
        image_id = int(model.config.image_token_id)
        torch.testing.assert_close(batch["mm_token_type_ids"], ((batch["input_ids"] == image_id) & batch["attention_mask"].bool()).long())


def test_align_instruction_and_chat_template_are_used_and_kept(encoder_dir, tmp_path):
    """`mgll align --instruction --chat-template`: the run trains on that layout and `load_aligned` asks with it."""
    host = "qwen2_vl"
    swapped(tmp_path, host, encoder_dir)
    ds = make_synthetic(tmp_path / "data", kind="fundus", n=8, size=48, seed=3)
    template = tmp_path / "t.jinja"
    template.write_text("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
                        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
                        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    seen = []

    def after_training(model, batch):
        seen.append(batch["input_ids"])

    cfg = AlignConfig(model=str(tmp_path / "swapped"), data=str(tmp_path / "data"), out=str(tmp_path / "run"), stage=1,
                      split=None, steps=2, batch_size=2, instruction="what do you see?", chat_template=str(template))
    align(cfg, progress=False, after_training=after_training)
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == template.read_text()
    model, processor = load_aligned(tmp_path / "swapped", tmp_path / "run")
    assert processor.chat_template == template.read_text()
    prompt = build_prompt(host, processor, "what do you see?")
    assert prompt.startswith("<|im_start|>user\n<|vision_start|>") and "You are a helpful assistant" not in prompt
    image = photo(48, 48)
    infer = encode_prefix(processor, prompt, image, "cpu", torch.float32)["input_ids"][0].tolist()
    row = seen[-1][0].tolist()
    assert row[: len(infer)] == infer  # the last training batch starts with exactly the prompt inference builds
    assert record_caption(ds.card, ds.records[0].labels)  # captions are the targets


def test_a_bad_chat_template_file_is_one_line(encoder_dir, tmp_path, capsys):
    swapped(tmp_path, "llava", encoder_dir)
    make_synthetic(tmp_path / "data", kind="fundus", n=4, size=48, seed=3)
    (tmp_path / "t.jinja").write_text("hello")
    base = ["align", "--model", str(tmp_path / "swapped"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--split", "all", "--steps", "1"]
    assert main([*base, "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--chat-template {tmp_path / 'missing.jinja'}: no such file")
    assert main([*base, "--chat-template", str(tmp_path / "t.jinja")]) == 2
    assert "not a chat template" in capsys.readouterr().err
