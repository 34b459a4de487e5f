"""Deprecated: the preprocessing helpers moved to :mod:`mgll.adapters.preprocess` (re-exported here for one release).

``OpenClipVisionTower`` was a second layer-selection path that no host used and is gone: the hosts take
``hidden_states[layer]`` of the exported ``CLIPVisionModel`` (:func:`mgll.adapters.clip_vision.to_hf_clip_vision`).
"""

from mgll.adapters.preprocess import (  # noqa: F401
    IMAGE_VIEWS,
    RESAMPLE,
    build_image_processor,
    mgll_image_processor,
    norm_kwargs,
    preprocess_cfg_of,
    view_spec,
)
