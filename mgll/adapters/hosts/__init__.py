"""One registry of MLLM hosts; each host is a small module registered with :func:`register_host`."""

from __future__ import annotations

from mgll.adapters.hosts.base import Host, ShapeMismatch, get_module
from mgll.adapters.hosts.registry import get_host, list_hosts, register_host

__all__ = ["register_host", "get_host", "list_hosts", "Host", "ShapeMismatch", "get_module"]

# host modules register themselves on import
from mgll.adapters.hosts import instructblip as _instructblip  # noqa: E402,F401
from mgll.adapters.hosts import internvl as _internvl  # noqa: E402,F401
from mgll.adapters.hosts import janus as _janus  # noqa: E402,F401
from mgll.adapters.hosts import llava as _llava  # noqa: E402,F401
from mgll.adapters.hosts import llava_next as _llava_next  # noqa: E402,F401
from mgll.adapters.hosts import medflamingo as _medflamingo  # noqa: E402,F401
from mgll.adapters.hosts import qwen2_vl as _qwen2_vl  # noqa: E402,F401
