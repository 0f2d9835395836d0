"""Synthetic membership-inference set-up shared by the audit and DP tests.

Cases are 8³ Gaussian-noise volumes whose label adds a faint ±0.3 offset to a central 4³ cube:
a model can either learn that weak signal (generalize) or memorize the noise of its training
cases (an MLP on 512 voxels does, in a few dozen steps).
"""

from __future__ import annotations

import torch
from torch import nn

from umit.privacy.audit import attack_metrics, classification_losses
from umit.train.config import TrainConfig
from umit.train.loop import Trainer
from umit.train.tasks import ClassificationTask


def make_cases(n: int, seed: int, prefix: str) -> tuple[list[str], torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, 8, generator=g)
    x[:, :, 2:6, 2:6, 2:6] += (2 * y - 1).float().view(-1, 1, 1, 1, 1) * 0.3
    return [f"{prefix}{i:03d}" for i in range(n)], x, y.tolist()


class Items(torch.utils.data.Dataset):
    """One item per case, as ``umit finetune`` classification batches."""

    def __init__(self, ids: list[str], x: torch.Tensor):
        self.ids, self.x = ids, x

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "case_id": self.ids[i]}


def mlp() -> nn.Module:
    """High capacity for 8³ noise: memorizes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 2))


class SmallConv(nn.Module):
    """122 weights and a global mean: can learn the cube's offset, cannot memorize noise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean(dim=(2, 3, 4)))


def train_cfg(out, steps: int, batch_size: int = 8, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(
        total_steps=steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=0.0,
        weight_decay=0.0,
        out_dir=out,
        progress=False,
        ckpt_every=None,
        tensorboard=False,
        resume=None,
        log_every=steps,
        device="cpu",
    )


def train(model: nn.Module, cases, out, steps: int, dp=None, **kw) -> dict | None:
    """Train through the one training loop, with DP-SGD when ``dp`` (a DPConfig) is given."""
    from umit.train.dp import DPSGD

    ids, x, y = cases
    task = ClassificationTask(model, dict(zip(ids, y, strict=True)))
    cfg = train_cfg(out, steps, **kw)
    data = Items(ids, x)
    if dp is None:
        Trainer(task, data, cfg).fit()
        return None
    engine = DPSGD(dp, task, data, cfg)
    Trainer(engine.task, engine.loader, cfg, optimizer_factory=engine.optimizer_factory).fit()
    return engine.report()


def audit(model: nn.Module, members, nonmembers, n_boot: int = 300) -> dict:
    """Loss attack of ``model`` on its members vs non-members."""
    lm = classification_losses(model, list(members[1]), members[2])
    ln = classification_losses(model, list(nonmembers[1]), nonmembers[2])
    return attack_metrics(-lm, -ln, n_boot=n_boot)
