"""Run a plan on torch.distributed.pipelining: one process per rank, one or more stages each.

`engine` builds this rank's stages and schedule, `placement` says which stages a rank holds
and checks the schedule, `relay` carries skip values one stage at a time, `launch` is the
command line (``python -m runtime.distributed``, under torchrun).
"""

from runtime.distributed.engine import SCHEDULES, DistributedPipeline, split_for_ranks

__all__ = ["SCHEDULES", "DistributedPipeline", "split_for_ranks"]
