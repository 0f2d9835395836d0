"""Does an encoder see an organ the same way in every contrast phase? A cross-phase organ probe.

docs/evidence.md ("A cross-phase contrast"): a UNETR fine-tuned on one labeled phantom scores
0.05-0.15 Dice lower on phantoms in a phase that phantom lacks. This measures the encoder's side
of that, with no fine-tuning, on multiphase exams (one anatomy, voxel-aligned, in every phase) of a
labeled collection that neither pretraining nor any study reads:

- **Organ probe.** The centre crop of every series, the encoder's deepest map (one feature per
  patch) and each patch's majority label (background left out). A logistic regression is fit on
  the patches of the first half of the exams in one phase, and scored (balanced accuracy over the
  structures) on the second half's patches in that phase ("same phase") and in every other phase
  ("other phase"). An encoder whose features carry the phase loses accuracy from the first to the
  second, as a segmenter fine-tuned on one phase does.

  umit phantoms --out runs/phseg/inv_src n=16 seed=7 shape=[64,64,48] \
    'phases=[none,arterial,portal]' workers=1         # seed 7: no subject of any other collection
  umit ingest runs/phseg/inv_src --out runs/phseg/inv_raw workers=1
  umit preprocess runs/phseg/inv_raw --out runs/phseg/inv_prep plan_file=runs/phseg/prep/plan.json
  PYTHONPATH=src python benchmarks/phase_invariance.py runs/phseg/inv_prep \
    scratch runs/phseg/cross_phase_unetr/seed0/network.pt ... [--out F.json]

``scratch`` is the network at its seeded random initialisation (seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.models import create_model
from umit.models.heads import feature_map
from umit.ssl.cross_phase import phase_groups
from umit.train.checkpoint import load_network_weights

MODEL = "unetr"
MODEL_ARGS: dict[str, Any] = {"encoder": "vit3d_tiny_p8", "feature_size": 16}


def patch_features(
    net: torch.nn.Module,
    crops: StoreCropDataset,
    cases: list[str],
    patch: int,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per case, the centre crop's features (L, C) (the deepest map, or the output of encoder
    block ``block``) and the patches' majority labels (L,)."""
    feats, labels = [], []
    size = np.asarray(crops.crop_size)
    for case in cases:
        shape = np.asarray(crops.store.case(case).spatial_shape)
        item = crops.read_crop(case, (shape - size) // 2)
        with torch.no_grad():
            x = item["image"][None]
            if block is None:
                f = feature_map(net.encoder, x)[0]  # (C, d, h, w)
            else:
                f = net.encoder.forward_intermediates(x, indices=[block])[0][0]
        feats.append(f.flatten(1).T.numpy())  # (L, C), in flatten order
        lab = item["label"][0].numpy()  # (D, H, W) -> (d, p, h, p, w, p) -> majority per patch
        d, h, w = (s // patch for s in lab.shape)
        blocks = lab.reshape(d, patch, h, patch, w, patch).transpose(0, 2, 4, 1, 3, 5)
        blocks = blocks.reshape(d * h * w, -1)
        labels.append(np.array([np.bincount(b).argmax() for b in blocks]))
    return np.stack(feats), np.stack(labels)  # (E, L, C), (E, L)


def organ_probe(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fit on the first half of the exams in one phase; score the second half in every phase."""
    phases = list(feats)
    n = next(iter(feats.values())).shape[0]
    fit, held = slice(0, n // 2), slice(n // 2, n)
    scores: dict[str, float] = {}
    for p in phases:
        x, y = feats[p][fit].reshape(-1, feats[p].shape[-1]), labels[p][fit].reshape(-1)
        keep = y > 0  # background is not a structure
        scaler = StandardScaler().fit(x[keep])
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x[keep]), y[keep])
        for q in phases:
            xq, yq = feats[q][held].reshape(-1, feats[q].shape[-1]), labels[q][held].reshape(-1)
            kq = yq > 0
            pred = clf.predict(scaler.transform(xq[kq]))
            scores[f"{p}->{q}"] = float(balanced_accuracy_score(yq[kq], pred))
    same = [v for k, v in scores.items() if k.split("->")[0] == k.split("->")[1]]
    other = [v for k, v in scores.items() if k.split("->")[0] != k.split("->")[1]]
    return {
        "by_pair": scores,
        "same_phase": float(np.mean(same)),
        "other_phase": float(np.mean(other)),
    }


def measure(
    store_dir: Path, networks: list[str], crop: int = 32, block: int | None = None
) -> dict[str, Any]:
    store = Store(store_dir)
    phases, groups = phase_groups(store, sorted(store.index))
    exams = [g for g in groups.values() if all(c is not None for c in g)]
    if len(exams) < 4:
        raise SystemExit(f"{store_dir}: need at least 4 exams with every phase, found {len(exams)}")
    crops = StoreCropDataset(store_dir, (crop,) * 3, cases=[c for g in exams for c in g])
    out: dict[str, Any] = {
        "store": str(store_dir), "exams": len(exams), "phases": phases, "block": block,
    }  # fmt: skip
    for name in networks:
        torch.manual_seed(0)
        net = create_model(MODEL, img_size=(crop,) * 3, in_chans=1, out_channels=10, **MODEL_ARGS)
        if name != "scratch":
            load_network_weights(net, name)
        net.eval()
        patch = crop // feature_map(net.encoder, torch.zeros(1, 1, crop, crop, crop)).shape[-1]
        feats, labels = {}, {}
        for i, p in enumerate(phases):
            feats[p], labels[p] = patch_features(net, crops, [g[i] for g in exams], patch, block)
        out[name] = organ_probe(feats, labels)
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "by_pair"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path, help="a preprocessed store of labeled multiphase exams")
    ap.add_argument("networks", nargs="+", help="network.pt files, or 'scratch'")
    ap.add_argument("--block", type=int, help="an encoder block's output instead of the deepest")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = measure(args.store, args.networks, block=args.block)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
