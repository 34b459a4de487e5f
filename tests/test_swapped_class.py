"""The swapped classes refuse a config that `mgll swap` never wrote, before building anything."""

import pytest

from mgll.adapters.hosts import get_host


@pytest.mark.parametrize("host_name", ["qwen2_vl", "internvl", "janus", "instructblip"])
def test_swapped_class_needs_the_mgll_tower_entry(host_name, monkeypatch):
    host = get_host(host_name)
    cls, stock = host.model_class(), host.source_class()
    assert cls.__name__ == host.model_class_name and issubclass(cls, stock)

    def built(self, config):  # a stock default config is full size (7B for Qwen2-VL): must not be built
        raise AssertionError("the stock model was built before the config was checked")

    monkeypatch.setattr(stock, "__init__", built)
    with pytest.raises(ValueError, match=rf"no 'mgll_tower' entry: this is not a {host.source_class_name} folder"):
        cls(stock.config_class())
    with pytest.raises(AssertionError, match="stock model was built"):  # with the entry it goes on to build
        cls(stock.config_class(mgll_tower={"clip_vision_config": {}}))
