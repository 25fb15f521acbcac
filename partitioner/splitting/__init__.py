"""The split pass: one torch.fx GraphModule per pipeline stage, as a Plan assigns.

`cut` builds the stages, `compose` runs them in sequence and shares tensors with the
model, `retarget` moves a stage's burnt-in devices to the device it runs on.
"""

from partitioner.splitting.cut import split

__all__ = ["split"]
