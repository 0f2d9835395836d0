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

Every file umit writes is an *artifact* with a ``kind``: ``train_state`` (the loop's
checkpoints, above), ``model`` (``best.pt`` of ``umit finetune``: weights, model name and
arguments, plan, run config and an :class:`InferenceSpec`) or ``encoder`` (``encoder.pt`` of
``umit pretrain``) or ``network`` (``network.pt`` of ``umit pretrain scope=network``: a whole
encoder-decoder pretrained by restoration, its output layer sized for the pretext).
:func:`save_artifact` writes the last three, :func:`load_artifact` reads all
three (and MONAI weights, ``expect="monai"``), migrating older layouts, and names the file and
what it holds when the kind is not the one asked for. It is the only ``torch.load`` in umit.

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
from umit.config import UmitConfig
from umit.errors import InputError
from umit.models import create_model
from umit.models.monai_compat import load_monai_checkpoint
from umit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

FORMAT = "umit-checkpoint"
FORMAT_VERSION = 2
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
    from torch.distributed.checkpoint.state_dict import (  # distributed: only when saving
        StateDictOptions,
        get_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,  # distributed: only when saving
        )

        return get_model_state_dict(model, options=options), None
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return model_sd, optim_sd


def restore_train_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any] | None,
) -> None:
    """Load full state dicts into a (possibly FSDP-sharded) model and its optimizer.

    The optimizer's state may lack parameters that never had a gradient (a ResUNet's
    deep-supervision heads trained without deep supervision): AdamW keeps no state for them, so
    a strict load refused every such checkpoint ("Missing optimizer state"). They get torch's
    zero initial state instead, which no step reads while they get no gradient, so the resumed
    run still equals the uninterrupted one (tested).
    """
    from torch.distributed.checkpoint.state_dict import (  # distributed: only on resume
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(
        model, model_sd, options=StateDictOptions(full_state_dict=True, strict=True)
    )
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(
            model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False)
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
    """Read a training checkpoint (``step_*.pt`` / ``latest.pt``): ``load_artifact(path, "train_state")``."""
    return load_artifact(path, expect="train_state", map_location=map_location, mmap=mmap)


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


# ---------------------------------------------------------------------------------------------
# artifacts: the one save/load pair for every file umit writes
# ---------------------------------------------------------------------------------------------
ARTIFACT_KINDS = ("train_state", "model", "encoder", "network", "monai")
_DESCRIBE = {
    "train_state": "a training checkpoint (step_*.pt / latest.pt)",
    "model": "a fine-tuned model (best.pt of umit finetune)",
    "encoder": "a pretrained encoder (encoder.pt of umit pretrain)",
    "network": "a pretrained encoder-decoder network (network.pt of umit pretrain scope=network)",
    "monai": "a plain state dict (e.g. MONAI weights)",
}


class InferenceSpec(UmitConfig):
    """What inference needs to run a fine-tuned model, stored in ``best.pt`` (``spec``).

    ``umit evaluate``, ``umit predict``, ``umit audit`` and the demo read this, never the full
    training config, so renaming a training option cannot make old model files unreadable.
    """

    task: str = "segmentation"
    """``segmentation`` or ``classification``."""
    roi_size: tuple[int, int, int] = (96, 96, 96)
    """Sliding-window ROI (segmentation) or centred input size (classification), in voxels."""
    overlap: float = 0.5
    """Sliding-window overlap used in validation (``umit predict`` default)."""
    sw_batch_size: int = 2
    """Windows per forward pass."""
    class_names: list[str] = []
    """Classification: class names in output order."""
    label_names: dict[str, int] = {}
    """Segmentation: structure name -> label value."""
    label_key: str = "target"
    """Classification: the per-case label the model predicts."""
    channels: list[str] = []
    """Input channel names, in order (from the plan)."""
    num_outputs: int | None = None
    """Output channels / classes."""


def _torch_load(path: Path, map_location: Any, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # a damaged file can fail anywhere in the unpickler
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            path,
            f"cannot read checkpoint (truncated, corrupt or not plain data): "
            f"{type(exc).__name__}: {first}",
        ) from exc


def _spec_from_run_config(art: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 ``best.pt`` had no spec: rebuild it from the fine-tuning config it carried."""
    run = dict(art.get("run_config") or {})
    plan = art.get("plan") or {}
    spec: dict[str, Any] = {
        "task": art.get("task") or run.get("task", "segmentation"),
        "class_names": list(art.get("class_names") or []),
        "label_names": dict(art.get("label_names") or {}),
        "label_key": art.get("label_key") or run.get("label_key", "target"),
        "channels": [c.get("name") for c in plan.get("channels", []) if isinstance(c, Mapping)],
        "num_outputs": art.get("num_outputs"),
    }
    if "crop_size" in run:
        spec["roi_size"] = tuple(int(s) for s in run["crop_size"])
    if "sw_overlap" in run:
        spec["overlap"] = float(run["sw_overlap"])
    if "sw_batch_size" in run:
        spec["sw_batch_size"] = int(run["sw_batch_size"])
    return InferenceSpec.model_validate(spec).model_dump(mode="json")


def migrate_artifact(obj: Any, path: Path) -> dict[str, Any]:
    """Any layout umit has written -> the current one (``format_version`` :data:`FORMAT_VERSION`).

    Version 1 files: ``best.pt`` / ``encoder.pt`` had ``kind`` but no ``format``; training
    checkpoints had ``format`` but no ``kind``; ``best.pt`` had no inference spec.
    """
    if not isinstance(obj, dict):
        raise InputError(path, f"not a umit checkpoint (holds a {type(obj).__name__})")
    art = dict(obj)
    if art.get("format") == FORMAT:
        version = int(art.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise InputError(
                path,
                f"checkpoint format version {version} is newer than this umit understands "
                f"({FORMAT_VERSION}); upgrade umit",
            )
        art.setdefault("kind", "train_state" if "model" in art and "step" in art else None)
    elif art.get("kind") in ("model", "encoder") and "state_dict" in art:
        art["format"] = FORMAT  # version 1 model / encoder file
    elif (
        art
        and all(isinstance(v, torch.Tensor) for v in art.values())
        or any(isinstance(art.get(k), Mapping) for k in ("state_dict", "model", "network_weights"))
    ):
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "monai", "raw": art}
    else:
        raise InputError(path, f"not a umit checkpoint (no format={FORMAT!r} entry)")
    if art["kind"] == "model" and not art.get("spec"):
        art["spec"] = _spec_from_run_config(art)
    art["format_version"] = FORMAT_VERSION
    return art


def load_artifact(
    path: str | Path,
    expect: str | tuple[str, ...] | None = None,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> dict[str, Any]:
    """Read any umit file (``weights_only``), migrated to the current layout.

    Args:
        path: the file.
        expect: the kind(s) the caller can use (:data:`ARTIFACT_KINDS`); None accepts any.

    Raises:
        InputError: naming the file when it is missing, unreadable, not a umit file, or holds
            another kind than ``expect`` (saying what it holds).
    """
    if "://" in str(path):
        raise InputError(path, "only local files are loaded; download the checkpoint first")
    path = Path(path)
    wanted = (expect,) if isinstance(expect, str) else expect
    for kind in wanted or ():
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; choose from {ARTIFACT_KINDS}")
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    art = migrate_artifact(_torch_load(path, map_location, mmap), path)
    if wanted and art["kind"] not in wanted:
        what = " or ".join(_DESCRIBE[k] for k in wanted)
        if art["kind"] == "monai":
            raise InputError(
                path, f"not a umit checkpoint: holds {_DESCRIBE['monai']}, expected {what}"
            )
        raise InputError(
            path,
            f"holds {_DESCRIBE.get(art['kind'], art['kind'])} ({art.get('model_name')}), "
            f"expected {what}",
        )
    if art["kind"] == "train_state":
        missing = [k for k in REQUIRED_KEYS if k not in art]
        if missing:
            raise InputError(path, f"checkpoint lacks {missing}")
    elif art["kind"] in ("model", "encoder", "network") and not art.get("model_name"):
        raise InputError(path, f"{_DESCRIBE[art['kind']]} without a model name")
    return art


def save_artifact(
    path: str | Path,
    kind: str,
    module: nn.Module,
    *,
    plan: Any = None,
    run_config: Any = None,
    spec: InferenceSpec | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``best.pt`` (``kind="model"``), ``encoder.pt`` (``kind="encoder"``) or
    ``network.pt`` (``kind="network"``) atomically.

    The module must carry ``model_name`` / ``model_args`` (every registered model does).
    """
    if kind not in ("model", "encoder", "network"):
        raise ValueError(
            f"save_artifact writes 'model', 'encoder' or 'network' files, not {kind!r}"
        )
    if kind == "model" and spec is None:
        raise ValueError("a model file needs its InferenceSpec")
    name, args = model_identity(module)
    if name is None:
        raise ValueError(f"{type(module).__name__} has no model_name: build it with create_model")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_name": name,
        "model_args": args or {},
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "plan": to_plain(plan, "plan"),
        "run_config": to_plain(run_config, "run_config"),
        "versions": versions(),
        **to_plain(dict(extra or {}), "extra"),
    }
    if spec is not None:
        payload["spec"] = spec.model_dump(mode="json")
        payload["task"] = spec.task
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def update_artifact(path: str | Path, **fields: Any) -> Path:
    """Rewrite an artifact with some top-level fields replaced (e.g. the DP report), atomically."""
    path = Path(path)
    art = load_artifact(path)
    art.update(to_plain(fields, "fields"))
    with atomic_path(path) as tmp:
        torch.save(art, tmp)
    return path


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned model (``best.pt``, or a training checkpoint of ``umit finetune``)."""

    art = load_artifact(path, expect=("model", "train_state"))
    sd = art["state_dict"] if art["kind"] == "model" else art["model"]
    if not art.get("model_name"):
        raise InputError(path, "holds no fine-tuned model (expected best.pt from umit finetune)")
    if art["kind"] == "train_state":
        run = dict(art.get("config") or {})
        art.setdefault("run_config", run)
        art["spec"] = _spec_from_run_config({**art, "task": run.get("task")})
    model = create_model(art["model_name"], **dict(art["model_args"]))
    model.load_state_dict(sd, strict=True)
    model.eval()
    art["task"] = art["spec"]["task"]
    return model, art


def encoder_state(art: Mapping[str, Any], path: Path) -> tuple[str, dict[str, Any], dict]:
    """``(name, args, state_dict)`` of the encoder in an ``encoder.pt`` or an SSL training state.

    A training checkpoint of an SSL wrapper (``model_args`` with ``encoder`` and
    ``encoder_args``) holds the encoder under the ``encoder.`` prefix.
    """
    if art["kind"] == "encoder":
        return art["model_name"], dict(art["model_args"]), art["state_dict"]
    args = dict(art.get("model_args") or {})
    if "encoder" not in args or "encoder_args" not in args:
        raise InputError(
            path,
            f"holds a training checkpoint of {art.get('model_name')!r}, not of a pretraining "
            "method (no encoder inside)",
        )
    sd = {k[len("encoder.") :]: v for k, v in art["model"].items() if k.startswith("encoder.")}
    return str(args["encoder"]), dict(args["encoder_args"]), sd


def load_encoder(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an encoder from ``encoder.pt`` (or a pretraining run's training checkpoint)."""

    path = Path(path)
    art = load_artifact(path, expect=("encoder", "train_state"))
    name, args, sd = encoder_state(art, path)
    args.update(overrides)
    model = create_model(name, **args)
    model.load_state_dict(sd, strict=True)
    return model, art


def load_monai_weights(model: nn.Module, path: str | Path, **kwargs: Any) -> Any:
    """Load a MONAI ViT/UNETR/SwinUNETR checkpoint file into our encoder (key mapping in
    :func:`umit.models.monai_compat.load_monai_checkpoint`)."""

    art = load_artifact(path, expect="monai")
    return load_monai_checkpoint(model, art["raw"], **kwargs)


def load_network_weights(
    model: nn.Module, path: str | Path, partial: bool = False
) -> dict[str, list[str]]:
    """Load a ``network.pt`` (a whole pretrained encoder-decoder) into a task model.

    The pretext's output layer(s) cannot fit the task's (restoration predicts the input's
    channels, segmentation predicts classes): tensors whose shapes differ only in the leading
    (output-channel) dimension of an output layer are left at their fresh initialisation and
    reported. Everything else must match unless ``partial``: the same registered model, the same
    keys, the same shapes.

    Returns:
        ``{"loaded", "skipped_head", "missing", "unexpected"}`` key lists.

    Raises:
        InputError: naming the file when the model differs or (without ``partial``) keys or
            shapes other than the output layer's do not fit.
    """
    path = Path(path)
    art = load_artifact(path, expect="network")
    name = getattr(model, "model_name", None)
    if name is not None and art["model_name"] != name:
        raise InputError(
            path, f"holds a pretrained {art['model_name']!r} network; the model is {name!r}"
        )
    src = art["state_dict"]
    dst = model.state_dict()
    head_in = int(dict(art.get("model_args") or {}).get("out_channels", -1))
    head_out = int(getattr(model, "out_channels", -2))
    loaded, head, other = [], [], []
    for k, v in src.items():
        if k not in dst:
            continue
        if tuple(v.shape) == tuple(dst[k].shape):
            loaded.append(k)
        elif (
            v.ndim == dst[k].ndim
            and v.shape[0] == head_in
            and dst[k].shape[0] == head_out
            and tuple(v.shape[1:]) == tuple(dst[k].shape[1:])
        ):
            head.append(k)
        else:
            other.append(f"{k} {tuple(v.shape)} -> {tuple(dst[k].shape)}")
    missing = sorted(k for k in dst if k not in src)
    unexpected = sorted(k for k in src if k not in dst)
    if (missing or unexpected or other) and not partial:
        raise InputError(
            path,
            f"network weights do not fit {type(model).__name__} (partial_load=true loads what "
            f"fits): missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {other[:5]}",
        )
    model.load_state_dict({k: src[k] for k in loaded}, strict=False)
    if head or missing or unexpected or other:
        log.info(
            "%s: loaded %d tensors; output layer left fresh: %s; missing %s; unexpected %s; "
            "mismatched %s",
            path,
            len(loaded),
            head,
            missing,
            unexpected,
            other,
        )
    return {
        "loaded": loaded,
        "skipped_head": head,
        "missing": missing,
        "unexpected": unexpected + other,
    }
