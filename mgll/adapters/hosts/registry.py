"""The registry of MLLM hosts: each host module registers its class here (TinyLLaVA_Factory style).

Host modules import this module, never the ``hosts`` package, so the package can import every host
without a circle.
"""

from __future__ import annotations

from collections.abc import Callable

from mgll.adapters.hosts.base import Host

__all__ = ["register_host", "get_host", "list_hosts"]

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
