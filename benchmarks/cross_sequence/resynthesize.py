"""Recompute ``synthesis.json`` of a finished cross-sequence run from its last training
checkpoint (e.g. after a change of the scoring code), without retraining.

    PYTHONPATH=src python benchmarks/cross_sequence/resynthesize.py RUN [RUN ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from umit.data.store import Store
from umit.ssl.cross_sequence import synthesis_scores
from umit.ssl.pretrain import SYNTHESIS_FILE, PretrainConfig, build_method, split_cases
from umit.utils.fileio import atomic_write_json


def resynthesize(run: Path) -> dict:
    cfg = PretrainConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    store = Store(cfg.data)
    names = list(store.plan.channel_names)
    module = build_method(cfg, len(names), names)
    ckpt = torch.load(run / "latest.pt", weights_only=True, map_location="cpu")
    module.load_state_dict(ckpt["model"])
    split = cfg.cross_sequence.synthesis_split
    cases = [c for c in store.case_ids if store.index[c].get("split") == split]
    train, _ = split_cases(store, cfg.exclude_splits, cfg.val_cases, cfg.train.seed)
    scores = synthesis_scores(module, store, cases, cfg.crop_size, fit_cases=train)
    atomic_write_json(run / SYNTHESIS_FILE, scores)
    return scores


if __name__ == "__main__":
    torch.set_num_threads(1)
    for run in sys.argv[1:]:
        for seq, v in resynthesize(Path(run))["targets"].items():
            print(
                run,
                seq,
                f"PSNR {v['model_psnr']:.2f} vs oracle {v['baseline_psnr']:.2f}"
                f" and population {v['population_psnr']:.2f}",
            )
