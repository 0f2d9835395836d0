"""Self-describing checkpoints made of plain data, written atomically, loadable with ``weights_only``.

A checkpoint is a dict of tensors, numbers, strings, lists, tuples and dicts only (no pickled
objects), so ``torch.load(path, weights_only=True)`` reads it and so does any tool that does not
import umit. Keys:

- ``format`` / ``format_version``: ``"umit-checkpoint"`` / :data:`FORMAT_VERSION`
- ``model``: full (unsharded) state dict of the trainable module
- ``optimizer``: optimizer state keyed by parameter name (``torch.distributed.checkpoint``'s
  full optimizer state dict, the same for DDP, FSDP2 and a single process)
- ``scaler``: ``GradScaler`` state or None; ``task``: the task's extra state or None
- ``step``: optimizer steps completed; ``data``: ``{"epoch", "samples_in_epoch", ...}``
- ``rank_state``: one dict per rank (RNG states of torch, numpy, python and CUDA; the open
  metrics window), so a resumed run continues every rank's random stream
- ``model_name`` / ``model_args``: how to rebuild the model (from the module's attributes)
- ``config``: the resolved config; ``plan``: the preprocessing plan (dict or None)
- ``versions``: umit, torch, python; ``data_hash``: hash of the dataset manifest (or None)

Files: ``step_XXXXXX.pt`` (the last ``keep_last`` kept) and ``latest.pt`` (a hard link to the
newest, or a copy where links are not possible). Each is written to a temporary name and renamed,
so a killed run never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import re
import shutil
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from umit import __version__
from umit.errors import InputError
from umit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

FORMAT = "umit-checkpoint"
FORMAT_VERSION = 1
LATEST_NAME = "latest.pt"
STEP_RE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("format", "format_version", "model", "step")


def step_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def versions() -> dict[str, str]:
    return {
        "umit": str(__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def to_plain(obj: Any, where: str = "value") -> Any:
    """Convert ``obj`` to data ``weights_only`` can load (Path -> str, numpy -> tensor, pydantic -> dict).

    Subclasses of builtins (``TorchVersion``, ``IntEnum``, ...) become the builtin, since the
    weights-only unpickler refuses their classes.

    Raises:
        TypeError: naming ``where`` and the offending key for anything else (classes,
            functions, arbitrary objects, tensor subclasses such as DTensor).
    """
    if obj is None or type(obj) in (bool, int, float, str, torch.Tensor, nn.Parameter):
        return obj
    if isinstance(obj, Enum):
        return to_plain(obj.value, where)
    for builtin in (bool, int, float, str):  # bool before int: bool is an int
        if isinstance(obj, builtin):
            return builtin(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {
            (k if type(k) in (int, str) else str(k)): to_plain(v, f"{where}[{k!r}]")
            for k, v in obj.items()
        }
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where}: {type(obj).__name__} is not plain data (use numbers, strings, lists, dicts, "
        "tensors) and cannot go into a weights_only checkpoint"
    )


def model_identity(*objects: Any) -> tuple[str | None, dict[str, Any] | None]:
    """``model_name`` and ``model_args`` from the first object that has them (else None)."""
    for obj in objects:
        name = getattr(obj, "model_name", None)
        if name is not None:
            args = getattr(obj, "model_args", None)
            return str(name), to_plain(dict(args), "model_args") if args is not None else None
    return None, None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python, CUDA) as plain data."""
    # The legacy global numpy RNG is what user code and libraries draw from: save that one.
    bit_gen, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_gen),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["bit_generator"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def gather_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Full (unsharded, CPU) model and optimizer state dicts; collective under FSDP.

    ``model`` is the unwrapped module (FSDP2 modules are sharded in place). Under FSDP only
    rank 0 receives the tensors; the other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=options), None
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return model_sd, optim_sd


def restore_train_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any] | None,
) -> None:
    """Load full state dicts into a (possibly FSDP-sharded) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    if optimizer is None or optim_sd is None:
        set_model_state_dict(model, model_sd, options=options)
    else:
        set_state_dict(
            model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
        )


def list_step_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_XXXXXX.pt`` in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(ckpt: Mapping[str, Any], out_dir: str | Path, keep_last: int = 3) -> Path:
    """Write ``step_XXXXXX.pt`` and ``latest.pt`` atomically; prune to ``keep_last`` step files.

    Call on one process only (rank 0). Returns the step file's path.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint dict lacks {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / step_name(int(ckpt["step"]))
    plain = to_plain(ckpt, "checkpoint")  # cheap walk; fails here rather than at load time
    with atomic_path(path) as tmp:
        torch.save(plain, tmp)
    with atomic_path(out_dir / LATEST_NAME) as tmp:
        try:
            os.link(path, tmp)  # same bytes, no extra disk or I/O
        except OSError:
            shutil.copyfile(path, tmp)
    for _, old in list_step_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Read a umit checkpoint with ``weights_only=True``.

    Raises:
        InputError: naming the file when it is missing, unreadable (truncated, corrupt, not a
            torch file, holds pickled objects) or not a umit checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # a damaged file can fail anywhere in the unpickler
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            path,
            f"cannot read checkpoint (truncated, corrupt or not plain data): "
            f"{type(exc).__name__}: {first}",
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(path, f"not a umit checkpoint (no format={FORMAT!r} entry)")
    if int(ckpt["format_version"]) > FORMAT_VERSION:
        raise InputError(
            path,
            f"checkpoint format version {ckpt['format_version']} is newer than this umit "
            f"understands ({FORMAT_VERSION}); upgrade umit",
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise InputError(path, f"checkpoint lacks {missing}")
    return ckpt


def checkpoint_candidates(out_dir: str | Path) -> list[Path]:
    """Checkpoints in ``out_dir`` to resume from, best first: ``latest.pt``, then newest steps."""
    out_dir = Path(out_dir)
    latest = out_dir / LATEST_NAME
    steps = [p for _, p in reversed(list_step_checkpoints(out_dir))]
    return ([latest] if latest.is_file() else []) + steps


def load_latest(
    out_dir: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in ``out_dir`` (skipping unreadable ones with a warning)."""
    for path in checkpoint_candidates(out_dir):
        try:
            return path, load_checkpoint(path, map_location=map_location, mmap=mmap)
        except InputError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None
