"""The swapped classes refuse a config that `mgll swap` never wrote, and never build the stock tower they replace."""

import pytest
import torch

from mgll.adapters.hosts import get_host
from mgll.adapters.swap import swap_model
from mgll.encoder.factory import create_encoder
from mgll.testing.tiny import make_tiny_instructblip, make_tiny_janus, make_tiny_qwen2_vl

# host -> (modelling module, the stock tower class the stock __init__ builds, where the MGLL tower sits)
STOCK_TOWER = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel", "model.visual"),
    "janus": ("transformers.models.janus.modeling_janus", "JanusVisionModel", "model.vision_model"),
    "instructblip": ("transformers.models.instructblip.modeling_instructblip", "InstructBlipVisionModel", "vision_model"),
}
TINY = {"qwen2_vl": make_tiny_qwen2_vl, "janus": make_tiny_janus, "instructblip": make_tiny_instructblip}


@pytest.mark.parametrize("host_name", sorted(STOCK_TOWER))
def test_swapped_class_needs_the_mgll_tower_entry(host_name, monkeypatch):
    host = get_host(host_name)
    cls, stock = host.model_class(), host.source_class()
    assert cls.__name__ == host.model_class_name and issubclass(cls, stock)
    assert cls.config_class.model_type == f"mgll_{host_name}" != stock.config_class.model_type

    def built(self, config):  # a stock default config is full size (7B for Qwen2-VL): must not be built
        raise AssertionError("the stock model was built before the config was checked")

    monkeypatch.setattr(stock, "__init__", built)
    with pytest.raises(ValueError, match=rf"no 'mgll_tower' entry: this is not a {host.source_class_name} folder"):
        cls(cls.config_class())
    with pytest.raises(AssertionError, match="stock model was built"):  # with the entry it goes on to build
        cls(cls.config_class(mgll_tower={"clip_vision_config": {}}))


@pytest.mark.parametrize("host_name", sorted(STOCK_TOWER))
def test_the_stock_tower_is_never_built(host_name, tmp_path, monkeypatch):
    """Building the swapped class from a swapped config never constructs the stock tower class (no allocation to discard)."""
    import importlib

    host = get_host(host_name)
    source = tmp_path / "src"
    TINY[host_name](source, ["describe the image"])
    torch.manual_seed(0)
    model = swap_model(host_name, host.source_class().from_pretrained(source), create_encoder("mgll-tiny-vit")[0])
    module_name, tower_name, attr = STOCK_TOWER[host_name]
    module = importlib.import_module(module_name)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{tower_name} was built")

    monkeypatch.setattr(getattr(module, tower_name), "__init__", refuse)
    rebuilt = host.model_class()(model.config)
    assert getattr(module, tower_name).__init__ is refuse  # the stock name is restored after the build
    tower = rebuilt.get_submodule(attr)
    assert type(tower).__name__.startswith("Mgll")
    assert {k: v.shape for k, v in tower.state_dict().items()} == {k: v.shape for k, v in model.get_submodule(attr).state_dict().items()}


def test_internvl_class_refuses_a_stock_vision_config():
    """A stock InternVL config names an InternViT: the swapped class says so instead of building a random one."""
    from transformers import CLIPVisionConfig, InternVLVisionConfig

    cls = get_host("internvl").model_class()
    assert cls.config_class.model_type == "mgll_internvl"
    with pytest.raises(ValueError, match="vision_config is a InternVLVisionConfig, not a CLIPVisionConfig"):
        cls(cls.config_class(vision_config=InternVLVisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)))
    cfg = cls.config_class(vision_config={"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 7})
    assert isinstance(cfg.vision_config, CLIPVisionConfig)  # resolved by model_type, as a saved config.json is
