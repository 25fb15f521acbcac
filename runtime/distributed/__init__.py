"""Run a plan on torch.distributed.pipelining: one process per stage.

`engine` builds this rank's stage and schedule, `relay` carries skip values one stage at a
time, `launch` is the command line (``python -m runtime.distributed``, under torchrun).
"""

from runtime.distributed.engine import SCHEDULES, DistributedPipeline, split_for_ranks

__all__ = ["SCHEDULES", "DistributedPipeline", "split_for_ranks"]
