"""Explanations of a model's output: attention maps (ViT), Grad-CAM (CNN, Swin), on the input's
grid (``umit explain``)."""
