"""Can a freshly initialised classifier fit a few labeled cases? (docs/evidence.md, ViT rows)

Two checks on the first ``--cases`` training cases of a classification store:
1. how alike the encoder's mean-pooled features of different inputs are at initialisation
   (minimum pairwise cosine similarity; across-case sd against mean magnitude);
2. full-batch AdamW on those cases, no augmentation (optionally with global-norm gradient
   clipping): the training loss every ``--every`` steps.

    PYTHONPATH=src python benchmarks/adrenal_vit_fit.py runs/adrenal/prep --encoder vit3d_tiny_p8
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from umit.data.cases import centred_input
from umit.data.store import Store
from umit.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="preprocessed store with a train split and a per-case label")
    ap.add_argument("--encoder", default="vit3d_tiny_p8")
    ap.add_argument("--pool", default="mean")
    ap.add_argument("--label-key", default="target")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--size", type=int, nargs=3, default=[32, 32, 32])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip-grad-norm", type=float, default=None, help="global-norm clipping")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    store = Store(args.data)
    ids = [c for c in store.case_ids if store.index[c].get("split") == "train"][: args.cases]
    if len(ids) < 2:
        raise SystemExit(f"{args.data}: fewer than 2 training cases")
    size = tuple(args.size)
    x = torch.stack([centred_input(store, c, size) for c in ids])  # (N, C, D, H, W)
    y = torch.tensor([int(store.index[c][args.label_key]) for c in ids])
    model = create_model(
        "classifier", encoder=args.encoder, pool=args.pool, in_chans=x.shape[1], img_size=size,
        num_classes=int(y.max()) + 1,
    )  # fmt: skip

    with torch.no_grad():
        tokens = model.encoder.forward_features(x)  # (N, prefix + T, C) for a ViT
        skip = int(getattr(model.encoder, "num_prefix_tokens", 0))
        pooled = tokens[:, skip:].mean(1) if tokens.ndim == 3 else tokens.flatten(2).mean(2)
    unit = F.normalize(pooled, dim=1)
    print(
        f"{len(ids)} cases ({int(y.sum())} positive), {args.encoder} at init: min cosine "
        f"{float((unit @ unit.t()).min()):.4f}, across-case sd {float(pooled.std(0).mean()):.4f}, "
        f"mean |feature| {float(pooled.abs().mean()):.4f}"
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for step in range(args.steps + 1):
        loss = F.cross_entropy(model(x), y)
        if step % args.every == 0:
            print(f"step {step}: training loss {loss.item():.3f}")
        opt.zero_grad()
        loss.backward()
        if args.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        opt.step()


if __name__ == "__main__":
    main()
