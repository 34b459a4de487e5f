"""One registry of MLLM hosts; each host is a small module registered with :func:`register_host`."""

from __future__ import annotations

from collections.abc import Callable

from mgll.adapters.hosts.base import Host, ShapeMismatch, get_module

__all__ = ["register_host", "get_host", "list_hosts", "Host", "ShapeMismatch", "get_module"]

_HOSTS: dict[str, type[Host]] = {}


def register_host(name: str) -> Callable[[type[Host]], type[Host]]:
    """Class decorator (TinyLLaVA_Factory style): ``@register_host("llava") class LlavaHost(Host): ...``."""

    def wrap(cls: type[Host]) -> type[Host]:
        if name in _HOSTS and _HOSTS[name] is not cls:
            raise ValueError(f"host {name!r} registered twice ({_HOSTS[name].__name__}, {cls.__name__})")
        cls.name = name
        _HOSTS[name] = cls
        return cls

    return wrap


def list_hosts() -> list[str]:
    return sorted(_HOSTS)


def get_host(name: str) -> Host:
    if name not in _HOSTS:
        raise ValueError(f"unknown host {name!r}; known hosts: {', '.join(list_hosts())}")
    return _HOSTS[name]()


# host modules register themselves on import
from mgll.adapters.hosts import instructblip as _instructblip  # noqa: E402,F401
from mgll.adapters.hosts import internvl as _internvl  # noqa: E402,F401
from mgll.adapters.hosts import janus as _janus  # noqa: E402,F401
from mgll.adapters.hosts import llava as _llava  # noqa: E402,F401
from mgll.adapters.hosts import llava_next as _llava_next  # noqa: E402,F401
from mgll.adapters.hosts import medflamingo as _medflamingo  # noqa: E402,F401
from mgll.adapters.hosts import qwen2_vl as _qwen2_vl  # noqa: E402,F401
