"""``TrainConfig``: every knob of the training loop, one docstring per field.

Stage configs (pretrain, finetune) embed a ``TrainConfig`` as their ``train`` section, so the
same keys work in YAML presets and as ``train.lr=1e-4`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from umit.config import UmitConfig
from umit.train.precision import Precision

Strategy = Literal["auto", "none", "ddp", "fsdp"]


class TrainConfig(UmitConfig):
    """Settings of the training loop (iteration-based: schedules are indexed by optimizer step)."""

    total_steps: int = Field(default=1000, ge=1)
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    batch_size: int = Field(default=2, ge=1)
    """Samples per micro-batch per process. The global batch of one optimizer step is
    ``batch_size * grad_accum_steps * world_size``."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches whose gradients are summed (as ``loss / grad_accum_steps``) before each
    optimizer step; gradients are all-reduced only on the last micro-batch."""
    lr: float = Field(default=1e-4, ge=0)
    """Peak learning rate, reached at the end of warm-up (per-group scales apply on top)."""
    min_lr: float = Field(default=1e-6, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warm-up from 0 to ``lr``; then cosine decay to ``min_lr``."""
    weight_decay: float = Field(default=0.05, ge=0)
    """AdamW decoupled weight decay at step 0 (never applied to biases, norms, 1-D parameters
    or the names a module lists in ``no_weight_decay()``)."""
    weight_decay_end: float | None = Field(default=None, ge=0)
    """Weight decay at the last step, reached by a cosine schedule (DINOv2: 0.04 -> 0.4);
    ``None`` keeps ``weight_decay`` constant."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """``adamw`` (decoupled weight decay) or ``sgd`` (with ``momentum``; weight decay as an L2
    term of the gradient, torch's SGD). SGD is what FedProx's analysis assumes: its proximal
    step stays proportional to ``mu``, where AdamW's per-parameter normalisation rescales it."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD momentum (``optimizer=sgd`` only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (0.9, 0.95 is common for ViT pretraining)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    layer_decay: float = Field(default=1.0, gt=0, le=1)
    """Layer-wise learning-rate decay for fine-tuning: layer ``i`` of ``n`` gets
    ``lr * layer_decay ** (n - i)``; 1.0 turns it off."""
    clip_grad_norm: float | None = Field(default=None, gt=0)
    """Clip the global gradient norm to this value (also logs ``grad_norm``); ``None`` = off."""
    precision: Precision = "auto"
    """Compute precision: ``auto`` (bf16 autocast on CUDA with bf16 and on CPUs with AVX-512 BF16
    / AMX where a measured matmul is faster in bf16, else fp32; logged with the reason, see
    :mod:`umit.train.precision`); ``fp32``; ``bf16`` autocast (CPU and CUDA); ``fp16`` autocast
    with a gradient scaler (CUDA only, for GPUs without bf16)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA (Ampere and newer) for fp32 compute."""
    device: str = "auto"
    """``auto`` (the process's CUDA device when available, else CPU), ``cpu`` or ``cuda``."""
    strategy: Strategy = "auto"
    """Data parallelism when several processes run (torchrun): ``auto`` = DDP when the world
    size is above 1; ``ddp``; ``fsdp`` (FSDP2 ``fully_shard`` per block, then the root);
    ``none`` = no wrapping (the model must be replicated by the caller)."""
    compile: bool = False
    """Compile the trainable module with ``torch.compile`` (in place, after wrapping)."""
    seed: int = 0
    """Seed of the data order and of the torch/numpy/python RNGs (offset by rank)."""
    shuffle: bool = True
    """Shuffle the data order every epoch (a seeded permutation of (seed, epoch))."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per training process."""
    log_every: int = Field(default=10, ge=1)
    """Write one metrics record (averaged over the steps since the last one) every this many
    steps, and at the last step."""
    ckpt_every: int | None = Field(default=1000, ge=1)
    """Write a checkpoint every this many steps; one is always written at the end; ``None`` =
    only at the end."""
    keep_last: int = Field(default=3, ge=1)
    """Numbered checkpoints (``step_XXXXXX.pt``) to keep besides ``latest.pt``."""
    eval_every: int | None = Field(default=None, ge=1)
    """Run the evaluation callback every this many steps (and at the end); ``None`` = never."""
    out_dir: Path = Path("runs/train")
    """Run folder: ``config.yaml``, ``metrics.jsonl``, checkpoints, TensorBoard events."""
    resume: str | None = "auto"
    """``auto``: continue from the newest checkpoint in ``out_dir`` when there is one, else
    start fresh; a checkpoint file, or a run folder (its newest checkpoint): continue from it;
    ``None``: start fresh (existing metrics are replaced)."""
    progress: bool = True
    """Show a progress bar (rank 0) with loss, samples/s, tokens/s and FLOP/s."""
    tensorboard: bool = True
    """Also write TensorBoard event files to ``out_dir/tb`` when ``tensorboard`` is installed."""

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must be in [0, 1), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed total_steps ({self.total_steps})"
            )
        return self

    @property
    def effective_weight_decay_end(self) -> float:
        return self.weight_decay if self.weight_decay_end is None else self.weight_decay_end
