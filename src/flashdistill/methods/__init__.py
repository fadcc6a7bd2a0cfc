"""Distillation methods, one file each; every method module defines ``PRESETS``,
``build_config(teacher, preset, *layers)`` and ``Method`` (its class, on the loop protocol of
:mod:`flashdistill.train`). ``dsm`` trains teachers and is not a distillation method."""
from __future__ import annotations

import importlib

METHODS = ("flash", "lcm", "splam", "lightning", "codi")


def method_module(name: str):
    """The module of distillation method ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")
