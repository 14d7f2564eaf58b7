"""Multi-process training on ``torchrun``: process group, cross-rank agreement, DDP/FSDP2 wrapping.

One job per module:

* :mod:`~fastebm.distributed.process` -- where this process sits (rank, world size, main process);
* :mod:`~fastebm.distributed.group` -- joining/leaving the process group (device, backend, timeout);
* :mod:`~fastebm.distributed.collectives` -- barrier, mean over ranks, the any-rank vote, gathering;
* :mod:`~fastebm.distributed.liveness` -- heartbeats and the message that names a failed rank;
* :mod:`~fastebm.distributed.wrap` -- DDP / FSDP2 around the objective, no-sync accumulation;
* :mod:`~fastebm.distributed.state_dicts` -- FSDP2 state dicts in the plain checkpoint format.

Without torchrun everything degrades to one process (rank 0 of 1, collectives are identities).
Why the whole ``RestorationObjective`` is the wrapped module: docs/design.md §8 and
:mod:`fastebm.distributed.wrap`. Errors: :class:`fastebm.errors.DistributedSetupError` (bad
set-up) and :class:`fastebm.errors.DistributedFailure` (a peer died or hung).
"""
from .collectives import all_gather_object, all_reduce_mean, any_rank, any_rank_flags, barrier
from .group import BACKENDS, DEFAULT_TIMEOUT_S, destroy_distributed, init_distributed
from .liveness import LIVENESS_INTERVAL_S, describe_peers, explain_failure, heartbeat, is_collective_failure
from .process import TORCHRUN_VARS, DistInfo, is_initialized, is_main, launched_by_torchrun, rank, world_size
from .state_dicts import (full_optimizer_state_dict, full_state_dict, gather_for_checkpoint, load_from_checkpoint,
                          load_full_state_dicts, optimizer_state_by_index, optimizer_state_by_name)
from .wrap import FSDP_STATUS, FSDP_SUMMARY, gradient_sync, is_fsdp, is_sharded, shard_fsdp, unwrap, wrap_ddp

__all__ = [
    "TORCHRUN_VARS", "BACKENDS", "DEFAULT_TIMEOUT_S", "LIVENESS_INTERVAL_S", "FSDP_STATUS", "FSDP_SUMMARY",
    "DistInfo", "init_distributed", "destroy_distributed", "launched_by_torchrun",
    "is_initialized", "rank", "world_size", "is_main",
    "barrier", "all_reduce_mean", "any_rank", "any_rank_flags", "all_gather_object",
    "heartbeat", "describe_peers", "explain_failure", "is_collective_failure",
    "wrap_ddp", "shard_fsdp", "is_fsdp", "is_sharded", "unwrap", "gradient_sync",
    "full_state_dict", "full_optimizer_state_dict", "load_full_state_dicts", "optimizer_state_by_index",
    "optimizer_state_by_name", "gather_for_checkpoint", "load_from_checkpoint",
]
