"""Inference: the sliding-window inferer (and, beside it, the predictor that restores geometry)."""

from umit.inference.sliding_window import SlidingWindowInferer, num_windows, window_starts

__all__ = ["SlidingWindowInferer", "num_windows", "window_starts"]
