"""How much does a fine-tuned UNETR use its ViT? (docs/evidence.md, "Why pretraining the encoder
does not show").

Each model is scored twice on the same cases: as trained, and with every ViT output the decoder
reads (the bottleneck tokens and the skip-level token maps) replaced by its mean over tokens, so
the ViT passes on no spatial information and the decoder keeps only the convolutional path from
the raw image (``encoder1``) plus constant features. The drop in mean Dice is what the ViT's
spatial features contribute; if it is small, a better-pretrained ViT has little to improve.

  PYTHONPATH=src python benchmarks/unetr_vit_ablation.py --data runs/phseg/prep \
      --cases phantom_ct_0006 phantom_ct_0065 ... --models RUN1/best.pt RUN2/best.pt
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from umit.data.store import Store
from umit.inference.segment import predict_case_segmentation
from umit.metrics import segmentation_metrics
from umit.train.checkpoint import InferenceSpec, load_model


@contextmanager
def vit_without_space(model):
    """``model.forward_encoder`` returning token means (per sample and channel) in place of the
    bottleneck and skip maps."""
    original = model.forward_encoder

    def flat(x):
        bottleneck, maps = original(x)
        mean = lambda t: t.mean(dim=tuple(range(2, t.ndim)), keepdim=True).expand_as(t)  # noqa: E731
        return mean(bottleneck), [mean(m) for m in maps]

    model.forward_encoder = flat
    try:
        yield model
    finally:
        model.forward_encoder = original


def dice_mean(model, store, case, spec, labels) -> float:
    pred = predict_case_segmentation(model, store, case, spec)
    ref = np.asarray(store.case(case).read_label())
    per = segmentation_metrics(pred, ref, store.case(case).spacing, labels)
    return float(np.nanmean([m["dice"] for m in per.values()]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--models", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = Store(args.data)
    rows = {}
    for path in args.models:
        model, ckpt = load_model(path)
        spec = InferenceSpec.model_validate(ckpt["spec"])
        labels = sorted(int(v) for v in (ckpt.get("label_names") or {}).values() if int(v) > 0)
        full = [dice_mean(model, store, c, spec, labels or None) for c in args.cases]
        with torch.no_grad(), vit_without_space(model):
            flat = [dice_mean(model, store, c, spec, labels or None) for c in args.cases]
        rows[str(path)] = {"as_trained": float(np.mean(full)), "vit_flat": float(np.mean(flat)),
                           "per_case": list(zip(full, flat, strict=True))}  # fmt: skip
        print(f"{path}: Dice {np.mean(full):.3f} as trained, {np.mean(flat):.3f} with the ViT's "
              f"spatial features removed ({np.mean(flat) - np.mean(full):+.3f})", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
