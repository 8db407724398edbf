"""One retrain on several processes: who writes and who waits.

    accelerate launch --config_file training/accelerate/multi_gpu.yaml -m training.retrain
    torchrun --standalone --nproc_per_node 2 -m training.retrain     # the same on CPU processes (gloo)

The trainers (transformers' Trainer, TRL's RewardTrainer and PPOTrainer) already split batches
and average gradients across the processes a launcher starts. The orchestrator around them does
not: the data snapshot, the run row, model directories, the evaluation and the registration
must each happen once. Rank 0 does them while the other ranks wait, then every rank sees its
result; every rank trains. A plain ``python -m training.retrain`` (how the app runs it) has no
launcher environment, and each helper is then a no-op that never touches torch.distributed.
"""

from __future__ import annotations

import os
from functools import lru_cache


def world_size() -> int:
    """Processes in this run (1 without a launcher). torchrun and accelerate set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@lru_cache(maxsize=1)
def _state():
    import torch
    from accelerate import PartialState

    # Joins the process group the launcher described; the trainers reuse it. Without cpu=True,
    # accelerate ignores a launcher's ranks on a machine with no GPU (each would think it is 0).
    return PartialState(cpu=not torch.cuda.is_available())


def is_main() -> bool:
    return world_size() == 1 or _state().is_main_process


def wait() -> None:
    """Every rank stops here until all have arrived."""
    if world_size() > 1:
        _state().wait_for_everyone()


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank.

    An exception on rank 0 ends that process; the launcher then stops the others (torchrun tears
    the group down when one worker fails), so no rank waits forever.
    """
    result = fn(*args, **kwargs) if is_main() else None
    wait()
    return broadcast(result)
