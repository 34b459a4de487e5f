"""Load a swapped folder the way a user outside mgll does, in a process that never imports mgll.

usage: python auto_load.py FOLDER INPUTS.safetensors OUT.safetensors REMOTE(0|1)

Loads with ``AutoModelForImageTextToText`` (``trust_remote_code`` when REMOTE) and ``AutoProcessor``
(always ``trust_remote_code``: every swapped folder's image processor is remote code), runs the forward and a 4-token greedy ``generate`` on the saved inputs, writes logits
and generated ids to OUT and the facts (classes, whether mgll got imported) to OUT.json. With REMOTE it first tries a load
without the flag and records how it failed.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, inputs_path, out_path, remote = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
facts = {}
if remote:
    try:
        AutoModelForImageTextToText.from_pretrained(folder)
        facts["without_flag"] = "loaded"
    except Exception as e:  # noqa: BLE001 - recording what a user would see
        facts["without_flag"] = f"{type(e).__name__}: {e}"
try:
    AutoProcessor.from_pretrained(folder)
    facts["processor_without_flag"] = "loaded"
except Exception as e:  # noqa: BLE001 - recording what a user would see
    facts["processor_without_flag"] = f"{type(e).__name__}: {e}"
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=remote).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = load_file(inputs_path)
with torch.no_grad():
    logits = model(**inputs).logits
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
save_file({"logits": logits.float().contiguous(), "generated": gen.contiguous()}, out_path)
facts.update(
    model_class=type(model).__name__,
    model_module=type(model).__module__,
    processor_class=type(processor).__name__,
    image_processor_class=type(processor.image_processor).__name__,
    image_processor_module=type(processor.image_processor).__module__,
    mgll_imported=any(m == "mgll" or m.startswith("mgll.") for m in sys.modules),
)
with open(out_path + ".json", "w", encoding="utf-8") as f:  # stdout also carries transformers' remote-code prompt
    json.dump(facts, f)
