"""The optional peers of the ``[bench]`` extra, imported if installed.

Each name is the module, or None when it is missing; :func:`missing` says how to get it. CI
installs only ``.[test]``, so every scenario must cope with any of them being None.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["blinker", "janus", "missing", "pubsub", "pyee"]


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


blinker = _optional("blinker")
pyee = _optional("pyee")
janus = _optional("janus")
pubsub = _optional("pubsub.pub")  # the pypubsub distribution


def missing(distribution: str) -> str:
    """The skip reason for a peer that is not installed."""
    return f"{distribution} is not installed (pip install -e '.[bench]')"
