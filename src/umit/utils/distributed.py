"""Process identity under ``torch.distributed``, answering for one process when uninitialized.

The ground layer (``data/`` samplers and datasets) needs only "which rank am I, of how many";
the launcher, wrappers and collectives live in :mod:`umit.train.distributed`.
"""

from __future__ import annotations

import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0
