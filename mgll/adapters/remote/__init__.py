"""Modelling files that travel inside swapped folders, so that they load without mgll.

A host whose stock class hard-codes its vision tower (Qwen2-VL, InternVL's config, Janus,
InstructBLIP) cannot hold an MGLL ViT as a plain transformers checkpoint. Its swapped folder
therefore uses the Hub's remote-code layout: ``config.json`` names a model type of its own
(``mgll_qwen2_vl``, ...) and an ``auto_map``, and the files of this package sit beside the
weights. ``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` then
builds the MGLL tower; without the flag transformers refuses the unknown model type instead
of building a random stock tower.

Every module here imports only torch, transformers and its sibling ``mgll_clip_tower``
(relatively): they run in processes that never import mgll. mgll's hosts import the same
classes, so a folder loads through one code path whichever way it is opened.
"""
