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

- **Phase difference left (``--harmonise``).** The same crops through a cross-phase network used
  as a front (``finetune.harmonise``): per structure, the mean absolute difference between two
  phases of one exam, of the input and of the front's output (every predicted phase), over every
  voxel of the structure and every pair of phases. A front that predicts every phase exactly
  leaves none; copying the input leaves all of it.
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
from umit.finetune.run import harmonising_front
from umit.models import create_model
from umit.models.harmonised import PhaseHarmonisedModel
from umit.models.heads import feature_map
from umit.ssl.cross_phase import phase_groups
from umit.train.checkpoint import load_network_weights

MODEL = "unetr"
MODEL_ARGS: dict[str, Any] = {"encoder": "vit3d_tiny_p8", "feature_size": 16}


def require_exams(n: int, where: str) -> None:
    """The probe fits on half the exams and scores the other half: it needs two of each."""
    if n < 4:
        raise ValueError(
            f"{where}: the organ probe needs at least 4 exams with every phase, got {n}"
        )


def centre_crops(crops: StoreCropDataset, cases: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """The centre crop of each case: images (E, 1, c, c, c) and label maps (E, c, c, c)."""
    size = np.asarray(crops.crop_size)
    items = [
        crops.read_crop(c, (np.asarray(crops.store.case(c).spatial_shape) - size) // 2)
        for c in cases
    ]
    return torch.stack([it["image"] for it in items]), np.stack(
        [it["label"][0].numpy() for it in items]
    )


def patch_majority(labels: np.ndarray, patch: int) -> np.ndarray:
    """(E, D, H, W) label maps -> (E, L) majority label of each patch, in flatten order."""
    e, d, h, w = labels.shape[0], *(s // patch for s in labels.shape[1:])
    # (E, d, p, h, p, w, p) -> (E, d, h, w, p, p, p) -> (E * L, p^3)
    blocks = labels.reshape(e, d, patch, h, patch, w, patch).transpose(0, 1, 3, 5, 2, 4, 6)
    blocks = blocks.reshape(e * d * h * w, -1)
    return np.array([np.bincount(b).argmax() for b in blocks]).reshape(e, d * h * w)


def encoder_features(
    net: torch.nn.Module, images: torch.Tensor, block: int | None = None
) -> np.ndarray:
    """(E, 1, ...) -> (E, L, C): the deepest map, or the output of encoder block ``block``."""
    with torch.no_grad():
        if block is None:
            f = feature_map(net.encoder, images)  # (E, C, d, h, w)
        else:
            f = net.encoder.forward_intermediates(images, indices=[block])[0]
    return f.flatten(2).transpose(1, 2).numpy()


def organ_probe(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fit on the first half of the exams in one phase; score the second half in every phase."""
    phases = list(feats)
    n = next(iter(feats.values())).shape[0]
    require_exams(n, "organ_probe")
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


def phase_difference(
    images: dict[str, torch.Tensor], maps: dict[str, np.ndarray], outputs: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per structure: mean |a - b| between every two phases of each exam, of the inputs
    (``images``: phase -> (E, 1, ...)) and of ``outputs`` (phase -> (E, P, ...), averaged over
    the P channels), over the structure's voxels (``maps``: phase -> (E, ...), one anatomy)."""
    phases = list(images)
    labels = maps[phases[0]]
    out: dict[str, dict[str, float]] = {}
    for k in sorted(int(v) for v in np.unique(labels) if v > 0):
        mask = torch.from_numpy(labels == k)  # (E, ...)
        d_in, d_out = [], []
        for i, p in enumerate(phases):
            for q in phases[i + 1 :]:
                d_in.append((images[p] - images[q]).abs()[:, 0][mask].mean())
                d_out.append((outputs[p] - outputs[q]).abs().mean(1)[mask].mean())
        a, b = float(torch.stack(d_in).mean()), float(torch.stack(d_out).mean())
        out[str(k)] = {"input": a, "output": b, "left": b / a if a > 0 else float("nan")}
    return out


def _front(path: Path) -> PhaseHarmonisedModel:
    """A cross-phase ``network.pt`` in front of nothing: ``harmonise`` is what a segmenter
    behind it would see."""
    art = harmonising_front(path, in_chans=1)
    front = create_model(art["model_name"], **art["model_args"])
    front.load_state_dict(art["state_dict"])
    return PhaseHarmonisedModel(front, torch.nn.Identity())


def measure(
    store_dir: Path,
    networks: list[str],
    crop: int = 32,
    block: int | None = None,
    harmonise: bool = False,
) -> dict[str, Any]:
    store = Store(store_dir)
    phases, groups = phase_groups(store, sorted(store.index))
    exams = [g for g in groups.values() if all(c is not None for c in g)]
    require_exams(len(exams), str(store_dir))
    crops = StoreCropDataset(store_dir, (crop,) * 3, cases=[c for g in exams for c in g])
    # read once: every network sees the same crops
    images, maps = {}, {}
    for i, p in enumerate(phases):
        images[p], maps[p] = centre_crops(crops, [g[i] for g in exams])
    out: dict[str, Any] = {
        "store": str(store_dir), "exams": len(exams), "phases": phases, "block": block,
    }  # fmt: skip
    if harmonise:
        out["label_names"] = store.plan.labels
        for name in networks:
            front = _front(Path(name))
            outputs = {p: front.harmonise(images[p]) for p in phases}
            out[name] = phase_difference(images, maps, outputs)
            print(
                name, json.dumps({k: round(v["left"], 3) for k, v in out[name].items()}), flush=True
            )
        return out
    for name in networks:
        torch.manual_seed(0)
        net = create_model(MODEL, img_size=(crop,) * 3, in_chans=1, out_channels=10, **MODEL_ARGS)
        if name != "scratch":
            load_network_weights(net, name)
        net.eval()
        feats = {p: encoder_features(net, images[p], block) for p in phases}
        side = round(next(iter(feats.values())).shape[1] ** (1 / 3))  # the map's side (cubic crop)
        labels = {p: patch_majority(maps[p], crop // side) for p in phases}
        out[name] = organ_probe(feats, labels)
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "by_pair"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path, help="a preprocessed store of labeled multiphase exams")
    ap.add_argument("networks", nargs="+", help="network.pt files, or 'scratch'")
    ap.add_argument("--block", type=int, help="an encoder block's output instead of the deepest")
    ap.add_argument("--harmonise", action="store_true",
                    help="the phase difference each network leaves as a front, not the probe")  # fmt: skip
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = measure(args.store, args.networks, block=args.block, harmonise=args.harmonise)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
