"""Training metrics: a device-side averaging window, ``metrics.jsonl``, TensorBoard, progress bar.

The window sums the task's logs on the device (no host sync per step) and is reduced across
processes once per logging step. Only rank 0 writes: one JSON object per line in
``metrics.jsonl`` (``"split": "train"`` or ``"eval"``), mirrored to TensorBoard when the
``tensorboard`` package is installed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from umit.train import distributed as du
from umit.utils.fileio import atomic_write_text

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
TB_DIR = "tb"


class MetricWindow:
    """Running sums since the last logging step.

    ``add_micro`` once per micro-batch (task logs, samples, tokens, FLOPs); ``add_step`` once
    per optimizer step (gradient norm). :meth:`reduce` is collective: task logs are averaged
    over micro-batches and processes, counts are summed over processes.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.steps = 0
        self.grad_norm: torch.Tensor | None = None
        self.samples = 0.0
        self.tokens: float | None = None
        self.flops: float | None = None

    def add_micro(
        self,
        logs: Mapping[str, Any],
        samples: int,
        tokens: float | None = None,
        flops: float | None = None,
    ) -> None:
        for key, value in logs.items():
            v = torch.as_tensor(value).detach().to(self.device, torch.float32).mean()
            self.sums[key] = self.sums[key] + v if key in self.sums else v
        self.micro += 1
        self.samples += samples
        if tokens is not None:
            self.tokens = (self.tokens or 0.0) + tokens
        if flops is not None:
            self.flops = (self.flops or 0.0) + flops

    def add_step(self, grad_norm: torch.Tensor | None = None) -> None:
        self.steps += 1
        if grad_norm is not None:
            g = grad_norm.detach().to(self.device, torch.float32)
            self.grad_norm = g if self.grad_norm is None else self.grad_norm + g

    def reduce(self) -> dict[str, float]:
        """Window averages and global counts (collective; every rank must call it)."""
        keys = sorted(self.sums)
        parts = [self.sums[k] / max(self.micro, 1) for k in keys]
        if self.grad_norm is not None:
            keys.append("grad_norm")
            parts.append(self.grad_norm / max(self.steps, 1))
        counts = {"samples": self.samples, "tokens": self.tokens, "flops": self.flops}
        count_keys = [k for k, v in counts.items() if v is not None]
        # One collective for everything: means are summed then divided, counts stay summed.
        device = du.comm_device()
        packed = torch.stack(
            [p.to(device, torch.float64) for p in parts]
            + [
                torch.tensor(float(counts[k]), dtype=torch.float64, device=device)
                for k in count_keys
            ]
        )
        packed = du.all_reduce_sum(packed).tolist()
        world = du.world_size()
        out = {k: v / world for k, v in zip(keys, packed[: len(keys)], strict=True)}
        out.update({f"_{k}": v for k, v in zip(count_keys, packed[len(keys) :], strict=True)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain-data snapshot (for checkpoints), so a resumed run completes the same window."""
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "micro": self.micro,
            "steps": self.steps,
            "grad_norm": None if self.grad_norm is None else float(self.grad_norm),
            "samples": self.samples,
            "tokens": self.tokens,
            "flops": self.flops,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        f32 = {"device": self.device, "dtype": torch.float32}
        self.sums = {k: torch.tensor(v, **f32) for k, v in state["sums"].items()}
        self.micro = int(state["micro"])
        self.steps = int(state["steps"])
        g = state.get("grad_norm")
        self.grad_norm = None if g is None else torch.tensor(g, **f32)
        self.samples = float(state["samples"])
        self.tokens = state.get("tokens")
        self.flops = state.get("flops")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/Infinity
    return value


class MetricsWriter:
    """Appends records to ``out_dir/metrics.jsonl`` (and TensorBoard); inert when not enabled.

    Args:
        out_dir: run folder.
        enabled: False on every rank but 0.
        tensorboard: also write event files to ``out_dir/tb`` if ``tensorboard`` is importable.
        start_step: records with ``step > start_step`` from an earlier (killed) run are dropped,
            so the file after a resume is what an uninterrupted run would have written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
    ):
        self.path = Path(out_dir) / METRICS_NAME
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= start_step]
        if self.path.exists():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._tb = _tensorboard_writer(Path(out_dir) / TB_DIR, purge_step=start_step + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            step = int(record["step"])
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, int | float):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(log_dir: Path, purge_step: int) -> Any:
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs the package, not tensorflow)
        from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard
    except ImportError:
        log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def si(value: float, unit: str = "") -> str:
    """``1.23e12, "FLOP/s" -> "1.23 TFLOP/s"``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


class ProgressBar:
    """tqdm bar over optimizer steps on rank 0 (no-op elsewhere or when disabled)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            self._bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, record: Mapping[str, Any]) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{record['loss']:.4g}", "lr": f"{record['lr']:.3g}"}
        if "samples_per_s" in record:
            post["samples/s"] = si(record["samples_per_s"])
        if "tokens_per_s" in record:
            post["tokens/s"] = si(record["tokens_per_s"])
        if "flops_per_s" in record:
            post["FLOP/s"] = si(record["flops_per_s"])
        self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
