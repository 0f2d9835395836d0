"""Multi-process workers of tests/train/test_scale.py (run as torchrun-style processes).

``python tests/train/scale_helpers.py MODE OUT [PREP]``:

- ``fsdp_vit OUT``: FSDP2 (``fully_shard`` per transformer block + root) with activation
  checkpointing on a ViT3D regression, ``VIT_STEPS`` steps, batch ``VIT_BATCH`` per process;
  rank 0 writes ``OUT/latest.pt`` (full weights).
- ``shard OUT PREP``: a Trainer over the crops of a preprocessed store; every rank records the
  (case, crop start) of each sample it trains on, per step, in ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import dist_config  # noqa: E402

from umit.models import create_model  # noqa: E402
from umit.train import RegressionTask, Trainer  # noqa: E402
from umit.train.tasks import ModuleTask  # noqa: E402

SHARD_CROPS = {"samples_per_case": 3, "foreground_prob": 0.5, "seed": 0}
SHARD_STEPS = 9  # 10 cases x 3 crops = 30 samples: 7 global batches of 4 per epoch, then 2 more
VIT_STEPS = 5
VIT_BATCH = 2  # per process; the single-process reference uses 2 x VIT_BATCH


def vit_model() -> torch.nn.Module:
    """A 2-block ViT3D (C=48) on 16³ volumes, patch 8, a 3-output head, checkpointed blocks."""
    return create_model(
        "vit3d_test_p8", img_size=(16, 16, 16), in_chans=1, num_classes=3, grad_checkpointing=True
    )


class VolumeData(Dataset):
    """``n`` fixed (volume, target) pairs: x (1, 16, 16, 16), y = tanh of 3 fixed projections."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 16, 16, 16, generator=g)
        w = torch.randn(16**3, 3, generator=g) / 64
        self.y = torch.tanh(self.x.flatten(1) @ w)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def vit_config(out: str | Path, **overrides: Any):
    return dist_config(
        out, total_steps=VIT_STEPS, lr=3e-3, clip_grad_norm=1e6, log_every=1, **overrides
    )


class IndexedCrops(Dataset):
    """Store crops that also carry their dataset index (to check the sampler's sharding)."""

    def __init__(self, crops: Dataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)  # type: ignore[attr-defined]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.crops[i], "index": i}


class RecordingTask(ModuleTask):
    """A 1-conv model on store crops that records which crops each step trained on."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Conv3d(1, 1, 3, padding=1))
        self.seen: list[list[list[Any]]] = []

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.seen.append(
            [
                [int(i), c, [int(v) for v in s]]
                for i, c, s in zip(
                    batch["index"], batch["case_id"], batch["crop_start"], strict=True
                )
            ]
        )
        return {"loss": self._call(batch["image"]).pow(2).mean()}


def _fsdp_vit(out: Path) -> None:
    from umit.train import distributed as du

    assert du.init_from_env() and du.world_size() == 2
    torch.manual_seed(1 + du.rank())  # different init per rank: wrapping broadcasts rank 0's
    trainer = Trainer(
        RegressionTask(vit_model()),
        VolumeData(),
        vit_config(out, batch_size=VIT_BATCH, strategy="fsdp"),
    )
    assert trainer.strategy == "fsdp"
    trainer.fit()
    du.destroy()


def _shard(out: Path, prep: Path) -> None:
    from umit.data.dataset import StoreCropDataset
    from umit.train import distributed as du

    assert du.init_from_env() and du.world_size() == 4
    data = IndexedCrops(StoreCropDataset(prep, 8, **SHARD_CROPS))
    task = RecordingTask()
    cfg = dist_config(out / "run", total_steps=SHARD_STEPS, batch_size=1, lr=1e-3, strategy="ddp")
    Trainer(task, data, cfg).fit()
    (out / f"rank{du.rank()}.json").write_text(json.dumps(task.seen))
    du.destroy()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "fsdp_vit":
        _fsdp_vit(out)
    elif mode == "shard":
        _shard(out, Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(f"rank {os.environ['RANK']} done")
