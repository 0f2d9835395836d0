"""Benchmark cases, one module each; ``get_case(name, size, device)`` builds one."""

from __future__ import annotations

import importlib

from benchmarks.harness import Case

# name -> (module, keyword arguments of its ``make``)
CASES: dict[str, tuple[str, dict]] = {
    "mae": ("mae", {}),
    "unetr": ("segmentation", {"_make": "make_unetr"}),
    "swin_unetr_fs24": ("segmentation", {"_make": "make_swin_unetr", "feature_size": 24}),
    "swin_unetr_fs48": ("segmentation", {"_make": "make_swin_unetr", "feature_size": 48}),
    "sliding_window": ("sliding_window", {}),
    "sliding_window_blend": ("sliding_window", {"_make": "make_blend"}),
    "data": ("data", {}),
    "onnx_sliding_window": ("onnx_inference", {}),
}


def get_case(name: str, size: str = "small", device: str = "cpu") -> Case:
    """The case ``name`` at ``size`` (``tiny`` where supported, ``small``, ``full``)."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    module, kwargs = CASES[name]
    kwargs = dict(kwargs)
    make = getattr(
        importlib.import_module(f"benchmarks.cases.{module}"), kwargs.pop("_make", "make")
    )
    return make(size=size, device=device, **kwargs)
