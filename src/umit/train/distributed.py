"""Distributed helpers that work uninitialized (world size 1).

The same training code runs in a unit test, on a laptop, under ``torchrun`` on many GPUs and
inside a federated client: every helper degrades to the single-process answer when
``torch.distributed`` is not initialized, and :func:`init_from_env` only starts a process group
when the launcher's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) are set.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from umit.utils.distributed import is_initialized, rank, world_size

log = logging.getLogger(__name__)

Strategy = Literal["auto", "none", "ddp", "fsdp"]


def local_rank() -> int:
    """Index of this process on its node (``LOCAL_RANK`` from torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Start the default process group from torchrun's environment variables.

    Does nothing (returns False) when a group already exists or when ``WORLD_SIZE`` is not set.
    The backend is NCCL when CUDA is available (and the process's device is set to
    ``LOCAL_RANK``), else Gloo.

    Returns:
        True when this call initialized the process group.
    """
    if is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun, or set "
            "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        # Binding the group to the device lets NCCL connect eagerly and avoids barrier guesses.
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(**kwargs)
    log.info("process group: backend=%s rank=%d world=%d", backend, rank(), world_size())
    return True


def destroy() -> None:
    """Tear down the default process group (no-op when none exists)."""
    if is_initialized():
        dist.destroy_process_group()


def default_device() -> torch.device:
    """This process's CUDA device when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device(
            "cuda", local_rank() if is_initialized() else torch.cuda.current_device()
        )
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | Mapping[str, Any]) -> Any:
    """Mean over processes of a tensor, or of a dict of scalars (one packed collective).

    A tensor comes back as a new tensor of the same shape; a dict comes back as
    ``{key: float}``. Every process must pass the same keys.
    """
    if isinstance(value, Mapping):
        keys = sorted(value)
        device = next(
            (v.device for v in value.values() if isinstance(v, torch.Tensor)), comm_device()
        )
        packed = torch.stack(
            [torch.as_tensor(value[k], dtype=torch.float64).to(device) for k in keys]
        )
        packed = all_reduce_mean(packed)
        return dict(zip(keys, packed.tolist(), strict=True))
    out = value.detach().clone()
    if is_initialized() and world_size() > 1:
        buf = out.to(comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = (buf / world_size()).to(device=value.device, dtype=value.dtype)
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a new tensor; the input is unchanged)."""
    out = value.detach().clone()
    if is_initialized() and world_size() > 1:
        buf = out.to(comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.to(value.device)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order (``[obj]`` uninitialized)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """Device that collectives of the default group need tensors on (CUDA for NCCL)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_strategy(strategy: Strategy) -> str:
    """``auto`` -> ``ddp`` when several processes run, else ``none``; no wrapping uninitialized."""
    if strategy not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"strategy must be auto, none, ddp or fsdp, got {strategy!r}")
    if not is_initialized():
        return "none"
    if strategy == "auto":
        return "ddp" if world_size() > 1 else "none"
    return strategy


def _block_lists(model: nn.Module) -> list[nn.Module]:
    """Children of every ``blocks`` container (``ModuleList`` / ``Sequential``) in ``model``."""
    found = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList | nn.Sequential):
            found.extend(module.children())
    return found


def wrap_model(model: nn.Module, strategy: Strategy = "auto", **fsdp_kwargs: Any) -> nn.Module:
    """Wrap for data parallelism; returns ``model`` itself when there is nothing to do.

    ``ddp``: ``DistributedDataParallel`` (``device_ids`` = the model's CUDA device). ``fsdp``:
    FSDP2 ``fully_shard`` applied in place to each transformer block (every child of a
    ``blocks`` container anywhere in the model), then to the root; ``fsdp_kwargs`` (e.g.
    ``mp_policy``, ``reshard_after_forward``) are passed through. Uninitialized -> ``model``.
    """
    resolved = resolve_strategy(strategy)
    if resolved == "none":
        return model
    if resolved == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP  # only under DDP

        param = next(model.parameters())
        device_ids = [param.device.index] if param.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard  # only under FSDP

    # fully_shard keeps each rank's own slice of its local tensors: start from rank 0's values,
    # as DDP does, so ranks that initialized differently still train one model.
    broadcast_module(model)
    for block in _block_lists(model):
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every process, in place (no-op uninitialized)."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            buf = (
                tensor.data
                if tensor.device.type == comm_device().type
                else tensor.data.to(comm_device())
            )
            dist.broadcast(buf, src=src)
            if buf is not tensor.data:
                tensor.data.copy_(buf)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP and ``torch.compile`` wrappers (FSDP2 works in place)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile(module) -> OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
